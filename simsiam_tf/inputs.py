"""`--input auto|memory|stream`: which of the two training inputs a run uses.

- memory (`data.MemoryInput`): decode every image once, hold it as uint8 at the
  training size, augment batches gathered by index. Fast and exact, for datasets that
  fit the memory budget and whose images are small (the crops are drawn on the stored
  images, which below 96 px are the originals).
- stream (`stream.StreamInput`): read the encoded images from disk every epoch and
  decode each only at its crops, sampled on the original image. For everything larger
  than memory, for TFRecord shards, and for photos trained at 96 px and above, where
  only the original image gives the paper's crops.

`auto` picks memory when the dataset fits `MEMORY_FRACTION` of this machine's memory at
the training size and the images are trained below 96 px; otherwise stream. The choice
and its reason are printed, and config.json records the choice.
"""

from __future__ import annotations

from simsiam_tf import augment as aug
from simsiam_tf import data as data_lib
from simsiam_tf.config import TrainConfig, UsageError

MEMORY_FRACTION = 0.5
INPUTS = ("auto", "memory", "stream")


def _gib(n: int) -> str:
    return f"{n / 2**30:.1f} GiB"


def _count_images(config: TrainConfig) -> int:
    """Images the in-memory path would hold (train after --train-limit, plus test)."""
    if config.dataset.startswith("folder:"):
        found = data_lib.scan_folder(config.dataset[len("folder:"):], config.train_limit, config.val_fraction)
        return len(found.train_files) + len(found.val_files) + len(found.test_files)
    builder = data_lib.tfds_builder(config.dataset, config.data_dir)
    splits = builder.info.splits
    if "train" not in splits:  # no split metadata (tfds.testing.mock_data): count unknown
        return 0
    train = splits["train"].num_examples
    if config.train_limit:
        train = min(train, config.train_limit)
    test = data_lib.tfds_test_split(builder)
    return train + (splits[test].num_examples if test else 0)


def resolve_input(config: TrainConfig) -> tuple[str, str]:
    """(memory or stream, the reason) for `config.input`.

    Raises:
        UsageError: a source that cannot take the requested input.
    """
    dataset, size = config.dataset, config.image_size
    if config.input not in INPUTS:
        raise UsageError(f"--input {config.input!r}: choose one of {', '.join(INPUTS)}")
    if config.input == "memory" and dataset.startswith("tfrecord:"):
        raise UsageError("tfrecord: datasets are streamed; use --input stream (or auto)")
    if config.input == "stream" and dataset == "digits":
        raise UsageError("--dataset digits is bundled in memory and cannot stream; use --input memory (or auto)")
    if config.data_service:
        if dataset == "digits":
            raise UsageError("--data-service needs images on disk: use --dataset folder:PATH or tfrecord:GLOB")
        return "stream", "--data-service: the service's workers stream the dataset from disk"
    if config.input != "auto":
        return config.input, f"--input {config.input}"
    if dataset == "digits":
        return "memory", "auto: digits is bundled with scikit-learn"
    if dataset.startswith("tfrecord:"):
        return "stream", "auto: TFRecord shards are streamed"
    if size >= aug.CENTER_CROP_FROM:
        return "stream", (
            f"auto: at {size} px the crops are drawn on the original images, which only streaming keeps"
        )
    count = _count_images(config)
    needed, total = data_lib.memory_needed(count, size), data_lib.memory_total()
    budget = f"{MEMORY_FRACTION:.0%} of this machine's {total / 2**30:.0f} GiB"
    if needed <= MEMORY_FRACTION * total:
        return "memory", f"auto: {count:,} images at {size} px need {_gib(needed)}, within {budget}"
    return "stream", f"auto: {count:,} images at {size} px would need {_gib(needed)}, more than {budget}"


def open_input(config: TrainConfig, kind: str):
    """The training input of `kind` (from `resolve_input`) for `config`'s dataset."""
    if kind == "memory":
        data = data_lib.load(
            config.dataset, config.image_size, config.data_dir, config.train_limit, val_fraction=config.val_fraction
        )
        return data_lib.MemoryInput(data, config.image_size)
    from simsiam_tf import stream

    source = stream.open_source(config.dataset, config.data_dir, config.train_limit, config.val_fraction)
    return stream.StreamInput(source, config.image_size)


def open_eval_input(
    dataset: str, image_size: int, data_dir: str | None = None, train_limit: int = 0, val_fraction: float = 0.0
):
    """The input `evaluate.py` reads `dataset` through, chosen as `--input auto` would;
    with a run's `val_fraction`, its train split is the one that run trained on."""
    config = TrainConfig(
        dataset=dataset, image_size=image_size, data_dir=data_dir, train_limit=train_limit, val_fraction=val_fraction
    )
    kind, _ = resolve_input(config)
    return open_input(config, kind)
