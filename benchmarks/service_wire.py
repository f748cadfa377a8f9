"""What the tf.data service puts on the network, measured across emulated hosts.

    python benchmarks/service_wire.py            # 224 px photos, every wire format, 3 caps
    python benchmarks/service_wire.py --quick    # small and short: that it runs

A dispatcher, two input workers and a trainer, each in a network namespace of its own
(`emulated_hosts.EmulatedHosts`: veth links to a switch, needs root), started as
train.py's users start them (`python -m simsiam_tf.data_service ...`). For each
`--augment-on` (host, device), wire format (`--data-service-wire`: uint8, snappy,
jpeg) and cap on every link's bandwidth (`tc ... tbf`: 100 Mbit/s, 1 Gbit/s,
unlimited), a reader in the trainer's namespace reads the stream exactly as train.py
does (`ServiceInput.batches`: dynamic sharding, the wire format unpacked on the trainer)
and reports:

- bytes per pair: what arrived on the trainer's eth0 (the kernel's rx counter, headers
  and gRPC framing included) over the pairs read, in the measured window;
- pairs/s in that window;
- trainer CPU per pair: the reader process's CPU time (user + system) over the pairs,
  which includes receiving, decompressing (snappy) and decoding (jpeg);

The servers restart for every row, so no row's leftovers load the next. Latency is
added only where the kernel has `tc netem` (`--delay-ms`); this project's machines do
not (EmulatedHosts.can_delay), and the JSON says which was measured.

The data: CIFAR-10 upscaled to 500 x 375 JPEG photos (`common.photo_folder`) in 16
TFRecord shards, 224 px training views, batch 32 per read. Upscaled CIFAR-10 is
smoother than a photo, which flatters snappy and JPEG; `--grain 20` adds noise that
makes the files ImageNet's size and is harder to compress than a photo: the two bracket
what photos send.

Read bytes per pair and trainer CPU per pair off the unlimited rows: under a cap the
window holds few pairs, so the batches in flight at its two ends weigh (up to four
per trainer, `max_outstanding_requests`), and the reader's fixed background CPU is
shared by few pairs.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import REPO, Parser, batch_size, nonnegative_float, nonnegative_int, photo_folder, positive_int, report  # noqa: E402

from simsiam_tf.config import WIRES  # noqa: E402

HOSTS = ["dispatcher", "worker1", "worker2", "trainer"]
PORT = 5050
SERVER_START_S = 120


def _rx_bytes(interface: str = "eth0") -> int:
    """Bytes received on `interface` of this process's network namespace."""
    with open("/proc/self/net/dev") as f:
        for line in f:
            name, _, fields = line.partition(":")
            if name.strip() == interface:
                return int(fields.split()[0])
    raise RuntimeError(f"no interface {interface} in this network namespace")


def read_main(args) -> int:
    """The trainer's side: read the stream as train.py does; print one JSON line."""
    import numpy as np
    import tensorflow as tf

    from simsiam_tf import augment as aug
    from simsiam_tf.config import make_config
    from simsiam_tf.input import open_input
    from simsiam_tf.input import wire
    from simsiam_tf.input.service import ServiceInput

    config = make_config(dataset=args.dataset, image_size=args.size, input="stream", val_fraction=0.0)
    stream = open_input(config)[0]
    inp = ServiceInput(stream, f"grpc://{args.dispatcher}", args.job, args.wire)
    spec = aug.AugmentSpec.for_image_size(args.size)
    if args.save:  # the raw stream, with each pair's (epoch, image id), unpacked as batches() does
        svc = tf.data.experimental.service
        dataset_id, element_spec = inp.connect(args.batch, spec, args.seed, args.epochs, augment_on=args.augment_on)
        ds = svc.from_dataset_id(processing_mode=svc.ShardingPolicy.DYNAMIC, service=inp.target, dataset_id=dataset_id,
                                 element_spec=element_spec, job_name=inp.job).map(
            lambda batch, epoch, index: (wire.unpack(batch, args.wire, args.size), epoch, index))
    else:  # as train.py reads it
        ds = inp.batches(tf.distribute.get_strategy(), args.batch, spec, args.seed, args.epochs,
                         augment_on=args.augment_on)
    it = iter(ds)
    kept = []
    for _ in range(args.warmup):
        next(it)
    usage = resource.getrusage(resource.RUSAGE_SELF)
    cpu0, t0 = usage.ru_utime + usage.ru_stime, time.perf_counter()
    samples = [(0, t0, _rx_bytes())]  # (pairs, time, bytes received) after each batch
    read = 0
    while read < args.batches and (read == 0 or time.perf_counter() - t0 < args.seconds):
        element = next(it)
        read += 1
        if args.save:
            kept.append([t.numpy() for t in element])
        else:
            element.numpy()
        samples.append((read * args.batch, time.perf_counter(), _rx_bytes()))
    usage = resource.getrusage(resource.RUSAGE_SELF)
    cpu = usage.ru_utime + usage.ru_stime - cpu0
    pairs = read * args.batch
    # Slopes over every batch boundary, not the two ends: up to four batches are in flight
    # at any moment (max_outstanding_requests), partly received, which would otherwise
    # weigh on a window of a few batches.
    n, t, rx = (np.array(column, float) for column in zip(*samples))
    bytes_per_pair = np.polyfit(n, rx, 1)[0] if read > 1 else (rx[-1] - rx[0]) / pairs
    seconds_per_pair = np.polyfit(n, t, 1)[0] if read > 1 else (t[-1] - t[0]) / pairs
    if args.save:
        views, epochs, ids = (np.concatenate(part) for part in zip(*kept))
        np.savez(args.save, views=views, epochs=epochs, ids=ids)
    print(json.dumps({"pairs": pairs, "seconds": t[-1] - t[0], "pairs_per_s": 1 / seconds_per_pair,
                      "bytes_received": rx[-1] - rx[0],  # exact per pair only when the stream was read to its end
                      "bytes_per_pair": bytes_per_pair, "trainer_cpu_ms_per_pair": cpu / pairs * 1e3}), flush=True)
    return 0


def cpu_costs(dataset: str, size: int, batch: int, augment_on: str, batches: int = 6) -> dict:
    """CPU milliseconds per pair, measured in this process as CPU time (all threads, so
    per core whatever the parallelism): what a worker spends making a pair (the
    served pipeline's decode, crops and, with `host`, the augmentation), what each wire
    format adds on the worker (jpeg encode; snappy compress) and on the trainer (jpeg
    decode; snappy uncompress), and the payload bytes per pair. Snappy through the ops
    the service itself calls (tf.data's compression_ops)."""
    import tensorflow as tf
    from tensorflow.python.data.experimental.ops import compression_ops

    from simsiam_tf import augment as aug
    from simsiam_tf.config import make_config
    from simsiam_tf.input import open_input, wire

    stream = open_input(make_config(dataset=dataset, image_size=size, input="stream", val_fraction=0.0))[0]
    spec = aug.AugmentSpec.for_image_size(size)
    it = iter(stream.worker_batches(batch, spec, 0, 1000, augment_on=augment_on))
    next(it)  # traced and warm
    started, wall = time.process_time(), time.perf_counter()
    views = [next(it) for _ in range(batches)]
    make_ms = (time.process_time() - started) / (batches * batch) * 1e3
    # How busy tf.data kept this machine's cores meanwhile: CPU time over wall time x cores.
    busy = (time.process_time() - started) / ((time.perf_counter() - wall) * os.cpu_count())
    element = tf.TensorSpec(views[0].shape, tf.uint8)

    def per_pair_ms(fn, inputs):
        fn(inputs[0])  # traced and warm
        started = time.process_time()
        outputs = [fn(x) for x in inputs]
        return (time.process_time() - started) / (len(inputs) * batch) * 1e3, outputs

    encode, jpegs = per_pair_ms(tf.function(lambda v: wire.pack(v, "jpeg")), views)
    decode, _ = per_pair_ms(tf.function(lambda s: wire.unpack(s, "jpeg", size)), jpegs)
    compress, packed = per_pair_ms(compression_ops.compress, views)
    uncompress, _ = per_pair_ms(lambda c: compression_ops.uncompress(c, element), packed)
    jpeg_bytes = sum(len(x) for j in jpegs for x in j.numpy().ravel()) / (len(jpegs) * batch)
    return {
        "make_ms_per_pair": make_ms,
        "cores_busy": busy,
        "uint8": {"worker_ms_per_pair": 0.0, "trainer_ms_per_pair": 0.0, "payload_bytes_per_pair": 2 * 3 * size ** 2},
        "snappy": {"worker_ms_per_pair": compress, "trainer_ms_per_pair": uncompress},
        "jpeg": {"worker_ms_per_pair": encode, "trainer_ms_per_pair": decode, "payload_bytes_per_pair": jpeg_bytes},
    }


class Cluster:
    """The dispatcher and two workers, started in their hosts, as a user starts them."""

    def __init__(self, hosts, work_dir: str):
        self.hosts, self.work_dir = hosts, work_dir
        self.target = f"{hosts.address('dispatcher')}:{PORT}"
        self.procs = [self._dispatcher()]
        for name in ("worker1", "worker2"):
            self.procs.append(hosts.popen(
                name, [*self.MODULE, "worker", "--dispatcher", self.target, "--port", str(PORT + 1),
                       "--worker-address", f"{hosts.address(name)}:%port%"],
                cwd=REPO, env=self.ENV, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True))
        self.first_lines = [_readline(proc, SERVER_START_S) for proc in self.procs]
        for line in self.first_lines:
            if "serving" not in line and "worker on" not in line:
                raise RuntimeError(f"a tf.data service server did not start: {line!r}")

    MODULE = [sys.executable, "-m", "simsiam_tf.data_service"]
    ENV = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")

    def _dispatcher(self):
        return self.hosts.popen("dispatcher", [*self.MODULE, "dispatcher", "--port", str(PORT), "--work-dir",
                                               self.work_dir], cwd=REPO, env=self.ENV, stdout=subprocess.PIPE,
                                stderr=subprocess.DEVNULL, text=True)

    def restart_dispatcher(self) -> str:
        """Kill the dispatcher (as a lost host) and start it again on its journal; its first line."""
        self.procs[0].kill()
        self.procs[0].wait()
        self.procs[0] = self._dispatcher()
        return _readline(self.procs[0], SERVER_START_S)

    def stop(self):
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait()


def _readline(proc, timeout_s: float) -> str:
    """A line of the process's stdout, or '' if none comes within timeout_s."""
    import selectors

    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ)
        if not sel.select(timeout_s):
            return ""
    return proc.stdout.readline()


def read_in(hosts, target: str, dataset: str, job: str, *, wire: str, augment_on: str, size: int, batch: int,
            batches: int, seconds: float = 30.0, warmup: int = 2, epochs: int = 100, save: str | None = None,
            timeout_s: float = 600) -> dict:
    """Run the reader (`read`) in the trainer's host; its JSON line."""
    argv = [sys.executable, os.path.abspath(__file__), "read", "--dispatcher", target, "--dataset", dataset,
            "--job", job, "--wire", wire, "--augment-on", augment_on, "--size", str(size), "--batch", str(batch),
            "--batches", str(batches), "--seconds", str(seconds), "--warmup", str(warmup), "--epochs", str(epochs)]
    argv += ["--save", save] if save else []
    proc = hosts.popen("trainer", argv, cwd=REPO, env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"),
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out, err = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise RuntimeError(f"the reader took more than {timeout_s:.0f} s")
    if proc.returncode:
        raise RuntimeError(f"the reader failed ({proc.returncode}): {err.strip().splitlines()[-1:]}")
    return json.loads(out.strip().splitlines()[-1])


def across_hosts(args, dataset: str, caps: list) -> tuple[list[dict], bool]:
    """A row per cap, --augment-on and wire format, read across emulated hosts; and
    whether the kernel could have added latency."""
    from emulated_hosts import EmulatedHosts

    rows = []
    with EmulatedHosts(HOSTS) as hosts:
        for cap in caps:
            for name in HOSTS:
                hosts.shape(name, rate_mbit=cap)
            for augment_on in args.augment.split(","):
                for wire in args.wires.split(","):
                    cluster = Cluster(hosts, tempfile.mkdtemp(prefix="simsiam-wire-dispatcher-"))
                    try:
                        out = read_in(hosts, cluster.target, dataset, f"wire-{augment_on}-{wire}-{cap}", wire=wire,
                                      augment_on=augment_on, size=args.size, batch=args.batch, batches=args.batches,
                                      seconds=args.seconds, warmup=args.warmup)
                    finally:
                        cluster.stop()
                    row = {"cap_mbit": cap or "unlimited", "augment_on": augment_on, "wire": wire,
                           **{k: out[k] for k in ("pairs", "pairs_per_s", "bytes_per_pair", "trainer_cpu_ms_per_pair")}}
                    rows.append(row)
                    print(f"  {str(row['cap_mbit']):>9} Mbit/s  {augment_on:<6} {wire:<6} "
                          f"{out['bytes_per_pair'] / 1e3:8.1f} KB/pair  {out['pairs_per_s']:6.1f} pairs/s  "
                          f"trainer {out['trainer_cpu_ms_per_pair']:6.2f} ms CPU/pair", flush=True)
        return rows, hosts.can_delay


def main(argv=None) -> int:
    if argv is None:
        argv = sys.argv[1:]
    if argv[:1] == ["read"]:
        p = Parser(description="the reader, run inside the trainer's host")
        for flag in ("--dispatcher", "--dataset", "--job", "--wire", "--augment-on"):
            p.add_argument(flag, required=True)
        p.add_argument("--size", type=positive_int, required=True)
        p.add_argument("--batch", type=batch_size, required=True)
        p.add_argument("--batches", type=positive_int, required=True)
        p.add_argument("--seconds", type=nonnegative_float, default=30.0)
        p.add_argument("--warmup", type=nonnegative_int, default=2)
        p.add_argument("--epochs", type=positive_int, default=100)
        p.add_argument("--seed", type=nonnegative_int, default=0)
        p.add_argument("--save", help="write the pairs read, with their epochs and image ids, to this .npz file")
        args = p.parse_args(argv[1:])
        return read_main(args)

    from emulated_hosts import why_unsupported

    p = Parser(description=__doc__)
    p.add_argument("--quick", action="store_true", help="64 photos at 64 px, one cap, few batches")
    p.add_argument("--photos", type=positive_int, help="default 1,024 (--quick: 64)")
    p.add_argument("--size", type=positive_int, help="training image size (default 224; --quick: 64)")
    p.add_argument("--grain", type=nonnegative_float, default=0.0,
                   help="Gaussian grain added to the photos (default 0: upscaled CIFAR-10, smoother than photos; "
                   "20 makes ~94 KiB files, ImageNet's size, and noisier than photos)")
    p.add_argument("--dataset", help="read this instead of the photos (e.g. tfrecord:DIR or folder:DIR at --size 32)")
    p.add_argument("--batch", type=batch_size, default=32)
    p.add_argument("--batches", type=positive_int, help="measured batches per row at most (default 16; --quick: 3)")
    p.add_argument("--seconds", type=nonnegative_float, default=20.0, help="measure at most this long per row (default 20)")
    p.add_argument("--warmup", type=nonnegative_int, default=2, help="batches read before measuring (default 2)")
    p.add_argument("--caps", default=None, help="comma-separated Mbit/s, 0 = unlimited (default 100,1000,0; --quick: 0)")
    p.add_argument("--wires", default=",".join(WIRES), help="wire formats to measure (default: all)")
    p.add_argument("--augment", default="host,device", help="--augment-on values to measure (default host,device)")
    p.add_argument("--cpu-only", action="store_true", help="only the CPU costs per pair, in process (no hosts)")
    args = p.parse_args(argv)
    quick = dict(photos=64, size=64, batches=3, caps="0") if args.quick else dict(
        photos=1024, size=224, batches=16, caps="100,1000,0")
    for key, value in quick.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    reason = None if args.cpu_only else why_unsupported()
    if reason:
        print(f"service_wire: error: emulated hosts {reason}; run as root on Linux", file=sys.stderr)
        return 2
    caps = [float(c) or None for c in args.caps.split(",")]

    from simsiam_tf.input import records
    from simsiam_tf.input.wire import JPEG_QUALITY

    if args.dataset:
        dataset = args.dataset
    else:
        root = photo_folder(args.photos, args.grain)
        shards = os.path.join(tempfile.gettempdir(), "simsiam-tf-bench", f"shards-{os.path.basename(root)}")
        if records.read_index(shards) is None:
            records.write_records(root, shards, shards=16, overwrite=True)
        dataset = f"tfrecord:{shards}"

    costs = {}
    for augment_on in args.augment.split(","):
        costs[augment_on] = cpu_costs(dataset, args.size, args.batch, augment_on)
        print(f"  CPU    {augment_on:<6} making a pair {costs[augment_on]['make_ms_per_pair']:.2f} ms, the cores "
              f"{costs[augment_on]['cores_busy']:.0%} busy", flush=True)
        for wire in args.wires.split(","):
            cost = costs[augment_on][wire]
            print(f"  CPU    {augment_on:<6} {wire:<6} worker +{cost['worker_ms_per_pair']:.3f} ms/pair  "
                  f"trainer +{cost['trainer_ms_per_pair']:.3f} ms/pair", flush=True)

    rows, delay = ([], None) if args.cpu_only else across_hosts(args, dataset, caps)
    latency = "none (--cpu-only)" if delay is None else "none (not asked)" if delay else "none: this kernel has no tc netem"
    report(
        "service_wire", rows,
        [("cap_mbit", "cap Mbit/s"), ("augment_on", "augment on"), ("wire", "wire"), ("pairs", "pairs"),
         ("bytes_per_pair", "bytes/pair"), ("pairs_per_s", "pairs/s"), ("trainer_cpu_ms_per_pair", "trainer ms CPU/pair")],
        {"photos": args.photos, "grain": args.grain, "image_size": args.size, "batch": args.batch, "uint8_bytes_per_pair": 2 * 3 * args.size ** 2,
         "latency_added": latency,
         "jpeg_quality": JPEG_QUALITY, "dataset": dataset, "cpu_ms_per_pair": costs, "hosts": "network namespaces joined by veth pairs to a bridge (emulated_hosts.py)"},
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
