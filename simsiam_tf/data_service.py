"""The tf.data service: SimSiam's input pipeline on other hosts.

When the trainers' own CPU cores cannot augment fast enough for their GPUs, the
streaming pipeline (`stream`) runs instead on CPU-only hosts and streams finished
batches to the trainers. This is TensorFlow's own engine (`tf.data.experimental.service`):

    python -m simsiam_tf.data_service dispatcher --port 5050 --work-dir /shared/dispatcher
    python -m simsiam_tf.data_service worker --dispatcher dispatcher-host:5050 --port 5051
    python train.py --dataset tfrecord:/shared/shards --data-service grpc://dispatcher-host:5050

What runs where:

- `ServiceInput.served_dataset` is the pipeline the workers run: a `Dataset.range` over
  the *units* of every epoch of the run plus one reserve epoch (a unit is a TFRecord
  shard, or a fixed random group of 64 files of a folder: `units` of the sources in
  `stream`, one dispatcher round trip each), each unit read,
  decoded at its crops and augmented exactly as `stream.StreamInput` does, with the
  crops of image i in epoch e drawn from (--seed, e, i). Units are visited in a new
  order every epoch, drawn from (--seed, epoch).
- The trainers register that pipeline under a name unique to the run (a resumed run
  registers a new one) and read it with dynamic sharding (`ShardingPolicy.DYNAMIC`): the
  dispatcher hands each unit to one worker, so every image of an epoch is delivered at
  most once, and exactly once when no worker fails. Workers never share a unit, so no
  two produce the same batch. Trainers of one multi-worker run share the job and take
  batches first come, first served.
- One stream spans the whole run: a trainer takes `steps_per_epoch` batches per epoch and
  never waits for the end of the job, so a worker that stops mid-epoch costs only the
  images it held (counted and logged, `ServiceDelivery`), and the reserve epoch keeps
  every trainer supplied to the last step.
- Views travel as uint8: the crops (`--augment-on device`), or the fully augmented
  views before normalisation (host), which `SimSiam.train_step` normalises on the
  device. A quarter of float32's bytes; benchmarks/data_service.py measures the cost.
- The dispatcher runs in fault-tolerant mode: it journals its state in --work-dir, and
  a restarted dispatcher recovers its jobs. A trainer that cannot reach it for
  `--data-service-grace` seconds stops with exit code 75 (`DispatcherWatchdog`); its last
  checkpoint is intact and `--resume` continues.

Undecodable files are skipped inside the service like anywhere else; there they are not
told apart from images lost with a stopped worker, and are counted as missed.
"""

from __future__ import annotations

import argparse
import os
import secrets
import signal
import socket
import sys
import threading
import time

import numpy as np

EXIT_DISPATCHER_LOST = 75  # EX_TEMPFAIL: a scheduler may retry the same command
# Units each worker reads at once, interleaved image by image so that a batch mixes
# units. The interleave is sequential (decoding, the costly part, runs in parallel
# after it) and there is no shuffle buffer: a worker then holds only these units, which
# bounds what a lost worker costs, and each image reaches the trainer soon after its
# unit was handed out (what `ServiceDelivery` relies on). A parallel interleave
# prefetches further units: measured, a worker killed after 100 images took ~1,500 of
# a 3,000-image stream with it.
INTERLEAVE = 4
CONNECT_WINDOW_S = 15  # how long a starting trainer waits for the dispatcher to answer
REGISTER_TIMEOUT_S = 10
HEARTBEAT_MS = 2000  # workers' heartbeats to the dispatcher


def split_target(target: str) -> tuple[str, str, int]:
    """'grpc://host:port' or 'host:port' -> ('grpc://host:port', host, port)."""
    from simsiam_tf.config import UsageError

    address = target.split("://", 1)[1] if "://" in target else target
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise UsageError(f"--data-service {target!r}: expected grpc://HOST:PORT, e.g. grpc://dispatcher-host:5050")
    return f"grpc://{host}:{port}", host, int(port)


def reachable(host: str, port: int, timeout: float = 2.0) -> bool:
    """Whether something accepts TCP connections at host:port."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def wait_for_dispatcher(target: str, window_s: float = CONNECT_WINDOW_S) -> str:
    """The dispatcher's grpc:// target once it accepts connections; UsageError naming
    the address if it does not within `window_s` (a dispatcher started at the same time
    as the trainers has that long to come up)."""
    from simsiam_tf.config import UsageError

    target, host, port = split_target(target)
    deadline = time.monotonic() + window_s
    while not reachable(host, port):
        if time.monotonic() > deadline:
            raise UsageError(
                f"--data-service: no tf.data service dispatcher answers at {host}:{port} (waited "
                f"{window_s:.0f} s); start one with: python -m simsiam_tf.data_service dispatcher --port {port} "
                "--work-dir DIR, or fix the address"
            )
        time.sleep(1.0)
    return target


def _with_timeout(fn, timeout_s: float, what: str):
    """fn() in a daemon thread: TensorFlow's service client retries a silent peer for an
    hour, and a daemon thread left waiting does not keep the process alive."""
    from simsiam_tf.config import UsageError

    result: dict = {}

    def call():
        try:
            result["value"] = fn()
        except Exception as e:  # reported below, in the caller's thread
            result["error"] = e

    thread = threading.Thread(target=call, daemon=True)
    thread.start()
    thread.join(timeout_s)
    if thread.is_alive():
        raise UsageError(f"{what} did not answer within {timeout_s:.0f} s; is it a tf.data service dispatcher?")
    if "error" in result:
        raise UsageError(f"{what} failed: {str(result['error']).splitlines()[0][:200]}")
    return result["value"]


def run_token(strategy) -> str:
    """A name for this launch of a run, the same on every trainer of a multi-worker run
    (the chief's random number, all-reduced) and new at every launch, so a resumed run
    gets a new job."""
    import tensorflow as tf

    from simsiam_tf import distribute

    token = secrets.randbits(40)
    if isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
        chief = distribute.is_chief(strategy)

        def share():
            ctx = tf.distribute.get_replica_context()
            mine = token if chief else 0
            value = tf.where(ctx.replica_id_in_sync_group == 0, tf.constant(float(mine), tf.float64), 0.0)
            return ctx.all_reduce(tf.distribute.ReduceOp.SUM, value)

        shared = strategy.experimental_local_results(strategy.run(share))[0]
        token = int(shared.numpy())
    return f"{token:010x}"


class ServiceInput:
    """A streaming input read through the tf.data service (same methods as
    `stream.StreamInput`, whose source, evaluation splits and preview it uses)."""

    kind = "service"

    def __init__(self, stream_input, target: str, job: str):
        from simsiam_tf.config import UsageError

        if not hasattr(stream_input.source, "units"):
            raise UsageError(
                f"--data-service reads folder: and tfrecord: datasets; {stream_input.name!r} is neither. "
                "Write it as TFRecord shards with prepare.py, or train without --data-service"
            )
        self.stream = stream_input
        self.source = stream_input.source
        self.target = target
        self.job = f"simsiam-{job}"
        self.name = f"{stream_input.name} via the tf.data service at {target.split('://', 1)[-1]}"
        self.num_train = stream_input.num_train
        self.skipped: list[str] = []
        self.class_names = stream_input.class_names
        self.has_knn_splits = stream_input.has_knn_splits
        self.has_val = stream_input.has_val
        self.image_size = stream_input.image_size
        self._delivered = None  # images received per epoch: a tf.Variable, made in pairs()

    def steps_per_epoch(self, global_batch: int, workers: int = 1) -> int:
        """Steps per epoch: the whole dataset's batches, whatever the number of trainers
        (they share one stream)."""
        return self.num_train // global_batch

    def skipped_in_training(self) -> int:
        return 0  # counted with the lost images: `delivered`

    def delivered(self, strategy=None):
        """Images received so far per data epoch (index = epoch - 1), as a numpy array:
        by all trainers together under MultiWorkerMirroredStrategy (a collective: every
        trainer must call it at the same point)."""
        import tensorflow as tf

        if self._delivered is None:
            return None
        counts = tf.cast(self._delivered.read_value(), tf.float64)  # exact to 2**53
        if isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
            local = len(strategy.extended.worker_devices)
            per_replica = strategy.experimental_distribute_values_from_function(
                lambda ctx: counts if ctx.replica_id_in_sync_group % local == 0 else tf.zeros_like(counts)
            )
            counts = strategy.reduce(tf.distribute.ReduceOp.SUM, per_replica, axis=None)
        return np.round(counts.numpy()).astype(np.int64)

    def reset_delivered(self) -> None:
        """Forget what was received before training began: Keras's fit() reads one batch
        to build the model from an iterator of its own, and a second iterator of a named
        job starts the stream again (a new iteration of the job)."""
        if self._delivered is not None:
            self._delivered.assign(np.zeros(self._delivered.shape, np.int64))

    def served_dataset(self, local_batch, spec, seed, epochs, initial_epoch=0, augment_on="host"):
        """The pipeline the service workers run: batches of (x1, x2, epoch, image id) over
        epochs initial_epoch..epochs-1 plus a reserve epoch, the views uint8."""
        import tensorflow as tf

        from simsiam_tf import stream

        count, unit_records = self.source.units(seed)
        first, last = initial_epoch * count, (epochs + 1) * count

        def unit(k):
            epoch = k // count
            order = tf.random.experimental.stateless_shuffle(
                tf.range(count, dtype=tf.int64), seed=stream._epoch_seed(seed, epoch, 1)
            )
            return unit_records(order[k % count]).map(lambda i, item: (epoch, i, item))

        def decode_chunk(epochs_, ids, items):
            def one(epoch, i, item):
                image_seed = tf.random.experimental.stateless_fold_in(stream._epoch_seed(seed, epoch, 0), i)
                # uint8 either way: the crops (device), or the augmented views before
                # normalisation (host), normalised in SimSiam.train_step on the device.
                x1, x2 = stream.image_views(self.source.load(item), image_seed, spec, augment_on, uint8_out=True)
                return x1, x2, tf.cast(epoch, tf.int32), tf.cast(i, tf.int32)

            # As in the streaming pipeline: an undecodable file drops out of its chunk only.
            return tf.data.Dataset.from_tensor_slices((epochs_, ids, items)).map(one).ignore_errors()

        return (
            tf.data.Dataset.range(first, last)
            .interleave(unit, cycle_length=min(INTERLEAVE, count), block_length=1)
            .batch(stream.DECODE_CHUNK)
            .interleave(decode_chunk, cycle_length=stream.DECODE_CYCLE, block_length=stream.DECODE_CHUNK,
                        num_parallel_calls=stream.DECODE_CYCLE, deterministic=False)
            .batch(local_batch, drop_remainder=True)
            .prefetch(1)
        )

    def connect(self, local_batch, spec, seed, epochs, initial_epoch=0, augment_on="host"):
        """Register the pipeline with the dispatcher (idempotent: every trainer of a run
        registers the same graph under the same id) and return the dataset id and spec."""
        import tensorflow as tf

        served = self.served_dataset(local_batch, spec, seed, epochs, initial_epoch, augment_on)
        dataset_id = _with_timeout(
            lambda: tf.data.experimental.service.register_dataset(
                self.target, served, compression=None, dataset_id=self.job
            ),
            REGISTER_TIMEOUT_S,
            f"registering the input pipeline with the dispatcher at {self.target}",
        )
        return dataset_id, served.element_spec

    def pairs(self, strategy, global_batch, spec, seed, epochs, initial_epoch=0, augment_on="host"):
        """Batches of two views for `strategy`, read from the service (`data.distribute_pairs`)."""
        import tensorflow as tf

        from simsiam_tf import data as data_lib
        from simsiam_tf import distribute

        workers = distribute.num_workers(strategy)
        dataset_id, element_spec = self.connect(global_batch // workers, spec, seed, epochs, initial_epoch, augment_on)
        self._delivered = tf.Variable(tf.zeros([epochs + 1], tf.int64), trainable=False, name="service_delivered")
        delivered, target, job = self._delivered, self.target, self.job

        def count(x1, x2, epoch, _):
            update = delivered.scatter_nd_add(tf.expand_dims(tf.cast(epoch, tf.int64), 1), tf.ones_like(epoch, tf.int64))
            with tf.control_dependencies([update]):
                return tf.identity(x1), tf.identity(x2)  # uint8: SimSiam.train_step normalises

        def make(worker, workers, local_batch):
            return (
                tf.data.experimental.service.from_dataset_id(
                    processing_mode=tf.data.experimental.service.ShardingPolicy.DYNAMIC,
                    service=target,
                    dataset_id=dataset_id,
                    element_spec=element_spec,
                    job_name=job,
                    max_outstanding_requests=4,  # at most four batches in flight per trainer
                )
                .map(count)
                .prefetch(1)
            )

        return data_lib.distribute_pairs(strategy, global_batch, make)

    def eval_images(self, split: str, limit: int = 0):
        return self.stream.eval_images(split, limit)

    def preview(self, spec, seed: int, count: int = 8):
        return self.stream.preview(spec, seed, count)


# ---------------------------------------------------------------------------
# The servers.


STOP_GRACE_SECONDS = 10.0


def _serve(server, describe: str) -> int:
    """Block until SIGTERM or SIGINT, then stop the server and return 0.

    TensorFlow's `stop()` can outlast a scheduler's patience (once more than 30 s, for a
    dispatcher just recovered from its journal, on a loaded machine), so after
    STOP_GRACE_SECONDS the process exits without waiting for it. That loses nothing:
    a fault-tolerant dispatcher journals every change before acting on it, being built
    to survive SIGKILL, and a worker holds only elements in flight, which the tf.data
    service already treats as lost when a worker goes away.
    """
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    print(describe, flush=True)
    while not stop.wait(1.0):
        pass
    stopping = threading.Thread(target=server.stop, daemon=True)
    stopping.start()
    stopping.join(STOP_GRACE_SECONDS)
    if stopping.is_alive():
        print(f"stopped (without waiting more than {STOP_GRACE_SECONDS:g} s for the server's own shutdown)", flush=True)
        os._exit(0)
    print("stopped", flush=True)
    return 0


def dispatcher_main(args) -> int:
    import tensorflow as tf

    svc = tf.data.experimental.service
    journal = os.path.join(args.work_dir, "tf_data_dispatcher_journal")
    recovering = os.path.isdir(journal) and bool(os.listdir(journal))
    os.makedirs(args.work_dir, exist_ok=True)
    server = svc.DispatchServer(
        svc.DispatcherConfig(
            port=args.port,
            work_dir=args.work_dir,
            fault_tolerant_mode=True,
            job_gc_timeout_ms=int(args.job_gc_timeout * 1000),
        )
    )
    port = int(server.target.rsplit(":", 1)[1])
    state = f"recovered its jobs from {journal}" if recovering else f"journal in {journal}"
    return _serve(
        server,
        f"tf.data service dispatcher serving grpc://{socket.getfqdn()}:{port} (fault-tolerant, {state}); "
        f"start workers with: python -m simsiam_tf.data_service worker --dispatcher {socket.getfqdn()}:{port}",
    )


def worker_main(args) -> int:
    import tensorflow as tf

    svc = tf.data.experimental.service
    target, host, port = split_target(args.dispatcher)
    deadline = time.monotonic() + args.wait
    while not reachable(host, port):
        if time.monotonic() > deadline:
            print(
                f"data_service worker: error: no dispatcher answers at {host}:{port} (waited {args.wait:.0f} s); "
                "start it first or fix --dispatcher",
                file=sys.stderr,
            )
            return 2
        time.sleep(1.0)
    advertised = args.worker_address or f"{socket.getfqdn()}:%port%"
    server = svc.WorkerServer(
        svc.WorkerConfig(
            dispatcher_address=f"{host}:{port}",
            worker_address=advertised,
            port=args.port,
            heartbeat_interval_ms=HEARTBEAT_MS,
        )
    )
    bound = server._address.rsplit(":", 1)[1]  # the port actually bound (--port 0 picks one)
    return _serve(
        server,
        f"tf.data service worker on {advertised.replace('%port%', bound)} (port {bound}), serving the "
        f"dispatcher at {host}:{port}: it runs SimSiam's input pipeline for any trainer using --data-service {target}",
    )


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m simsiam_tf.data_service",
        description="tf.data service servers for train.py --data-service (docs/multi_worker.md). "
        "Restarting either with the same command line is safe: the dispatcher recovers its jobs "
        "from --work-dir, and a worker simply registers again.",
    )
    sub = p.add_subparsers(dest="role", required=True)
    d = sub.add_parser("dispatcher", help="the coordinator: one per cluster")
    d.add_argument("--port", type=int, default=5050)
    d.add_argument("--work-dir", required=True, help="journal directory (shared or local disk) for fault tolerance")
    d.add_argument("--job-gc-timeout", type=float, default=600, help="seconds before a job nobody reads is dropped")
    w = sub.add_parser("worker", help="runs input pipelines: as many as the trainers need")
    w.add_argument("--dispatcher", required=True, help="HOST:PORT of the dispatcher")
    w.add_argument("--port", type=int, default=5051, help="port to serve on (0: any free port)")
    w.add_argument("--worker-address", help="HOST:PORT the trainers reach this worker at (default: this host's name)")
    w.add_argument("--wait", type=float, default=60, help="seconds to wait for the dispatcher at start")
    return p


def main(argv=None) -> int:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    args = build_parser().parse_args(argv)
    from simsiam_tf.config import UsageError

    try:
        return dispatcher_main(args) if args.role == "dispatcher" else worker_main(args)
    except UsageError as e:
        print(f"data_service {args.role}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
