"""One frozen configuration per run, with named presets.

Every run writes its resolved `TrainConfig` to `config.json`; `load_config` reads it back
and rejects unknown keys, so a mistyped or stale key fails loudly instead of being
ignored.
"""

from __future__ import annotations

import dataclasses
import json
import re
import os
import tempfile
from typing import Any

# The run's failures, each with its exit code in train.py (errors.py says which).
from simsiam_tf.errors import InputShortfall, OutOfMemory, TrainingDiverged, UsageError  # noqa: F401


BACKBONES = ("resnet18", "resnet50")
METHODS = ("simsiam", "simclr")
# bfloat16 and float16: Keras mixed precision (float32 variables, loss and outputs);
# float16 with dynamic loss scaling. auto: resolved by distribute.resolve_precision.
PRECISIONS = ("float32", "bfloat16", "float16", "auto")
XLA = ("auto", "on", "off")  # auto: resolved by distribute.resolve_xla
STRATEGIES = ("default", "mirrored", "multi_worker", "tpu")
INPUTS = ("auto", "memory", "stream")  # auto: resolved by input.resolve_input
AUGMENT_ON = ("host", "device")
WIRES = ("uint8", "snappy", "jpeg")  # --data-service-wire: simsiam_tf.input.wire
FIT_MEMORY = ("off", "accumulate", "check")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Everything that determines a training run.

    Learning rate: `lr = base_lr * batch_size / 256` (the paper's linear scaling rule),
    decayed with a per-epoch cosine. Weight decay has PyTorch's (coupled) semantics.
    """

    preset: str = "digits"
    dataset: str = "digits"
    data_dir: str | None = None
    image_size: int = 32
    # Backbone: resnet18 is the CIFAR variant (3x3 stride-1 stem, no max-pool);
    # `width` is its first stage's channels (64 in the paper).
    backbone: str = "resnet18"
    width: int = 64
    proj_layers: int = 2
    # The projector's output width (z, and the predictor's input and output) and its
    # hidden width, set apart (`--proj-hidden-dim`): the paper's hidden fc is 2048-d, and
    # the official builder makes it the backbone's feature dimension (2048 for ResNet-50,
    # 512 for ResNet-18). Unless given, the hidden width follows the output width
    # (`make_config`), as it did before it had a setting of its own.
    proj_dim: int = 2048
    proj_hidden_dim: int = 2048
    pred_dim: int = 512
    epochs: int = 800
    batch_size: int = 512
    # Gradient accumulation (--micro-batch): each step takes batch_size / micro_batch
    # micro-batches of micro_batch images (global) one after another and applies their
    # summed gradients once; 0 = the whole batch at once. fit_memory: what happens
    # before the first step (simsiam_tf.memory_fit): "off" (library callers, tests),
    # "accumulate" (train.py's default: measure, and accumulate if the batch does not
    # fit) or "check" (measure, and stop with exit 4 if it does not fit).
    micro_batch: int = 0
    fit_memory: str = "off"
    base_lr: float = 0.03
    momentum: float = 0.9
    weight_decay: float = 5e-4
    fix_pred_lr: bool = False
    stop_gradient: bool = True
    # The method: SimSiam, or the contrastive baseline SimCLR (NT-Xent at `temperature`,
    # 0.5 as in the SimCLR paper's CIFAR-10 runs) in the same harness.
    method: str = "simsiam"
    temperature: float = 0.5
    precision: str = "float32"  # train.py asks for "auto"; library callers and tests get plain float32
    # XLA compilation of the train step; train.py asks for "auto" (on for GPUs and TPUs),
    # library callers and tests get "off". config.json records "on" or "off".
    xla: str = "off"
    seed: int = 0
    strategy: str = "default"
    cpu_replicas: int = 1
    # Monitoring: weighted kNN (k, temperature) on backbone features every knn_every
    # epochs; knn_train_limit caps the feature bank (0 = the whole train split).
    knn_every: int = 1
    knn_k: int = 200
    knn_temperature: float = 0.1
    knn_train_limit: int = 0
    train_limit: int = 0
    # Validation: a fixed stratified fraction of the labelled training split, held out
    # of training; kNN on it chooses checkpoints/best (the test split never chooses
    # anything). A TFDS dataset's own validation split is used where it has one beside
    # its test split. 0 = no validation split and no best checkpoint.
    val_fraction: float = 0.1
    # Input (simsiam_tf.input): decoded in memory, or streamed from disk; and where
    # the flip, colour and blur steps of the augmentation run (tf.data on the host, or
    # inside train_step on each replica's device).
    input: str = "auto"
    augment_on: str = "host"
    # The tf.data service (simsiam_tf.input.service): the dispatcher's grpc://HOST:PORT
    # ("" = the input pipeline runs in the trainer), and how long the dispatcher may be
    # unreachable mid-run before training stops. Both may change when a run resumes.
    # data_service_wire: how batches cross the network (input.wire: uint8, snappy or
    # jpeg); a change on resume is recorded, jpeg being lossy.
    data_service: str = ""
    data_service_grace: float = 60.0
    data_service_wire: str = "uint8"
    log_every_steps: int = 10
    # Representation diagnostics (simsiam_tf.diagnostics.probe) every diag_every epochs
    # (0 = off) on diag_images fixed training images x diag_views fixed views; at the
    # end, TensorBoard projector files for up to projector_images test images (0 = off).
    diag_every: int = 1
    diag_images: int = 256
    diag_views: int = 8
    projector_images: int = 2000
    # What `--resume` changed (rundir.RESUMABLE_KEYS), oldest first:
    # {"from_epoch": 51, "base_lr": {"from": 0.03, "to": 0.015}}. The fields above hold
    # the values in force now.
    resume_changes: tuple = ()

    @property
    def lr(self) -> float:
        """The initial learning rate after linear scaling by the global batch."""
        return self.base_lr * self.batch_size / 256

    def replace(self, **changes: Any) -> "TrainConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


PRESETS: dict[str, TrainConfig] = {
    # `python train.py`: offline, under 10 minutes on 2 CPU cores, and learns.
    # A narrow ResNet-18 (widths 16-32-64-128) with 512-d heads: the paper's full-width
    # recipe needs far more steps than 2 cores allow before kNN beats random features.
    # base_lr 1.6 (lr 0.8 at batch 128): the best mean validation kNN of a 30-epoch sweep
    # over 0.4-6.4, four seeds at 0.8 and 1.6 (docs/training.md has the table; the
    # earlier 0.8 had been chosen on test kNN).
    "digits": TrainConfig(
        preset="digits",
        dataset="digits",
        width=16,
        proj_dim=512,
        proj_hidden_dim=512,
        pred_dim=128,
        epochs=60,
        batch_size=128,
        base_lr=1.6,
        knn_every=5,
        diag_every=5,  # 256 x 8 probe views every 5 epochs: under 10% of the run
    ),
    # The paper's CIFAR-10 recipe (Sec. 4 and appendix D; Fig. 2 trains ResNet-18).
    "cifar": TrainConfig(
        preset="cifar",
        dataset="cifar10",
        epochs=800,
        batch_size=512,
        base_lr=0.03,
        weight_decay=5e-4,
        knn_every=10,
        diag_every=10,
    ),
    # The paper's ImageNet recipe: ResNet-50, 3-layer projector, fixed predictor lr.
    "imagenet": TrainConfig(
        preset="imagenet",
        dataset="imagenet2012",
        image_size=224,
        backbone="resnet50",
        proj_layers=3,
        epochs=100,
        batch_size=512,
        base_lr=0.05,
        weight_decay=1e-4,
        fix_pred_lr=True,
        knn_every=10,
        # 1.28M bank features would take 10 GB; a fixed 50,000-image bank keeps the
        # monitor comparable across epochs at 0.4 GB.
        knn_train_limit=50_000,
        diag_every=10,
    ),
}


# `--method simclr` in each preset: the preset's recipe (backbone, heads, batch,
# augmentation, schedule), so that a SimSiam run and a SimCLR run differ only in the
# method, except where SimCLR needs its own value. `make_config` applies these unless
# the command line sets the key.
SIMCLR_PRESETS: dict[str, dict[str, Any]] = {
    # The best of a 30-epoch sweep of base lr 0.2-3.2 by validation kNN (mean of the
    # last three evaluations); docs/contrastive.md has the sweep and its command. The
    # same as SimSiam's since SimSiam's own sweep on validation data; kept explicit.
    "digits": {"base_lr": 1.6},
    # Not swept: one point of these recipes is 800 CIFAR-10 or 100 ImageNet epochs,
    # beyond this project's CPU. They keep SimSiam's base lr; sweep it first on a GPU
    # (docs/contrastive.md says how the digits sweep went).
    "cifar": {},
    "imagenet": {"fix_pred_lr": False},  # SimCLR has no predictor to fix the rate of
}


# Images whose shorter side is at most this many pixels (a folder's median, or an
# explicit --image-size) get the cifar preset: its ResNet-18 has a stride-1 stem made
# for 32 px inputs. Larger ones get the imagenet preset, whose ResNet-50 reduces by 4
# in its stem and is made for 224 px; at 32 px it would end on a 1 x 1 map.
SMALL_IMAGE_SIDE = 64


def choose_preset(dataset: str, image_size: int | None = None) -> tuple[str, str]:
    """The preset `dataset` gets when `--preset` is not given, and why (one line).

    `digits` gets digits, `imagenet*` imagenet, other tensorflow-datasets names cifar.
    `folder:PATH` and `tfrecord:GLOB` get cifar when `image_size` (an explicit
    --image-size) is at most SMALL_IMAGE_SIDE and imagenet when larger. Without it, a
    folder is judged by the median shorter side of up to 200 of its images, read from
    their headers (`image_sizes.median_size`), and TFRecord shards by the median that
    prepare.py recorded in their index.json (`image_sizes.index_median_size`; cifar
    when there is none).
    """
    from simsiam_tf.input.catalog import parse_dataset, require_folder

    small = f"≤ {SMALL_IMAGE_SIDE} px"
    ref = parse_dataset(dataset)
    if ref.kind == "folder":
        require_folder(ref.location)  # not a preset line about a folder that is not there
    if ref.kind == "digits":
        return "digits", "--dataset digits, the bundled offline default"
    if ref.kind == "tfds" and dataset.startswith("imagenet"):
        return "imagenet", f"--dataset {dataset}: the paper's ImageNet recipe"
    local = ref.kind in ("folder", "tfrecord")
    if local and image_size is not None:
        if image_size <= SMALL_IMAGE_SIDE:
            return "cifar", f"--image-size {image_size} {small}: the CIFAR ResNet-18 recipe; --preset overrides"
        return "imagenet", f"--image-size {image_size} > {SMALL_IMAGE_SIDE} px: the ResNet-50 recipe; --preset overrides"
    if ref.kind == "folder":
        from simsiam_tf.image_sizes import median_size

        found = median_size(ref.location)
        if found is None:
            return "cifar", f"{dataset}: no image size could be read"
        preset = "cifar" if found.shorter <= SMALL_IMAGE_SIDE else "imagenet"
        return preset, (
            f"{dataset}: median image {found.width}x{found.height} px over {found.read} sampled files; "
            f"images with a shorter side {small} get cifar at 32 px, larger imagenet at 224 px; --preset/--image-size override"
        )
    if ref.kind == "tfrecord":
        from simsiam_tf.image_sizes import index_median_size

        found = index_median_size(ref.location)
        if found is None:
            return "cifar", (
                f"{dataset}: no index.json with image sizes (prepare.py writes one), so the sizes are only inside "
                "the records; for photos give --image-size 224 or --preset imagenet"
            )
        preset = "cifar" if found.shorter <= SMALL_IMAGE_SIDE else "imagenet"
        return preset, (
            f"{dataset}: median image {found.width}x{found.height} px over its {found.read:,} training images "
            f"(index.json); images with a shorter side {small} get cifar at 32 px, larger imagenet at 224 px; "
            "--preset/--image-size override"
        )
    return "cifar", f"--dataset {dataset}: named datasets other than digits and imagenet* get cifar; --preset overrides"


def default_preset(dataset: str, image_size: int | None = None) -> str:
    """The preset a dataset gets when `--preset` is not given (`choose_preset`)."""
    return choose_preset(dataset, image_size)[0]


def make_config(preset: str | None = None, **overrides: Any) -> TrainConfig:
    """A preset with overrides applied and validated.

    Raises:
        UsageError: unknown preset or key, or a value out of range.
    """
    dataset = overrides.get("dataset") or "digits"
    preset = preset or default_preset(dataset, overrides.get("image_size"))
    if preset not in PRESETS:
        raise UsageError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    _check_keys(overrides)
    base = PRESETS[preset]
    if overrides.get("method") == "simclr":
        overrides = {**SIMCLR_PRESETS[preset], **overrides}
    if "dataset" not in overrides:
        overrides["dataset"] = base.dataset
    if "proj_dim" in overrides and "proj_hidden_dim" not in overrides:
        overrides["proj_hidden_dim"] = overrides["proj_dim"]
    config = base.replace(**overrides)
    validate(config)
    return config


def _check_keys(keys) -> None:
    valid = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(keys) - valid)
    if unknown:
        raise UsageError(
            f"unknown config key(s) {', '.join(unknown)}; valid keys: {', '.join(sorted(valid))}"
        )


def validate(c: TrainConfig) -> None:
    """Reject values that cannot work, with a message naming the fix."""

    def need(ok: bool, message: str) -> None:
        if not ok:
            raise UsageError(message)

    need(c.backbone in BACKBONES, f"--backbone {c.backbone!r}: choose one of {', '.join(BACKBONES)}")
    need(c.method in METHODS, f"--method {c.method!r}: choose one of {', '.join(METHODS)}")
    need(c.temperature > 0, f"--temperature must be positive, got {c.temperature}")
    need(
        c.method == "simsiam" or (c.stop_gradient and not c.fix_pred_lr),
        "--no-stop-gradient and --fix-pred-lr are SimSiam's; SimCLR has neither a stop-gradient nor a predictor",
    )
    need(c.precision in PRECISIONS, f"--precision {c.precision!r}: choose one of {', '.join(PRECISIONS)}")
    need(c.xla in XLA, f"--xla {c.xla!r}: choose one of {', '.join(XLA)}")
    need(c.strategy in STRATEGIES, f"--strategy {c.strategy!r}: choose one of {', '.join(STRATEGIES)}")
    need(c.input in INPUTS, f"--input {c.input!r}: choose one of {', '.join(INPUTS)}")
    need(c.augment_on in AUGMENT_ON, f"--augment-on {c.augment_on!r}: choose one of {', '.join(AUGMENT_ON)}")
    need(
        not c.data_service or c.input in ("auto", "stream"),
        "--data-service streams the dataset from disk on the service's workers; drop --input memory",
    )
    need(
        not c.data_service or re.fullmatch(r"(grpc://)?[^:/\s]+:\d+", c.data_service) is not None,
        f"--data-service {c.data_service!r}: expected grpc://HOST:PORT, e.g. grpc://dispatcher-host:5050",
    )
    need(
        c.data_service_wire in WIRES,
        f"--data-service-wire {c.data_service_wire!r}: choose one of {', '.join(WIRES)}",
    )
    need(c.data_service_grace > 0, f"--data-service-grace must be positive, got {c.data_service_grace}")
    need(c.epochs >= 1, f"--epochs must be at least 1, got {c.epochs}")
    need(c.batch_size >= 2, f"--batch-size must be at least 2 (BatchNorm needs a batch), got {c.batch_size}")
    need(c.fit_memory in FIT_MEMORY, f"fit_memory {c.fit_memory!r}: choose one of {', '.join(FIT_MEMORY)}")
    need(c.micro_batch >= 0, f"--micro-batch must be positive, got {c.micro_batch}")
    need(
        not c.micro_batch or (c.micro_batch <= c.batch_size and c.batch_size % c.micro_batch == 0),
        f"--micro-batch {c.micro_batch} must divide --batch-size {c.batch_size} (each step accumulates "
        "batch-size / micro-batch micro-batches)",
    )
    need(
        c.method == "simsiam" or c.micro_batch in (0, c.batch_size),
        "--micro-batch with --method simclr would shrink NT-Xent's negatives to the micro-batch; "
        "use a smaller --batch-size instead",
    )
    need(c.base_lr > 0 and c.base_lr < 100, f"--lr must be in (0, 100), got {c.base_lr}")
    need(0 <= c.momentum < 1, f"momentum must be in [0, 1), got {c.momentum}")
    need(c.weight_decay >= 0, f"weight decay must be >= 0, got {c.weight_decay}")
    need(16 <= c.image_size <= 1024, f"--image-size must be in [16, 1024], got {c.image_size}")
    need(c.width >= 1, f"--width must be positive, got {c.width}")
    need(c.proj_layers in (2, 3), f"proj_layers must be 2 or 3, got {c.proj_layers}")
    need(c.proj_dim >= 1 and c.proj_hidden_dim >= 1 and c.pred_dim >= 1, "proj_dim, proj_hidden_dim and pred_dim must be positive")
    need(c.cpu_replicas >= 1, f"--cpu-replicas must be at least 1, got {c.cpu_replicas}")
    need(c.knn_every >= 0, f"--knn-every must be >= 0 (0 turns kNN off), got {c.knn_every}")
    need(c.knn_k >= 1, f"knn_k must be at least 1, got {c.knn_k}")
    need(c.knn_temperature > 0, f"knn_temperature must be positive, got {c.knn_temperature}")
    need(c.knn_train_limit >= 0 and c.train_limit >= 0, "limits must be >= 0 (0 = no limit)")
    need(0 <= c.val_fraction <= 0.5, f"--val-fraction must be in [0, 0.5] (0 = no validation split), got {c.val_fraction}")
    need(c.log_every_steps >= 1, f"log_every_steps must be at least 1, got {c.log_every_steps}")
    need(c.seed >= 0, f"--seed must be >= 0, got {c.seed}")
    need(c.diag_every >= 0, f"--diag-every must be >= 0 (0 turns diagnostics off), got {c.diag_every}")
    need(c.diag_images >= 2, f"diag_images must be at least 2, got {c.diag_images}")
    need(c.diag_views >= 2, f"diag_views must be at least 2 (shards need two views), got {c.diag_views}")
    need(c.projector_images >= 0, f"projector_images must be >= 0 (0 = off), got {c.projector_images}")


def save_config(config: TrainConfig, path: str) -> None:
    write_json_atomic(path, config.to_dict())


def load_config(path: str) -> TrainConfig:
    """Read a run's config.json back; unknown keys are an error."""
    try:
        with open(path) as f:
            data = json.load(f)
    except FileNotFoundError:
        raise UsageError(f"{path} does not exist; is this a run directory written by train.py?")
    except json.JSONDecodeError as e:
        raise UsageError(f"{path} is not valid JSON ({e}); the run directory is damaged")
    _check_keys(data)
    # Runs written before validation splits existed trained on the whole training split.
    data.setdefault("val_fraction", 0.0)
    # Runs written before the projector's hidden width had a setting used the output width.
    data.setdefault("proj_hidden_dim", data.get("proj_dim", TrainConfig.proj_dim))
    data["resume_changes"] = tuple(data.get("resume_changes", ()))
    config = TrainConfig(**data)
    validate(config)
    return config


def write_json_atomic(path: str, data: Any) -> None:
    """Write JSON to a temporary file in the same directory, then rename it into place."""
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".json", dir=directory)
    try:
        os.fchmod(fd, 0o644)  # mkstemp makes 0600; these files are meant to be shared
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=2, sort_keys=True)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
