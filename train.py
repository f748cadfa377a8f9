"""Train SimSiam.

    python train.py                                    # offline digits, < 10 min on 2 cores
    python train.py --dataset folder:data/cifar10 --strategy mirrored
    python train.py --dataset cifar10 --data-dir ~/tensorflow_datasets
    python prepare.py --src PHOTOS --out shards && python train.py --dataset tfrecord:shards --preset imagenet
    python train.py --resume runs/20261128-034500      # continue a killed run

Each run writes config.json, summary.json, TensorBoard events (tb/) and checkpoints
into --logdir (default runs/<timestamp>). Bad input exits with code 2 and one line
naming the problem.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from simsiam_tf import tf_quiet  # no TensorFlow: bad arguments fail at once
from simsiam_tf.cli import Parser


def _positive_int(text):
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}")
    return value


def _number(text):
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}")


def _micro_batch(text):
    if text in ("auto", "off"):
        return text
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected auto, off or a whole number, got {text!r}")
    if value < 2:
        raise argparse.ArgumentTypeError(f"a micro-batch needs at least 2 images (BatchNorm), got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = Parser(
        prog="train.py",
        description="Self-supervised SimSiam pretraining (Chen & He, 2021) with TensorFlow and Keras.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    # Flags default to None so that the preset fills what the user did not say, and a
    # resumed run can tell which flags were given explicitly.
    p.add_argument(
        "--dataset",
        help="digits (default, offline), folder:PATH, tfrecord:GLOB (shards from prepare.py), "
        "or a tensorflow-datasets name such as cifar10",
    )
    p.add_argument("--data-dir", help="tensorflow-datasets data_dir")
    p.add_argument(
        "--preset",
        help="digits, cifar or imagenet (default: chosen from --dataset; a folder's images, or --image-size, "
        "of at most 64 px get cifar, larger imagenet; printed)",
    )
    p.add_argument("--epochs", type=_positive_int)
    p.add_argument("--batch-size", type=_positive_int, help="global batch, split across replicas")
    p.add_argument(
        "--micro-batch",
        type=_micro_batch,
        help="auto (default: measure one step's memory before training; if the global batch does not fit, "
        "accumulate the gradients of the largest micro-batch that fits, same update), off (never accumulate: "
        "exit 4 naming the largest batch that fits), or N: global micro-batch, a divisor of --batch-size. "
        "docs/gpu.md",
    )
    p.add_argument("--lr", type=_number, help="base learning rate; the rate used is lr * batch-size / 256")
    p.add_argument("--weight-decay", type=_number)
    p.add_argument(
        "--fix-pred-lr",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="keep the predictor's lr constant (the imagenet preset's default; --no-fix-pred-lr turns it off)",
    )
    p.add_argument("--seed", type=_positive_int)
    p.add_argument("--logdir", help="run directory (default runs/<timestamp>)")
    p.add_argument("--strategy", help="default, mirrored, multi_worker or tpu")
    p.add_argument("--cpu-replicas", type=_positive_int, help="with --strategy mirrored and no GPU: split the CPU into N replicas")
    p.add_argument(
        "--precision",
        help="auto (default: bfloat16 where the hardware has it natively, float16 on GPUs of compute capability "
        "7.x, else float32), float32, bfloat16 or float16 (mixed precision, float16 with dynamic loss scaling; "
        "loss and outputs stay float32). Accuracy and speed: docs/performance.md",
    )
    p.add_argument(
        "--xla",
        help="auto (default: on for GPUs and TPUs, off on CPUs, where it is slower), on or off: compile the "
        "train step with XLA. May change on --resume",
    )
    p.add_argument("--resume", nargs="?", const=True, metavar="RUN_DIR", help="continue the run in RUN_DIR (or --logdir) from its last completed epoch; where RUN_DIR holds no run yet, start it there (one command line for a job a scheduler may restart)")
    p.add_argument("--no-stop-gradient", dest="stop_gradient", action="store_const", const=False, help="the paper's ablation: collapses")
    p.add_argument("--method", help="simsiam (default), or simclr: the contrastive baseline (NT-Xent, no predictor) in the same harness")
    p.add_argument("--temperature", type=_number, help="with --method simclr: NT-Xent's temperature (default 0.5)")
    p.add_argument("--backbone", help="resnet18 (CIFAR variant) or resnet50")
    p.add_argument("--width", type=_positive_int, help="channels of the backbone's first stage (64 in the paper)")
    p.add_argument("--image-size", type=_positive_int, help="training size in px (the preset's by default)")
    p.add_argument(
        "--proj-dim",
        type=_positive_int,
        help="output dimension of the projector (and of the predictor); the projector's hidden width follows "
        "it unless --proj-hidden-dim is given, the predictor's bottleneck a quarter of it unless --pred-dim is "
        "given (the paper's 2048/512)",
    )
    p.add_argument(
        "--proj-hidden-dim",
        type=_positive_int,
        help="width of the projector's hidden fc layers (the preset's; the paper's 2048, the official code's the "
        "backbone's feature dimension)",
    )
    p.add_argument("--pred-dim", type=_positive_int, help="the predictor's hidden (bottleneck) dimension")
    p.add_argument("--knn-every", type=_positive_int, help="kNN monitor every N epochs (0 = off)")
    p.add_argument("--knn-bank-size", dest="knn_train_limit", type=_positive_int, help="cap the kNN feature bank (0 = whole train split)")
    p.add_argument("--diag-every", type=_positive_int, help="representation diagnostics every N epochs (0 = off)")
    p.add_argument(
        "--projector-images",
        type=_positive_int,
        help="TensorBoard projector files for up to N test images at the end of training (default 2000; 0 = off)",
    )
    p.add_argument(
        "--train-limit",
        type=_positive_int,
        metavar="N",
        help="use a fixed random subset of N images of the training split (0 = all). --val-fraction of them "
        "(per class, rounded) is then held out for validation, unless the dataset has its own validation split, "
        "so fewer than N train; the start line prints how many",
    )
    p.add_argument(
        "--val-fraction",
        type=_number,
        help="hold this fixed, stratified part of the labelled training split out as the validation split, on "
        "which kNN chooses checkpoints/best (default 0.1; a TFDS dataset's own validation split where it has one; "
        "0 = none)",
    )
    p.add_argument(
        "--input",
        help="auto (default: memory when the dataset fits half this machine's memory and trains below 96 px, "
        "else stream), memory (decode once, hold in memory) or stream (read from disk every epoch; "
        "crops at full resolution). See docs/data.md",
    )
    p.add_argument(
        "--augment-on",
        dest="augment_on",
        help="host (default: the whole augmentation in tf.data) or device (tf.data decodes and crops; "
        "flip, colour, blur and normalisation run in train_step on each replica's device)",
    )
    p.add_argument(
        "--data-service",
        dest="data_service",
        metavar="grpc://HOST:PORT",
        help="read the input through the tf.data service whose dispatcher is at HOST:PORT "
        "(python -m simsiam_tf.data_service; docs/multi_worker.md)",
    )
    p.add_argument(
        "--data-service-grace",
        dest="data_service_grace",
        type=_number,
        metavar="SECONDS",
        help="with --data-service: stop (exit code 75, checkpoint intact) when the dispatcher has been "
        "unreachable this long (default 60)",
    )
    p.add_argument(
        "--data-service-wire",
        dest="data_service_wire",
        metavar="{uint8,snappy,jpeg}",
        help="with --data-service: how batches cross the network: uint8 (default: as they are), snappy "
        "(compressed by the service) or jpeg (each view a JPEG, decoded on the trainer); docs/multi_worker.md",
    )
    return p


FLAG_KEYS = (
    "dataset", "data_dir", "epochs", "batch_size", "weight_decay", "fix_pred_lr", "seed",
    "strategy", "cpu_replicas", "precision", "xla", "stop_gradient", "backbone", "width",
    "image_size", "knn_every", "knn_train_limit", "train_limit", "val_fraction", "diag_every", "input", "augment_on",
    "data_service", "data_service_grace", "data_service_wire", "method", "temperature", "proj_dim", "proj_hidden_dim", "pred_dim", "projector_images",
)


def explicit_overrides(args) -> dict:
    """The config keys the command line sets, by TrainConfig name; unset flags are absent."""
    explicit = {k: getattr(args, k) for k in FLAG_KEYS if getattr(args, k) is not None}
    if args.lr is not None:
        explicit["base_lr"] = args.lr
    if args.micro_batch == "auto":
        explicit["fit_memory"] = "accumulate"
    elif args.micro_batch is not None:  # off, or a number: measured, never changed
        explicit["fit_memory"] = "check"
        explicit["micro_batch"] = 0 if args.micro_batch == "off" else args.micro_batch
    if args.proj_dim and args.pred_dim is None:
        explicit["pred_dim"] = max(1, args.proj_dim // 4)  # the paper's 2048 -> 512 bottleneck
    return explicit


# 75 (EX_TEMPFAIL) also when the tf.data service's dispatcher is lost (input.service).
EXIT_CODES = {"usage": 2, "diverged": 3, "out_of_memory": 4, "input_shortfall": 75, "interrupted": 130}


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    run = {"logdir": None, "existed": True}  # filled in once known: what a Ctrl-C message names
    try:
        return _main(argv, run)
    except KeyboardInterrupt:
        return _interrupted(argv, run["logdir"], run["existed"])


def _interrupted(argv, logdir, existed) -> int:
    """Ctrl-C: the command that continues the run, or, with nothing saved, starts it again."""
    import shlex

    from simsiam_tf.rundir import LAST_DIR, completed_epochs, continue_command

    if logdir and os.path.isfile(os.path.join(logdir, "config.json")):
        done = completed_epochs(os.path.join(logdir, LAST_DIR))
        kept = f"epoch {done} is kept" if done else "no epoch had completed (it starts again from epoch 1)"
        print(f"\ntrain.py: interrupted; {kept}; continue with: {continue_command(logdir)}", file=sys.stderr)
    else:
        if logdir and not existed and os.path.isdir(logdir) and not os.listdir(logdir):
            os.rmdir(logdir)  # made by this command and still empty: leave nothing behind
        print(
            "\ntrain.py: interrupted before anything was saved; start again with: "
            + shlex.join(["python", "train.py", *argv]),
            file=sys.stderr,
        )
    return EXIT_CODES["interrupted"]


def _out_of_memory_outside_a_step(argv, logdir, error) -> str:
    """Out of memory while loading the data or building the model (a step's own is
    training.out_of_memory_message)."""
    import shlex

    from simsiam_tf.rundir import continue_command

    what = (str(error).splitlines() or [type(error).__name__])[0][:120]
    if logdir and os.path.isfile(os.path.join(logdir, "config.json")):
        again = "continue with a smaller --batch-size or --image-size: " + continue_command(logdir)
    else:
        again = "start again with a smaller --batch-size or --image-size: " + shlex.join(["python", "train.py", *argv])
    return f"out of memory while loading the data or building the model ({what}); use --input stream (docs/data.md), or {again}"


def _main(argv, run) -> int:
    args = build_parser().parse_args(argv)
    from simsiam_tf.config import make_config
    from simsiam_tf.errors import InputShortfall, OutOfMemory, TrainingDiverged, UsageError

    explicit = explicit_overrides(args)
    try:
        resume = bool(args.resume)
        if resume:
            logdir = args.resume if isinstance(args.resume, str) else args.logdir
            if not logdir:
                raise UsageError("--resume needs the run directory: --resume RUN_DIR")
            if not os.path.exists(os.path.join(logdir, "config.json")) and not (
                os.path.isdir(logdir) and os.listdir(logdir)
            ):
                # One command line that starts a run and continues it: what a scheduler
                # that requeues a preempted job (Slurm, a Kubernetes Job) needs.
                print(f"train.py: no run in {logdir} yet; starting it there (--resume continues it later)", flush=True)
                resume = False
        if resume:
            if args.preset is not None:
                explicit["preset"] = args.preset
            from simsiam_tf.rundir import resolve_resume

            config = resolve_resume(logdir, explicit)
        else:
            explicit.setdefault("precision", "auto")
            explicit.setdefault("fit_memory", "accumulate")
            explicit.setdefault("xla", "auto")
            preset = args.preset
            if preset is None:  # from what the images are; a resumed run keeps its saved one
                from simsiam_tf.config import choose_preset

                preset, why = choose_preset(explicit.get("dataset") or "digits", explicit.get("image_size"))
                print(f"preset: {preset} ({why})", flush=True)
            config = make_config(preset, **explicit)
            if not args.resume:
                logdir = args.logdir or os.path.join("runs", time.strftime("%Y%m%d-%H%M%S"))
        from simsiam_tf.rundir import check_logdir, tf_config_is_chief

        run["logdir"], run["existed"] = logdir, os.path.exists(logdir)
        if config.strategy != "multi_worker" or tf_config_is_chief():
            check_logdir(logdir, resume=resume)
        from simsiam_tf.input.catalog import parse_dataset, require_folder

        dataset = parse_dataset(config.dataset)
        if dataset.kind == "folder":  # a wrong path fails here, not after TensorFlow's import
            require_folder(dataset.location)
        tf_quiet.import_tensorflow()  # only for a valid command
        from simsiam_tf import training

        training.run(config, logdir, resume=resume)
    except UsageError as e:
        print(f"train.py: error: {e}", file=sys.stderr)
        return 2
    except TrainingDiverged as e:
        print(f"train.py: error: {e}", file=sys.stderr)
        return EXIT_CODES["diverged"]
    except OutOfMemory as e:
        print(f"train.py: error: {e}", file=sys.stderr)
        return EXIT_CODES["out_of_memory"]
    except InputShortfall as e:
        print(f"train.py: error: {e}", file=sys.stderr)
        return EXIT_CODES["input_shortfall"]
    except Exception as e:  # TensorFlow's ResourceExhaustedError, without importing TensorFlow here
        if not isinstance(e, MemoryError) and type(e).__name__ != "ResourceExhaustedError":
            raise
        print(f"train.py: error: {_out_of_memory_outside_a_step(argv, run['logdir'], e)}", file=sys.stderr)
        return EXIT_CODES["out_of_memory"]
    return 0


if __name__ == "__main__":
    sys.exit(main())
