"""A whole training run: input, model, optimiser, callbacks, fit, artefacts.

`train.py` parses flags into a `TrainConfig` and calls `run`; tests call `run` directly.
The input is used only through its contract (`input.contract.TrainingInput`).
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
from simsiam_tf import checkpoints, distribute
from simsiam_tf import input as input_lib
from simsiam_tf.config import (
    InputShortfall, OutOfMemory, TrainConfig, TrainingDiverged, UsageError, load_config, save_config,
)
from simsiam_tf.diagnostics import knn, projector
from simsiam_tf.diagnostics import probe as diag_probe
from simsiam_tf.input import contract
from simsiam_tf.input.contract import RunContext
from simsiam_tf.model import build_model
from simsiam_tf.optim import make_optimizer
from simsiam_tf.rundir import LAST_DIR, RUNTIME_KEYS, check_logdir, completed_epochs, continue_command


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
    if config.micro_batch and (config.micro_batch % replicas or config.micro_batch // replicas < 2):
        raise UsageError(
            f"--micro-batch {config.micro_batch} must be a multiple of the {replicas} replicas with at least 2 "
            "images per replica (BatchNorm normalises each micro-batch)"
        )


def reporting_callbacks(config: TrainConfig, training_input, steps: int, run: RunContext) -> list[keras.callbacks.Callback]:
    """The callbacks that watch and record a run, in the order they must run: each adds
    to the epoch's logs what the later ones record (TensorBoard, summary.json)."""
    spec = aug.AugmentSpec.for_image_size(config.image_size)
    knn_monitor = None
    if config.knn_every and contract.can_monitor_knn(training_input):
        val = training_input.eval_split("val") if contract.labelled(training_input, "val") else None
        probe = knn.KnnProbe(
            training_input.eval_split("train", config.knn_train_limit), training_input.eval_split("test"),
            config.image_size, config.knn_k, config.knn_temperature, len(training_input.class_names) or None, val,
        )
        knn_monitor = cb.KnnMonitor(probe, config.knn_every, config.epochs, run.initial_epoch, is_chief=run.chief,
                                    initial_top1=run.previous.get("knn_top1_init"))
        if val is None and run.chief:
            print(
                "note: no validation split (--val-fraction 0, or a dataset without labels to stratify by), so no "
                "best checkpoint is kept: the test split only measures, it never chooses; use checkpoints/last",
                file=sys.stderr,
            )
    elif config.knn_every:
        print(
            "note: kNN monitoring is skipped: it needs labelled train and test splits "
            "(PATH/train/<class>/* and PATH/test/<class>/*)",
            file=sys.stderr,
        )
    callbacks = [cb.EpochTimer(), cb.CollapseWarning(run.logdir, config.proj_dim, is_chief=run.chief)]
    if knn_monitor is not None:
        callbacks.append(knn_monitor)
        if knn_monitor.probe.queries.get("val") is not None:
            callbacks.append(checkpoints.BestCheckpoint(run.logdir, run.chief, run.previous))
    if config.diag_every:
        probe_images, _ = training_input.eval_split("train", config.diag_images).materialize()
        callbacks.append(
            diag_probe.DiagnosticsCallback(run.logdir, config, probe_images, steps, run.initial_epoch, is_chief=run.chief)
        )
    views = training_input.preview(spec, config.seed) if run.chief else None
    callbacks.append(cb.TensorBoardLogger(run.logdir, steps, config.log_every_steps, views, knn_monitor, is_chief=run.chief))
    callbacks.append(cb.RunSummary(run.logdir, config, steps, knn_monitor, run.previous, is_chief=run.chief,
                                   input_kind=training_input.kind))
    return callbacks


def open_training_input(config: TrainConfig, strategy, announce):
    """The run's input (`input.open_input`, through the tf.data service with
    --data-service), and the config recording the input it is."""
    training_input, kind = input_lib.open_input(config, announce)
    if config.data_service:
        training_input = input_lib.through_service(training_input, config, strategy, print)
    if training_input.skipped:
        shown = ", ".join(training_input.skipped[:3])
        print(
            f"warning: skipped {len(training_input.skipped)} file(s) that could not be decoded: {shown}"
            + (" ..." if len(training_input.skipped) > 3 else ""),
            file=sys.stderr,
        )
    return training_input, config.replace(input=kind)


def build(config: TrainConfig, strategy, steps: int) -> keras.Model:
    """The model, compiled with its optimizer, in `strategy`'s scope, seeded from config.seed."""
    keras.utils.set_random_seed(config.seed)
    accumulation = config.batch_size // config.micro_batch if config.micro_batch else 1
    with strategy.scope():
        # Accumulating, BatchNorm normalises each micro-batch on its replica
        # (TwoViewModel._accumulated_gradients); otherwise over the global batch.
        model = build_model(config, sync_bn=strategy.num_replicas_in_sync > 1 and accumulation == 1)
        model.accumulation_steps = accumulation
        model.rank1_logs = isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy)
        # jit_compile: XLA for the train step (resolve_xla: on for GPUs and TPUs).
        model.compile(optimizer=make_optimizer(model, config, steps), jit_compile=config.xla == "on")
        model.optimizer.build(model.trainable_variables)
    return model


def _previous_summary(logdir: str, resume: bool, initial_epoch: int) -> dict:
    """The summary of the run being resumed, up to its last complete backup ({} if none)."""
    path = os.path.join(logdir, "summary.json")
    if not (resume and os.path.exists(path)):
        return {}
    with open(path) as f:
        previous = json.load(f)
    # The summary may run ahead of the last complete backup by an epoch.
    previous["history"] = [h for h in previous.get("history", []) if h["epoch"] <= initial_epoch]
    return previous


def _write_config(config: TrainConfig, logdir: str, resume: bool) -> None:
    os.makedirs(logdir, exist_ok=True)
    path = os.path.join(logdir, "config.json")
    if not resume:
        save_config(config, path)
        return
    # --resume --lr/--batch-size (rundir.resolve_resume): the run's config now. Where
    # the input came from stays as it was recorded.
    recorded = load_config(path)
    if recorded.resume_changes != config.resume_changes:
        save_config(config.replace(**{k: getattr(recorded, k) for k in RUNTIME_KEYS}), path)


def run(
    config: TrainConfig,
    logdir: str,
    resume: bool = False,
    strategy: tf.distribute.Strategy | None = None,
    verbose="auto",
    extra_callbacks=(),
) -> dict:
    """Train as `config` says, writing everything into `logdir`; the summary dict that
    is also written to `logdir/summary.json`.

    Raises:
        UsageError: bad input, detected before anything is written.
        TrainingDiverged, OutOfMemory, InputShortfall: training stopped (the message
            says what to run next).
    """
    started = time.time()
    strategy = strategy or distribute.make_strategy(config.strategy, config.cpu_replicas)
    chief = distribute.is_chief(strategy)
    say = print if verbose and chief else (lambda *a, **k: None)
    config = _resolve_precision(config, strategy, say)
    if chief:  # other workers find the chief's files there: that is expected
        check_logdir(logdir, resume)
    training_input, config = open_training_input(config, strategy, lambda line: say(line, flush=True))
    steps = _steps_per_epoch(config, training_input, strategy)
    config = _fit_memory(config, strategy, logdir, resume)
    model = build(config, strategy, steps)
    check_disk_space(logdir, model)
    run_ctx = _run_context(config, logdir, resume, strategy)
    if run_ctx.initial_epoch >= config.epochs:
        print(f"{logdir}: all {config.epochs} epochs are already done", flush=True)
        return run_ctx.previous
    _note_device_augmentation(config, strategy, say)
    # Made before anything is written: through the tf.data service this registers the
    # pipeline, which fails with one line if the dispatcher does not answer.
    batches = training_input.batches(strategy, config.batch_size, aug.AugmentSpec.for_image_size(config.image_size),
                                     config.seed, config.epochs, run_ctx.initial_epoch, config.augment_on)
    if chief:
        _write_config(config, logdir, resume)
    reporting = reporting_callbacks(config, training_input, steps, run_ctx)
    callbacks, save = _callbacks(training_input, reporting, run_ctx, steps, extra_callbacks)
    print(_start_line(config, training_input, steps, run_ctx.initial_epoch, strategy, logdir), flush=True)
    if verbose == "auto":
        verbose = 1 if sys.stdout.isatty() else 2
    _fit(model, batches, config, run_ctx, steps, callbacks, training_input, verbose, strategy.num_replicas_in_sync)
    summary = next(c for c in reporting if isinstance(c, cb.RunSummary)).summary
    _check_complete(model, config, steps, save.cut_short, summary, run_ctx)
    if chief and config.projector_images and contract.can_monitor_knn(training_input):
        images, labels = training_input.eval_split("test", config.projector_images).materialize()
        projector.write_projector(os.path.join(logdir, "tb"), model.backbone, images, labels,
                                  training_input.class_names, config.image_size, config.projector_images)
    if summary.get("knn_top1") is not None:
        print(_final_line(summary, time.time() - started), flush=True)
    return summary


def _resolve_precision(config: TrainConfig, strategy, say) -> TrainConfig:
    """`--precision auto` and `--xla auto` made concrete (config.json records what is
    used); the XLA setting is said whether chosen or given."""
    if config.precision == "auto":
        precision, reason = distribute.resolve_precision(config.precision, strategy)
        config = config.replace(precision=precision)
        say(f"precision: {precision} ({reason})", flush=True)
    xla, reason = distribute.resolve_xla(config.xla, strategy)
    if config.xla == "auto":
        # `--resume --xla auto` records the change as what auto chose.
        changes = tuple(
            {**c, "xla": {**c["xla"], "to": xla}} if c.get("xla", {}).get("to") == "auto" else c
            for c in config.resume_changes
        )
        config = config.replace(xla=xla, resume_changes=changes)
    say(f"xla: {xla} for the train step ({reason})", flush=True)
    say(distribute.onednn_state()[1], flush=True)
    return config


def _fit_memory(config: TrainConfig, strategy, logdir: str, resume: bool) -> TrainConfig:
    """The micro-batch the batch needs to fit this machine's memory
    (`memory_fit.plan`), measured before anything is written; config.json records it.
    A resumed run keeps its micro-batch: if it no longer fits, the line says which
    `--resume --micro-batch` does (rundir.RESUMABLE_KEYS)."""
    if config.fit_memory == "off":
        return config
    from simsiam_tf import memory_fit

    replicas = strategy.num_replicas_in_sync
    checked, advise = config, None
    if resume:
        checked = config.replace(fit_memory="check")
        advise = lambda micro, batch: f"continue with {continue_command(logdir, micro_batch=micro)}"  # noqa: E731
    micro, line = memory_fit.plan(checked, replicas, replicas // distribute.num_workers(strategy), advise=advise)
    if distribute.is_chief(strategy):  # said as the start line is, whatever the verbosity
        print(line, flush=True)
    return config.replace(micro_batch=micro)


def _steps_per_epoch(config: TrainConfig, training_input, strategy) -> int:
    check_batch(config, training_input.num_train, strategy.num_replicas_in_sync)
    workers = distribute.num_workers(strategy)
    steps = training_input.steps_per_epoch(config.batch_size, workers)
    if steps < 1:
        raise UsageError(
            f"--batch-size {config.batch_size} is larger than the images each of the {workers} workers reads "
            "per epoch; use a smaller --batch-size"
        )
    return steps


def _run_context(config: TrainConfig, logdir: str, resume: bool, strategy) -> RunContext:
    """Where this process backs up (every worker its own copy; all restore the chief's),
    the epoch it starts at, and the summary it continues."""
    chief = distribute.is_chief(strategy)
    backup_dir = os.path.join(logdir, LAST_DIR)
    if not chief:
        backup_dir = os.path.join(logdir, "checkpoints", f"last-{distribute.worker_id(strategy)}")
    initial_epoch = completed_epochs(os.path.join(logdir, LAST_DIR)) if resume else 0
    return RunContext(logdir, backup_dir, initial_epoch, _previous_summary(logdir, resume, initial_epoch), chief,
                      config.data_service_grace)


def _callbacks(training_input, reporting, run: RunContext, steps: int, extra=()):
    """Every callback of a run in the order they must run, and the one that saves.

    The input's own callbacks come first (a watchdog, counters the loggers read), then
    the guard, so a NaN step is flagged before anything saves; the backup is restored
    before anything evaluates the model and saved after the summary is written, so on
    resume the summary is never an epoch behind it.
    """
    backup = checkpoints.AtomicBackupAndRestore(run.backup_dir, os.path.join(run.logdir, LAST_DIR))
    save = checkpoints.SaveBackup(backup, steps)
    return [
        *training_input.callbacks(run), cb.DivergenceGuard(), backup, _ScheduleAtEpoch(run.initial_epoch, steps),
        keras.callbacks.ProgbarLogger(), *reporting, save, *extra,
    ], save


def _start_line(config: TrainConfig, training_input, steps: int, initial_epoch: int, strategy, logdir: str) -> str:
    return (
        f"Training {'SimCLR' if config.method == 'simclr' else 'SimSiam'} ({config.preset} preset) on "
        f"{training_input.name}: {training_input.num_train:,} images, {steps} steps/epoch, epochs "
        f"{initial_epoch + 1}-{config.epochs}, global batch {config.batch_size}{_micro(config)} on "
        f"{strategy.num_replicas_in_sync} replica(s), lr {config.lr:g}, logdir {logdir}"
    )


def _micro(config: TrainConfig) -> str:
    if not config.micro_batch or config.micro_batch == config.batch_size:
        return ""
    return f" ({config.batch_size // config.micro_batch} accumulated micro-batches of {config.micro_batch})"


def _note_device_augmentation(config, strategy, say) -> None:
    accelerated = tf.config.list_physical_devices("GPU") or isinstance(strategy, tf.distribute.TPUStrategy)
    if config.augment_on == "device" and not accelerated:
        say(
            "note: --augment-on device runs the colour steps inside train_step on the CPU, after the input "
            "pipeline's work instead of beside it; without a GPU or TPU, --augment-on host is as fast or "
            "faster (docs/data.md)",
            file=sys.stderr,
        )


def _fit(model, batches, config, run: RunContext, steps, callbacks, training_input, verbose, replicas) -> None:
    """model.fit, with the failures it can meet turned into one-line errors."""
    restore_dir = os.path.join(run.logdir, LAST_DIR)
    try:
        model.fit(batches, epochs=config.epochs, initial_epoch=run.initial_epoch, steps_per_epoch=steps,
                  callbacks=callbacks, verbose=verbose, shuffle=False)  # the inputs order batches themselves
    except OSError as e:
        if e.errno != errno.ENOSPC and "No space left" not in str(e):
            raise
        raise UsageError(
            f"the disk holding {run.logdir!r} is full; the last complete checkpoint "
            f"(epoch {completed_epochs(run.backup_dir)}) is intact in {run.backup_dir}. Free space, then "
            f"continue with --resume {run.logdir}"
        )
    except tf.errors.DataLossError as e:
        raise UsageError(_damaged_data_message(training_input, e, run.backup_dir, run.logdir))
    except (tf.errors.ResourceExhaustedError, MemoryError) as e:
        raise OutOfMemory(out_of_memory_message(config, replicas, run.logdir, completed_epochs(restore_dir), e))


def _check_complete(model, config, steps, cut_short, summary, run: RunContext) -> None:
    """Raise TrainingDiverged or InputShortfall unless every step of the run was trained
    (`cut_short`: the epoch the input ended in, and the steps it trained, or None)."""
    logdir, backup_dir = run.logdir, run.backup_dir
    done = completed_epochs(os.path.join(logdir, LAST_DIR))
    if model.diverged:
        d = model.diverged
        kept = (
            f"the last good checkpoint (epoch {done}) is in {backup_dir}" if done
            else "no epoch had completed, so it starts again from epoch 1"
        )
        raise TrainingDiverged(
            f"training diverged: the loss became {d['loss']} at step {d['step']} (epoch {d['epoch']}) and "
            f"training stopped; {kept}. Continue at half the learning rate with: "
            f"{continue_command(logdir, lr=config.base_lr / 2)} (or check the data)"
        )
    if cut_short:  # the input ended early: Keras only warns
        epoch, step = cut_short
        missed = summary.get("images_missed")
        lost = f"; the tf.data service missed {missed:,} image(s) so far" if missed else ""
        raise InputShortfall(
            f"the input ran out of data after step {step} of the {steps} of epoch {epoch} (of {config.epochs}"
            f"{lost}); the checkpoint of epoch {done} is in {backup_dir}. Continue with: {continue_command(logdir)}"
        )


def _final_line(summary: dict, seconds: float) -> str:
    selected = ""
    if summary.get("knn_top1_val_selected") is not None:
        selected = (
            f"; {summary['knn_top1_val_selected']:.4f} for the checkpoint chosen on the validation split "
            f"(epoch {summary['knn_best_epoch']}, checkpoints/best)"
        )
    return (
        f"kNN top-1 on the test split: {summary['knn_top1_init']:.4f} before training, {summary['knn_top1']:.4f} "
        f"for the last model (epoch {summary['epochs_completed']}){selected}; {seconds / 60:.1f} min"
    )


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
    micro_per_replica = (config.micro_batch or config.batch_size) // replicas // 2
    same_batch = ""
    if config.method == "simsiam" and micro_per_replica >= 2 and per_replica % micro_per_replica == 0:
        same_batch = (
            f", or keep the global batch and accumulate it in micro-batches: "
            f"{continue_command(logdir, micro_batch=micro_per_replica * replicas)}"
        )
    return (
        f"{head}; {kept}. Continue with a smaller batch (the learning rate follows it, lr = base lr x batch / 256): "
        f"{continue_command(logdir, batch_size=smaller)}{same_batch}, or start a new run with a smaller --image-size"
    )


def _damaged_data_message(training_input, error, backup_dir: str, logdir: str) -> str:
    """The one line for a TFRecord shard that breaks mid-run (TensorFlow's error does
    not name the file, so the shards are read to find it)."""
    from simsiam_tf.input import records

    damaged = records.find_damaged_shards(training_input.shards()) if training_input.shards() else []
    what = (
        "damaged TFRecord shard(s): " + "; ".join(f"{path} ({msg})" for path, msg in damaged)
        if damaged
        else f"damaged input data ({str(error).splitlines()[0][:160]})"
    )
    return (
        f"{what}. The last complete checkpoint (epoch {completed_epochs(backup_dir)}) is intact in "
        f"{backup_dir}; rewrite or remove the shard (prepare.py), then continue with --resume {logdir}"
    )
