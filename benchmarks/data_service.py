"""View pairs per second through the tf.data service, against the same pipeline in process.

    python benchmarks/data_service.py            # 2,048 photos at 224 px, two rounds
    python benchmarks/data_service.py --quick    # fewer photos and batches, one round

The data: CIFAR-10 upscaled to 500 x 375 JPEG photos (`common.photo_folder`) written
into 16 TFRecord shards, read at 224 px with the whole augmentation on the host
(`--augment-on host`), batch 64. Three ways, on the same machine:

- in process: `simsiam_tf.input.stream.StreamInput.worker_batches`, what `train.py`
  runs without `--data-service`;
- service, 1 or 2 workers: a dispatcher in this process and worker subprocesses
  (`python -m simsiam_tf.data_service worker`) on loopback, read as `train.py
  --data-service` reads them (`simsiam_tf.input.service.ServiceInput`: dynamic sharding,
  uncompressed).

All use the same cores and deliver the same batches, in the one batch format (uint8
[B, 2, S, S, 3], normalised later by `train_step` on the device), so the ratio in-process /
service is the service's overhead per pair on this machine: serialising each batch,
sending it over gRPC and receiving it.
"trainer CPU" is the CPU time this process spends per pair while reading, which on a
cluster is what a GPU host still pays when all augmentation runs elsewhere.
"""

from __future__ import annotations

import os
import resource
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import Parser, batch_size, photo_folder, positive_int, report, training_input  # noqa: E402

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
import tensorflow as tf  # noqa: E402

from simsiam_tf import augment as aug  # noqa: E402
from simsiam_tf.input import records  # noqa: E402
from simsiam_tf.input.service import ServiceInput  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIZE, BATCH = 224, 64


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _measure(ds, batches: int, batch: int, warmup: int = 3) -> tuple[float, float]:
    """(pairs per second, this process's CPU microseconds per pair) over `batches`."""
    it = iter(ds)
    for _ in range(warmup):
        next(it)
    cpu, started = _cpu_seconds(), time.perf_counter()
    for _ in range(batches):
        element = next(it)  # a batch, or (batch, epoch, image id) from the service
    (element[0] if isinstance(element, tuple) else element).numpy()
    seconds, cpu = time.perf_counter() - started, _cpu_seconds() - cpu
    return batches * batch / seconds, cpu / (batches * batch) * 1e6


def _workers(port: int, count: int) -> list[subprocess.Popen]:
    procs = []
    for _ in range(count):
        p = subprocess.Popen(
            [sys.executable, "-m", "simsiam_tf.data_service", "worker", "--dispatcher", f"127.0.0.1:{port}",
             "--port", "0", "--worker-address", "127.0.0.1:%port%"],
            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
        )
        p.stdout.readline()  # serving
        procs.append(p)
    return procs


def main(argv=None) -> int:
    p = Parser(description=__doc__)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--photos", type=positive_int, help="default 2,048 (--quick: 256)")
    p.add_argument("--batches", type=positive_int, help="measured batches per way (default 24, --quick: 4)")
    p.add_argument("--rounds", type=positive_int, help="default 2 (--quick: 1)")
    p.add_argument("--batch", type=batch_size, default=BATCH)
    p.add_argument("--size", type=positive_int, default=SIZE, help="training image size (default 224)")
    args = p.parse_args(argv)
    quick = dict(photos=256, batches=4, rounds=1) if args.quick else dict(photos=2048, batches=24, rounds=2)
    for key, value in quick.items():
        if getattr(args, key) is None:
            setattr(args, key, value)

    root = photo_folder(args.photos)
    shards = os.path.join(tempfile.gettempdir(), "simsiam-tf-bench", f"shards-{os.path.basename(root)}")
    if records.read_index(shards) is None:
        records.write_records(root, shards, shards=16, overwrite=True)
    spec = aug.AugmentSpec.for_image_size(args.size)
    streamed = training_input(f"tfrecord:{shards}", args.size, "stream")

    svc = tf.data.experimental.service

    def in_process():
        return streamed.worker_batches(args.batch, spec, 0, 10_000)

    def service(name, target):
        def make():
            inp = ServiceInput(streamed, target, name)
            dataset_id, element_spec = inp.connect(args.batch, spec, 0, 10_000)
            return svc.from_dataset_id(
                processing_mode=svc.ShardingPolicy.DYNAMIC, service=target, dataset_id=dataset_id,
                element_spec=element_spec, job_name=inp.job, max_outstanding_requests=4,
            )  # (batch, epoch, image id), as ServiceInput.batches reads them
        return make

    cores = os.cpu_count()
    rows = []
    for r in range(args.rounds):
        for name, workers in (("in process", 0), ("service, 1 worker", 1), ("service, 2 workers", 2)):
            # A fresh dispatcher for each: a stopped worker stays registered with its
            # dispatcher, and later jobs would give it tasks the reader has to skip.
            dispatcher = svc.DispatchServer(svc.DispatcherConfig(
                port=0, work_dir=tempfile.mkdtemp(prefix="simsiam-bench-dispatcher-"), fault_tolerant_mode=True))
            port = int(dispatcher.target.rsplit(":", 1)[1])
            procs = _workers(port, workers)
            try:
                ds = in_process() if not workers else service(f"bench-{r}-{workers}", f"grpc://127.0.0.1:{port}")()
                rate, cpu_us = _measure(ds, args.batches, args.batch)
                del ds
            finally:
                for proc in procs:
                    proc.terminate()
                    proc.wait()
                dispatcher.stop()
            rows.append({"round": r + 1, "way": name, "pairs_per_s": rate, "pairs_per_s_per_core": rate / cores,
                         "trainer_cpu_us_per_pair": cpu_us})
            print(f"  round {r + 1}  {name:<20} {rate:7.1f} pairs/s  ({rate / cores:.1f} per core)  "
                  f"trainer CPU {cpu_us:,.0f} us/pair", flush=True)

    def mean(way, key):
        values = [row[key] for row in rows if row["way"] == way]
        return sum(values) / len(values)

    base = mean("in process", "pairs_per_s")
    overhead = {w: base / mean(w, "pairs_per_s") - 1 for w in ("service, 1 worker", "service, 2 workers")}
    for w, o in overhead.items():
        print(f"  {w}: {o:+.1%} time per pair against in process", flush=True)
    report(
        "data_service", rows,
        [("round", "round"), ("way", "way"), ("pairs_per_s", "pairs/s"), ("pairs_per_s_per_core", "pairs/s/core"),
         ("trainer_cpu_us_per_pair", "trainer CPU us/pair")],
        {"photos": args.photos, "image_size": args.size, "batch": args.batch, "augment_on": "host",
         "overhead_per_pair": {w: round(o, 4) for w, o in overhead.items()}},
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
