"""A whole training run: data, model, optimiser, callbacks, fit, artefacts.

`train.py` parses flags into a `TrainConfig` and calls `run`; tests call `run` directly.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import sys
import time

import keras
import numpy as np
import tensorflow as tf

from simsiam_tf import augment as aug
from simsiam_tf import callbacks as cb
from simsiam_tf import data as data_lib
from simsiam_tf import distribute
from simsiam_tf import inputs
from simsiam_tf.diagnostics import probe as diag_probe
from simsiam_tf.diagnostics import projector
from simsiam_tf.config import OutOfMemory, TrainConfig, TrainingDiverged, UsageError, load_config, save_config
from simsiam_tf.rundir import LAST_DIR, RUNTIME_KEYS, check_logdir, continue_command
from simsiam_tf.model import build_model
from simsiam_tf.optim import make_optimizer


def check_disk_space(logdir: str, model: keras.Model) -> None:
    """Refuse to start when the disk cannot hold the checkpoints a run writes.

    Every epoch writes the model and optimizer state (weights plus momentum) to a
    temporary file beside the last one, and the best checkpoint may be rewritten too:
    about four copies of weights-and-momentum at peak, plus room for logs.
    """
    params = sum(int(np.prod(v.shape)) for v in model.weights)
    needed = 4 * (2 * 4 * params) + (16 << 20)
    existing = os.path.abspath(logdir)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    free = shutil.disk_usage(existing).free
    if free < needed:
        raise UsageError(
            f"only {free / 2**20:.0f} MiB free on the disk holding {logdir!r}; this run's checkpoints "
            f"need about {needed / 2**20:.0f} MiB; free some space or choose another --logdir"
        )


def check_batch(config: TrainConfig, num_train: int, replicas: int) -> None:
    if config.batch_size > num_train:
        raise UsageError(
            f"--batch-size {config.batch_size} is larger than the dataset's {num_train} "
            f"training images; use --batch-size {max(2, num_train // 2)} or less"
        )
    if config.batch_size % replicas:
        raise UsageError(
            f"--batch-size {config.batch_size} is not divisible by the {replicas} replicas; "
            f"use a multiple of {replicas}, e.g. {config.batch_size - config.batch_size % replicas or replicas}"
        )
    if config.batch_size // replicas < 2:
        raise UsageError(
            f"--batch-size {config.batch_size} leaves fewer than 2 images per replica; "
            "BatchNorm needs at least 2"
        )


def reporting_callbacks(
    config: TrainConfig,
    logdir: str,
    training_input,
    steps: int,
    initial_epoch: int,
    previous: dict | None,
    chief: bool,
) -> tuple[list[keras.callbacks.Callback], cb.RunSummary]:
    """The callbacks that measure and record a run, in the order they must run
    (see `callbacks`: each adds to the epoch's logs what the later ones record)."""
    previous = previous or {}
    spec = aug.AugmentSpec.for_image_size(config.image_size)
    knn = None
    if config.knn_every and training_input.has_knn_splits:
        bank = training_input.eval_images("train", config.knn_train_limit)
        test = training_input.eval_images("test")
        val = training_input.eval_images("val") if training_input.has_val else None
        num_classes = len(training_input.class_names) or None
        knn = cb.KnnMonitor(
            cb.KnnProbe(bank, test, config.image_size, config.knn_k, config.knn_temperature, num_classes, val),
            config.knn_every, config.epochs, initial_epoch, is_chief=chief,
            initial_top1=previous.get("knn_top1_init"),
        )
        if val is None and chief:
            print(
                "note: no validation split (--val-fraction 0, or a tfrecord: dataset whose index has none), so no "
                "best checkpoint is kept: the test split only measures, it never chooses; use checkpoints/last",
                file=sys.stderr,
            )
    elif config.knn_every:
        print(
            "note: kNN monitoring is skipped: it needs labelled train and test splits "
            "(PATH/train/<class>/* and PATH/test/<class>/*)",
            file=sys.stderr,
        )
    callbacks = [cb.EpochTimer(), cb.CollapseWarning(logdir, config.proj_dim, is_chief=chief)]
    if knn is not None:
        callbacks.append(knn)
    if knn is not None and training_input.has_val:
        callbacks.append(cb.BestCheckpoint(logdir, chief, previous))
    callbacks.append(cb.SkippedImages(training_input, previous.get("skipped_images", 0)))
    if config.diag_every:
        probe_images, _ = training_input.eval_images("train", config.diag_images).materialize()
        callbacks.append(diag_probe.DiagnosticsCallback(logdir, config, probe_images, steps, initial_epoch, is_chief=chief))
    view_pairs = training_input.preview(spec, config.seed) if chief else None
    callbacks.append(cb.TensorBoardLogger(logdir, steps, config.log_every_steps, view_pairs, knn, is_chief=chief))
    summary = cb.RunSummary(logdir, config, steps, knn, previous, is_chief=chief, input_kind=training_input.kind)
    callbacks.append(summary)
    return callbacks, summary


def run(
    config: TrainConfig,
    logdir: str,
    resume: bool = False,
    strategy: tf.distribute.Strategy | None = None,
    data: data_lib.ImageData | None = None,
    verbose="auto",
    extra_callbacks=(),
) -> dict:
    """Train SimSiam as `config` says, writing everything into `logdir`.

    `data` (tests) is an `ImageData` or a training input to use instead of loading
    `config.dataset`. Returns the summary dict that is also written to
    `logdir/summary.json`.

    Raises:
        UsageError: bad input, detected before anything is written.
    """
    started = time.time()
    if strategy is None:
        strategy = distribute.make_strategy(config.strategy, config.cpu_replicas)
    replicas = strategy.num_replicas_in_sync
    workers = distribute.num_workers(strategy)
    chief = distribute.is_chief(strategy)
    if config.precision == "auto":  # config.json records the precision actually used
        precision, reason = distribute.resolve_precision(config.precision, strategy)
        config = config.replace(precision=precision)
        if verbose and chief:
            print(f"precision: {precision} ({reason})", flush=True)
    if verbose and chief:
        print(distribute.onednn_state()[1], flush=True)
    if chief:  # other workers find the chief's files there: that is expected
        check_logdir(logdir, resume)
    if data is None:
        kind, reason = inputs.resolve_input(config)
        config = config.replace(input=kind)  # config.json records the input actually used
        if verbose and chief:
            print(f"input: {kind} ({reason})", flush=True)
        training_input = inputs.open_input(config, kind)
        if config.data_service:
            from simsiam_tf import data_service

            target = data_service.wait_for_dispatcher(config.data_service)
            training_input = data_service.ServiceInput(training_input, target, data_service.run_token(strategy))
            if verbose:  # every trainer: they all name the job they share
                print(f"input: through the tf.data service at {target} (job {training_input.job})", flush=True)
    else:
        training_input = data_lib.MemoryInput(data, config.image_size) if isinstance(data, data_lib.ImageData) else data
        config = config.replace(input=training_input.kind)
    if training_input.skipped:
        shown = ", ".join(training_input.skipped[:3])
        print(
            f"warning: skipped {len(training_input.skipped)} file(s) that could not be decoded: {shown}"
            + (" ..." if len(training_input.skipped) > 3 else ""),
            file=sys.stderr,
        )
    check_batch(config, training_input.num_train, replicas)
    steps = training_input.steps_per_epoch(config.batch_size, workers)
    if steps < 1:
        raise UsageError(
            f"--batch-size {config.batch_size} is larger than the images each of the {workers} workers reads "
            "per epoch; use a smaller --batch-size"
        )

    keras.utils.set_random_seed(config.seed)
    with strategy.scope():
        model = build_model(config, sync_bn=replicas > 1)
        model.rank1_logs = isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy)
        model.compile(optimizer=make_optimizer(model, config, steps), jit_compile=False)
        model.optimizer.build(model.trainable_variables)
    check_disk_space(logdir, model)

    restore_dir = backup_dir = os.path.join(logdir, LAST_DIR)
    if not chief:
        backup_dir = os.path.join(logdir, "checkpoints", f"last-{distribute.worker_id(strategy)}")
    initial_epoch = cb.completed_epochs(restore_dir) if resume else 0
    previous = None
    summary_path = os.path.join(logdir, "summary.json")
    if resume and os.path.exists(summary_path):
        with open(summary_path) as f:
            previous = json.load(f)
        # The summary may run ahead of the last complete backup by an epoch.
        previous["history"] = [h for h in previous.get("history", []) if h["epoch"] <= initial_epoch]
    if initial_epoch >= config.epochs:
        print(f"{logdir}: all {config.epochs} epochs are already done", flush=True)
        return previous or {}

    spec = aug.AugmentSpec.for_image_size(config.image_size)
    accelerated = tf.config.list_physical_devices("GPU") or isinstance(strategy, tf.distribute.TPUStrategy)
    if config.augment_on == "device" and not accelerated and verbose and chief:
        print(
            "note: --augment-on device runs the colour steps inside train_step on the CPU, after the input "
            "pipeline's work instead of beside it; without a GPU or TPU, --augment-on host is as fast or "
            "faster (docs/data.md)",
            file=sys.stderr,
        )
    # Made before anything is written: with --data-service this registers the pipeline,
    # which fails with one line if the dispatcher does not answer.
    pairs = training_input.pairs(
        strategy, config.batch_size, spec, config.seed, config.epochs, initial_epoch, config.augment_on
    )
    if chief:
        os.makedirs(logdir, exist_ok=True)
        config_path = os.path.join(logdir, "config.json")
        if not resume:
            save_config(config, config_path)
        else:
            # --resume --lr/--batch-size (rundir.resolve_resume): the run's config now.
            # Where the input came from stays as it was recorded.
            recorded = load_config(config_path)
            if recorded.resume_changes != config.resume_changes:
                save_config(config.replace(**{k: getattr(recorded, k) for k in RUNTIME_KEYS}), config_path)
    reporting, monitor = reporting_callbacks(config, logdir, training_input, steps, initial_epoch, previous, chief)
    if training_input.kind == "service":
        # Before the callbacks that record the epoch's logs (TensorBoard, summary.json).
        at = next(i for i, c in enumerate(reporting) if isinstance(c, cb.TensorBoardLogger))
        missed_before = (previous or {}).get("images_missed", 0)
        reporting.insert(at, cb.ServiceDelivery(training_input, initial_epoch, missed_before, chief))
        reporting.insert(0, cb.DispatcherWatchdog(training_input.target, config.data_service_grace, backup_dir, logdir))
    # The guard runs first, so a NaN step is flagged before anything saves; the progress
    # bar prints each epoch's training logs before the reporting callbacks add theirs.
    # The backup is restored before anything evaluates the model and saved after the
    # summary is written, so on resume the summary is never an epoch behind it.
    backup = cb.AtomicBackupAndRestore(backup_dir, restore_dir)
    callbacks = [
        cb.DivergenceGuard(), backup, _ScheduleAtEpoch(initial_epoch, steps), keras.callbacks.ProgbarLogger(),
        *reporting, cb.SaveBackup(backup), *extra_callbacks,
    ]
    if verbose == "auto":
        verbose = 1 if sys.stdout.isatty() else 2
    print(
        f"Training {'SimCLR' if config.method == 'simclr' else 'SimSiam'} ({config.preset} preset) on {training_input.name}: {training_input.num_train:,} images, "
        f"{steps} steps/epoch, epochs {initial_epoch + 1}-{config.epochs}, global batch {config.batch_size} "
        f"on {replicas} replica(s), lr {config.lr:g}, logdir {logdir}",
        flush=True,
    )
    try:
        model.fit(
            pairs,
            epochs=config.epochs,
            initial_epoch=initial_epoch,
            steps_per_epoch=steps,
            callbacks=callbacks,
            verbose=verbose,
            shuffle=False,  # the pipelines order batches themselves, from the seed
        )
    except OSError as e:
        if e.errno != errno.ENOSPC and "No space left" not in str(e):
            raise
        raise UsageError(
            f"the disk holding {logdir!r} is full; the last complete checkpoint "
            f"(epoch {cb.completed_epochs(backup_dir)}) is intact in {backup_dir}. Free space, then "
            f"continue with --resume {logdir}"
        )
    except tf.errors.DataLossError as e:
        raise UsageError(_damaged_data_message(training_input, e, backup_dir, logdir))
    except (tf.errors.ResourceExhaustedError, MemoryError) as e:
        raise OutOfMemory(out_of_memory_message(config, replicas, logdir, cb.completed_epochs(restore_dir), e))

    if model.diverged:
        d = model.diverged
        done = cb.completed_epochs(restore_dir)
        kept = (
            f"the last good checkpoint (epoch {done}) is in {backup_dir}" if done
            else "no epoch had completed, so it starts again from epoch 1"
        )
        raise TrainingDiverged(
            f"training diverged: the loss became {d['loss']} at step {d['step']} (epoch {d['epoch']}) and "
            f"training stopped; {kept}. Continue at half the learning rate with: "
            f"{continue_command(logdir, lr=config.base_lr / 2)} (or check the data)"
        )
    if chief and config.projector_images and training_input.has_knn_splits:
        images, labels = training_input.eval_images("test", config.projector_images).materialize()
        projector.write_projector(
            os.path.join(logdir, "tb"), model.backbone, images, labels,
            training_input.class_names, config.image_size, config.projector_images,
        )
    summary = monitor.summary
    if summary.get("knn_top1") is not None:
        selected = ""
        if summary.get("knn_top1_val_selected") is not None:
            selected = (
                f"; {summary['knn_top1_val_selected']:.4f} for the checkpoint chosen on the validation split "
                f"(epoch {summary['knn_best_epoch']}, checkpoints/best)"
            )
        print(
            f"kNN top-1 on the test split: {summary['knn_top1_init']:.4f} before training, {summary['knn_top1']:.4f} "
            f"for the last model (epoch {summary['epochs_completed']}){selected}; "
            f"{(time.time() - started) / 60:.1f} min",
            flush=True,
        )
    return summary


class _ScheduleAtEpoch(keras.callbacks.Callback):
    """After the backup is restored: the optimizer's step count at `initial_epoch` in
    steps of this launch. The per-epoch cosine reads the epoch from that count, and a
    `--resume --batch-size` changes the steps per epoch; otherwise this changes nothing."""

    def __init__(self, initial_epoch: int, steps: int):
        super().__init__()
        self.step = initial_epoch * steps

    def on_train_begin(self, logs=None):
        iterations = self.model.optimizer.iterations
        if int(iterations.numpy()) != self.step:
            iterations.assign(self.step)


def out_of_memory_message(config: TrainConfig, replicas: int, logdir: str, completed: int, error) -> str:
    """One line for a step that ran out of memory: a batch that fits, and the command."""
    per_replica = config.batch_size // replicas
    what = str(error).splitlines()[0][:120] if str(error) else type(error).__name__
    head = (
        f"out of memory at global batch {config.batch_size} ({per_replica} per replica on {replicas} replica(s)) "
        f"({what})"
    )
    if per_replica // 2 < 2:
        return (
            f"{head}; the batch is already at its smallest (BatchNorm needs 2 images per replica): start a new run "
            f"with a smaller --image-size or --width, or on a machine with more memory"
        )
    smaller = (per_replica // 2) * replicas
    kept = f"epoch {completed} is kept in {os.path.join(logdir, LAST_DIR)}" if completed else "no epoch had completed"
    return (
        f"{head}; {kept}. Continue with a smaller batch (the learning rate follows it, lr = base lr x batch / 256): "
        f"{continue_command(logdir, batch_size=smaller)}, or start a new run with a smaller --image-size"
    )


def _damaged_data_message(training_input, error, backup_dir: str, logdir: str) -> str:
    """The one line for a TFRecord shard that breaks mid-run (TensorFlow's error does
    not name the file, so the shards are read to find it)."""
    from simsiam_tf import records

    shards = getattr(training_input.source, "all_shards", lambda: [])() if hasattr(training_input, "source") else []
    damaged = records.find_damaged_shards(shards) if shards else []
    what = (
        "damaged TFRecord shard(s): " + "; ".join(f"{path} ({msg})" for path, msg in damaged)
        if damaged
        else f"damaged input data ({str(error).splitlines()[0][:160]})"
    )
    return (
        f"{what}. The last complete checkpoint (epoch {cb.completed_epochs(backup_dir)}) is intact in "
        f"{backup_dir}; rewrite or remove the shard (prepare.py), then continue with --resume {logdir}"
    )
