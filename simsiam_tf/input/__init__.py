"""The input layer: from `--dataset` to training batches and evaluation splits.

    catalog.py   what --dataset names, the folder scan, which images each split takes
    sources.py   where the images are stored (digits, a folder, TFRecord shards) and how
                 their records are read; tfds_data.py: tensorflow-datasets' builder
    records.py   prepare.py's TFRecord shards and their index.json
    order.py     an epoch's order and each image's seed, the same on every path
    decode.py    encoded images to crops and views: the one decode stage
    batches.py   the one batch format (uint8 [B, 2, S, S, 3]) and the per-worker split
    contract.py  what a training input and an evaluation split are
    memory.py, stream.py, service.py   the three inputs

`open_input(config)` is the only way in: it parses the dataset once, decides its splits
once (`catalog.decide_splits`) and opens the input `--input` asks for, so memory,
stream, the tf.data service and `evaluate.py` read the same images.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from simsiam_tf.errors import UsageError
from simsiam_tf.input import catalog

if TYPE_CHECKING:
    from simsiam_tf.config import TrainConfig

MEMORY_FRACTION = 0.5  # --input auto keeps a dataset in memory up to this share of RAM
INPUTS = ("auto", "memory", "stream")


def memory_needed(count: int, image_size: int) -> int:
    """Bytes the in-memory path needs for `count` images at `image_size` (uint8 storage)."""
    from simsiam_tf.augment import eval_resize_side

    side = eval_resize_side(image_size)
    return count * side * side * 3


def memory_total() -> int:
    """This machine's physical memory in bytes."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def _gib(n: int) -> str:
    return f"{n / 2**30:.1f} GiB"


def resolve_input(config: TrainConfig, ref: catalog.DatasetRef, count: int | None) -> tuple[str, str]:
    """(memory or stream, the reason) for `config.input`, given the images the memory
    path would hold (`count`, all splits).

    auto picks memory when the images fit MEMORY_FRACTION of this machine's memory at
    the training size and are trained below 96 px (where the crops drawn on the stored
    image are the paper's); otherwise stream.

    Raises:
        UsageError: a dataset that cannot take the requested input, or an explicit
            --input memory that does not fit.
    """
    from simsiam_tf.augment import CENTER_CROP_FROM

    size = config.image_size
    if config.input not in INPUTS:
        raise UsageError(f"--input {config.input!r}: choose one of {', '.join(INPUTS)}")
    if config.input == "memory" and ref.kind == "tfrecord":
        raise UsageError("tfrecord: datasets are streamed; use --input stream (or auto)")
    if ref.kind == "digits" and (config.input == "stream" or config.data_service):
        raise UsageError(
            "--dataset digits is bundled in memory and cannot stream; use --input memory (or auto), "
            "or --dataset folder:PATH or tfrecord:GLOB with --data-service"
        )
    needed, total = memory_needed(count or 0, size), memory_total()
    budget = f"{MEMORY_FRACTION:.0%} of this machine's {total / 2**30:.0f} GiB"
    fits = needed <= MEMORY_FRACTION * total
    if config.data_service:
        return "stream", "--data-service: the service's workers stream the dataset from disk"
    if config.input == "memory":
        if not fits:
            raise UsageError(
                f"{ref.text}: {count:,} images at {size} px need {_gib(needed)} in memory, more than {budget}; "
                "stream it from disk with --input stream (or auto), or use a smaller --image-size"
            )
        return "memory", "--input memory"
    if config.input == "stream":
        return "stream", "--input stream"
    if ref.kind == "digits":
        return "memory", "auto: digits is bundled with scikit-learn"
    if ref.kind == "tfrecord":
        return "stream", "auto: TFRecord shards are streamed"
    if size >= CENTER_CROP_FROM:
        return "stream", f"auto: at {size} px the crops are drawn on the original images, which only streaming keeps"
    if fits:
        return "memory", f"auto: {count:,} images at {size} px need {_gib(needed)}, within {budget}"
    return "stream", f"auto: {count:,} images at {size} px would need {_gib(needed)}, more than {budget}"


def open_source(ref: catalog.DatasetRef, data_dir: str | None = None):
    """The source of a parsed `--dataset` (`sources`, `tfds_data`)."""
    from simsiam_tf.input import sources

    if ref.kind == "digits":
        return sources.digits_source()
    if ref.kind == "folder":
        return sources.FolderSource(ref.location)
    if ref.kind == "tfrecord":
        return sources.tfrecord_source(ref.location)
    from simsiam_tf.input import tfds_data

    return tfds_data.tfds_source(ref.location, data_dir)


def open_input(config: TrainConfig, announce=None):
    """The training input `config` asks for (`config.input`: auto, memory or stream),
    and its kind with the reason.

    The dataset's splits are decided here, once: every input and `evaluate.py` reads
    the same training, validation and test images. `announce(line)` is told the choice.
    """
    ref = catalog.parse_dataset(config.dataset)
    source = open_source(ref, config.data_dir)
    splits = catalog.decide_splits(
        source.stored, config.train_limit, config.val_fraction, source.test_split, source.own_val
    )
    kind, reason = resolve_input(config, ref, sum(len(m) for m in splits.values()))
    if announce is not None:
        announce(f"input: {kind} ({reason})")
    if kind == "memory":
        from simsiam_tf.input.memory import MemoryInput

        return MemoryInput(source, splits, config.image_size), kind
    from simsiam_tf.input.stream import StreamInput

    return StreamInput(source, splits, config.image_size), kind


def through_service(stream_input, config: TrainConfig, strategy, announce=None):
    """`stream_input` read through the tf.data service at `config.data_service`."""
    from simsiam_tf.input import service

    target = service.wait_for_dispatcher(config.data_service)
    served = service.ServiceInput(stream_input, target, service.run_token(strategy), config.data_service_wire)
    if announce is not None:
        announce(f"input: through the tf.data service at {target} (job {served.job}, {config.data_service_wire} on the wire)")
    return served


def split_images(dataset: str = "digits", image_size: int = 32, split: str = "train", data_dir: str | None = None,
                 train_limit: int = 0, val_fraction: float = 0.0):
    """One split of a dataset decoded into memory, in the evaluation form: (uint8
    [N, R, R, 3], int32 labels or None). For diagnostics, benchmarks and tests; with
    the defaults, the whole training split (no validation split held out)."""
    from simsiam_tf.config import TrainConfig

    config = TrainConfig(dataset=dataset, image_size=image_size, data_dir=data_dir, train_limit=train_limit,
                         val_fraction=val_fraction, input="memory")
    return open_input(config)[0].eval_split(split).materialize()
