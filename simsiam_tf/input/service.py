"""The stream, read through the tf.data service: the input pipeline on other hosts.

When the trainers' own CPU cores cannot augment fast enough for their GPUs, the
streaming pipeline runs instead on CPU-only hosts (`python -m simsiam_tf.data_service
worker`) and streams finished batches to the trainers. It is TensorFlow's own engine
(`tf.data.experimental.service`), used as an option of the stream's reader, as the TF
Model Garden's InputReader does: the same sources, members, order, decode and batch
format as `stream.StreamInput`, whose evaluation splits it reads too.

- What the workers run (`served_dataset`): a `Dataset.range` over the *units* of every
  epoch of the run plus one reserve epoch (a unit is a TFRecord shard, or 64 files of a
  folder, regrouped every epoch: `sources.*.units`), in a new order every epoch; each
  worker shuffles the records of a unit the dispatcher hands it in a bounded buffer
  seeded from (seed, epoch, unit), interleaves four units, decodes each image at its
  crops and augments it as the stream does (image i of epoch e from
  `order.image_seed`), and sends uint8 batches (`batches`). The buffer never mixes two
  units, so an epoch's images never arrive after the next epoch's are under way.
- The trainers register that pipeline under a name unique to the launch (a resumed run
  registers a new one) and read it with dynamic sharding: the dispatcher hands each
  unit to one worker, so every image of an epoch is delivered at most once, and exactly
  once when no worker fails. Trainers of one multi-worker run share the job, first
  come, first served.
- One stream spans the whole run: a trainer takes `steps_per_epoch` batches per epoch
  and never waits for the end of the job, so a worker that stops mid-epoch costs only
  the images it held (counted and logged, `ServiceDelivery`), and the reserve epoch
  keeps every trainer supplied to the last step.
- The dispatcher journals its state (`data_service`); a trainer that cannot reach it
  for `--data-service-grace` seconds stops with exit code 75 (`DispatcherWatchdog`),
  its last checkpoint intact, and `--resume` continues.

Undecodable files are skipped inside the service like anywhere else; there they are not
told apart from images lost with a stopped worker, and are counted as missed.
"""

from __future__ import annotations

import secrets
import sys
import threading
import time

import keras
import numpy as np
import tensorflow as tf

from simsiam_tf import data_service
from simsiam_tf.errors import UsageError
from simsiam_tf.input import batches, decode, order, wire
from simsiam_tf.rundir import completed_epochs

# Units each worker reads at once, interleaved image by image so that a batch mixes
# units, each unit's records shuffled in a buffer of BUFFER. The interleave is
# sequential (decoding, the costly part, runs in parallel after it): a parallel
# interleave prefetches further units, and a worker holds only these units, which
# bounds what a lost worker costs (measured: a worker killed after 100 images took
# ~1,500 of a 3,000-image stream with it when it prefetched).
INTERLEAVE = 4
BUFFER = 256
CONNECT_WINDOW_S = 15  # how long a starting trainer waits for the dispatcher to answer
STALL_S = 60.0  # ServiceDelivery: no image of a data epoch for this long (and an epoch) = the rest missed
REGISTER_TIMEOUT_S = 10


def wait_for_dispatcher(target: str, window_s: float = CONNECT_WINDOW_S) -> str:
    """The dispatcher's grpc:// target once it accepts connections; UsageError naming
    the address if it does not within `window_s` (a dispatcher started at the same time
    as the trainers has that long to come up)."""
    target, host, port = data_service.split_target(target)
    deadline = time.monotonic() + window_s
    while not data_service.reachable(host, port):
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
    """A `stream.StreamInput` read through the tf.data service (`contract.TrainingInput`)."""

    kind = "service"

    def __init__(self, stream_input, target: str, job: str, wire_format: str = "uint8"):
        self.stream = stream_input
        self.wire = wire_format  # how batches cross the network (input.wire)
        self.source = stream_input.source
        self.target = target
        self.job = f"simsiam-{job}"
        self.name = f"{stream_input.name} via the tf.data service at {target.split('://', 1)[-1]}"
        self.num_train = stream_input.num_train
        self.class_names = stream_input.class_names
        self.skipped: list[str] = []
        self.image_size = stream_input.image_size
        self._delivered = None  # images received per epoch: a tf.Variable, made in batches()

    def steps_per_epoch(self, global_batch: int, workers: int = 1) -> int:
        """The whole dataset's batches, whatever the number of trainers (they share one stream)."""
        return self.num_train // global_batch

    def eval_split(self, name: str, limit: int = 0):
        return self.stream.eval_split(name, limit)

    def preview(self, spec, seed: int, count: int = 8):
        return self.stream.preview(spec, seed, count)

    def shards(self) -> list[str]:
        return self.stream.shards()

    def delivered(self, strategy=None):
        """Images received so far per data epoch (index = epoch - 1), as a numpy array:
        by all trainers together under MultiWorkerMirroredStrategy (a collective: every
        trainer must call it at the same point)."""
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
        """The pipeline the service workers run: (batch, epoch, image id) over epochs
        initial_epoch..epochs-1 plus a reserve epoch, the batch in the batch format."""
        source = self.source
        count, unit_records = source.units(self.stream.splits["train"].indices, seed)
        first, last = initial_epoch * count, (epochs + 1) * count

        def unit(k):
            epoch, u = k // count, k % count
            records = order.shuffle_buffer(unit_records(epoch, u), seed, epoch, BUFFER, stream=u)
            return records.map(lambda index, item, label: (epoch, index, item))

        per_image, per_batch = decode.view_stage(spec, augment_on)

        def views(epoch, index, item):
            parts = per_image(source.load(item), order.image_seed(seed, epoch, index))
            return parts, tf.cast(epoch, tf.int32), tf.cast(index, tf.int32)

        records = tf.data.Dataset.range(first, last).interleave(unit, cycle_length=min(INTERLEAVE, count), block_length=1)
        return (
            decode.decoded(records, views, deterministic=False)
            .batch(local_batch, drop_remainder=True)
            .map(lambda parts, epoch, index: (wire.pack(batches.pack(per_batch(parts)), self.wire), epoch, index))
            .prefetch(1)
        )

    def connect(self, local_batch, spec, seed, epochs, initial_epoch=0, augment_on="host"):
        """Register the pipeline with the dispatcher (idempotent: every trainer of a run
        registers the same graph under the same id); the dataset id and element spec."""
        served = self.served_dataset(local_batch, spec, seed, epochs, initial_epoch, augment_on)
        dataset_id = _with_timeout(
            lambda: tf.data.experimental.service.register_dataset(
                self.target, served, compression=wire.compression(self.wire), dataset_id=self.job
            ),
            REGISTER_TIMEOUT_S,
            f"registering the input pipeline with the dispatcher at {self.target}",
        )
        return dataset_id, served.element_spec

    def batches(self, strategy, global_batch, spec, seed, epochs, initial_epoch=0, augment_on="host"):
        from simsiam_tf import distribute

        workers = distribute.num_workers(strategy)
        dataset_id, element_spec = self.connect(global_batch // workers, spec, seed, epochs, initial_epoch, augment_on)
        self._delivered = tf.Variable(tf.zeros([epochs + 1], tf.int64), trainable=False, name="service_delivered")
        delivered, target, job = self._delivered, self.target, self.job
        wire_format, size = self.wire, spec.image_size

        def count(batch, epoch, _):
            batch = wire.unpack(batch, wire_format, size)
            update = delivered.scatter_nd_add(tf.expand_dims(tf.cast(epoch, tf.int64), 1), tf.ones_like(epoch, tf.int64))
            with tf.control_dependencies([update]):
                return tf.identity(batch)

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
                .map(count, num_parallel_calls=tf.data.AUTOTUNE if wire_format == "jpeg" else None)
                .prefetch(1)
            )

        return batches.distribute(strategy, global_batch, make)

    def callbacks(self, run) -> list:
        """The watchdog first (it guards every later step); the delivery count before
        the callbacks that record the epoch's logs."""
        return [
            DispatcherWatchdog(self.target, run.grace_s, run.backup_dir, run.logdir),
            ServiceDelivery(self, run.initial_epoch, run.previous.get("images_missed", 0), run.chief),
        ]


class ServiceDelivery(keras.callbacks.Callback):
    """Images the tf.data service did not deliver, per epoch of the data stream, as
    `logs["images_missed"]` (the run's total), with one warning line per short epoch.

    The service streams the whole run without breaks, so the images of a data epoch
    reach the trainer a little before or after the training epoch of the same number.
    A data epoch is counted once all its images have arrived, or once none of them has
    arrived for `stall_s` seconds and a whole training epoch while later ones did:
    images still on their way would have kept arriving. The time matters where epochs
    are short: after a link is cut and restored, each worker's connection comes back
    after its own gRPC back-off, and one worker can deliver a whole short epoch of later
    images before the other's last images of an earlier one (seen across emulated
    hosts). Missed images were held by a worker that stopped, or could not be decoded.
    """

    def __init__(self, service_input: ServiceInput, initial_epoch: int, previous: int = 0, is_chief: bool = True,
                 stall_s: float = STALL_S, clock=time.monotonic):
        super().__init__()
        self.input = service_input
        self.stall_s, self.clock = stall_s, clock
        self._changed_at = None  # per data epoch: when its count last changed
        self.next_epoch = initial_epoch  # the first data epoch not yet counted (0-based)
        self.first_epoch = initial_epoch
        self.previous = previous  # missed in earlier launches of the run
        self.missed = previous
        self.is_chief = is_chief
        self._before = None  # images received per data epoch at the previous epoch end

    def on_train_begin(self, logs=None):
        self.input.reset_delivered()

    def count_closed(self, strategy=None) -> list[tuple[int, int]]:
        """(data epoch, images received) of the data epochs that closed since the last call."""
        received = self.input.delivered(strategy)
        if received is None:
            return []
        now = self.clock()
        if self._changed_at is None:
            self._changed_at = np.full(len(received), now)
        elif self._before is not None:
            self._changed_at[received != self._before] = now
        closed = []
        while self.next_epoch < len(received) - 1:
            d = self.next_epoch
            complete = received[d] >= self.input.num_train
            stalled = (
                self._before is not None and received[d] == self._before[d] and received[d + 1:].sum() > 0
                and now - self._changed_at[d] >= self.stall_s
            )
            if not (complete or stalled):
                break
            closed.append((d, int(received[d])))
            self.next_epoch += 1
        self._before = received.copy()
        return closed

    def on_epoch_end(self, epoch, logs=None):
        total = self.input.num_train
        for data_epoch, got in self.count_closed(self.model.distribute_strategy):
            if got < total and self.is_chief:
                print(
                    f"\nwarning: the tf.data service delivered {got:,} of the {total:,} images of epoch "
                    f"{data_epoch + 1}: {total - got:,} missed (held by a service worker that stopped, or "
                    "undecodable); training went on with the rest",
                    file=sys.stderr,
                    flush=True,
                )
        if self._before is not None:
            # Counted from what has arrived by now, so that images of a closed epoch
            # that still arrive late (a worker slowed by a busy CPU, seen in a loaded
            # test run) are not left counted as missed.
            self.missed = self.previous + sum(
                max(0, total - int(self._before[d])) for d in range(self.first_epoch, self.next_epoch)
            )
        if logs is not None:
            logs["images_missed"] = self.missed


class DispatcherWatchdog(keras.callbacks.Callback):
    """Stops the process when the tf.data service dispatcher has been unreachable for
    `grace_s` seconds during training.

    Without its dispatcher the service hands out no new work and TensorFlow's client
    waits for it for an hour inside `fit`, where Python cannot interrupt it; a dispatcher
    back within the grace period (fault-tolerant mode recovers its jobs) lets training go
    on untouched. Otherwise the process prints one line and exits with code
    `data_service.EXIT_DISPATCHER_LOST`: checkpoints are written by rename, so the last
    one is intact, and `--resume` continues once the dispatcher is back.
    """

    def __init__(self, target: str, grace_s: float, backup_dir: str, logdir: str, poll_s: float = 2.0, exit=None):
        super().__init__()
        import os

        self.target, self.grace_s, self.poll_s = target, grace_s, poll_s
        self.backup_dir, self.logdir = backup_dir, logdir
        self._exit = exit or os._exit
        self._stop = threading.Event()
        self._thread = None

    def _watch(self):
        _, host, port = data_service.split_target(self.target)
        lost_since = None
        while not self._stop.wait(self.poll_s):
            if data_service.reachable(host, port):
                lost_since = None
                continue
            lost_since = lost_since or time.monotonic()
            if time.monotonic() - lost_since >= self.grace_s:
                print(
                    f"\ntrain.py: error: the tf.data service dispatcher at {host}:{port} has been unreachable "
                    f"for {self.grace_s:.0f} s; training stopped. The last complete checkpoint (epoch "
                    f"{completed_epochs(self.backup_dir)}) is intact in {self.backup_dir}. Restart the "
                    f"dispatcher with the same --work-dir, then run: python train.py --resume {self.logdir}",
                    file=sys.stderr,
                    flush=True,
                )
                sys.stdout.flush()
                self._exit(data_service.EXIT_DISPATCHER_LOST)
                return

    def on_train_begin(self, logs=None):
        self._stop.clear()
        self._thread = threading.Thread(target=self._watch, daemon=True, name="dispatcher-watchdog")
        self._thread.start()

    def on_train_end(self, logs=None):
        self._stop.set()
