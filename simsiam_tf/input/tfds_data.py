"""tensorflow-datasets: the builder, its download errors, and its prepared files as a
shard source.

TFDS prepares a dataset (downloading it, or from files placed by hand) into TFRecord
shards of tf.train.Examples, `image` (the encoded image) and `label`. Those shards are
read here like any other (`sources.ShardSource`), so a TFDS dataset is split, limited,
shuffled per epoch, shared between workers and served by the tf.data service by the
same rules as a folder or prepare.py's shards.
"""

from __future__ import annotations

import os
import socket

from simsiam_tf.errors import UsageError

OFFLINE_ALTERNATIVES = (
    "offline alternatives: --dataset digits (bundled with scikit-learn), "
    "--dataset folder:PATH (PATH/train/<class>/*.jpg), "
    "or --data-dir pointing at a TFDS data_dir prepared on a machine with network"
)


def network_available(host: str = "storage.googleapis.com", timeout: float = 3.0) -> bool:
    """Whether the host TFDS downloads from can be reached at all (one quick connect)."""
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def builder(name: str, data_dir: str | None):
    """The prepared tensorflow-datasets builder of `name` (downloading it if it can).

    Raises:
        UsageError: unknown name, or not prepared and no network to download it.
    """
    import tensorflow_datasets as tfds

    try:
        found = tfds.builder(name, data_dir=data_dir)
    except tfds.core.registered.DatasetNotFoundError:
        raise UsageError(
            f"unknown dataset {name!r}: not 'digits', not 'folder:PATH', not 'tfrecord:GLOB' and not a "
            f"tensorflow-datasets name; {OFFLINE_ALTERNATIVES}"
        )
    if not found.is_prepared():
        manual = manual_download(found)
        if manual is not None and not manual[1]:
            raise UsageError(manual_download_message(name, found, manual[0]))
        if manual is None and not network_available():
            raise UsageError(
                f"tensorflow-datasets cannot download {name!r}: no network, and it is not "
                f"prepared in {found.data_dir!r}; {OFFLINE_ALTERNATIVES}"
            )
        try:
            found.download_and_prepare()
        except Exception as e:  # TFDS raises many unrelated types for a failed download
            if manual is not None:  # files there, but not the right ones
                raise UsageError(manual_download_message(name, found, manual[0], e))
            raise UsageError(
                f"tensorflow-datasets could not download {name!r} ({type(e).__name__}: "
                f"{str(e).splitlines()[0][:200]}); {OFFLINE_ALTERNATIVES}"
            )
    return found


def manual_download(found) -> tuple[str, bool] | None:
    """For a dataset whose files must be downloaded by hand (imagenet2012, ...): TFDS's
    manual_dir, `<data_dir>/downloads/manual`, and whether anything is in it; else None."""
    if not getattr(found, "MANUAL_DOWNLOAD_INSTRUCTIONS", None):
        return None
    path = os.path.join(str(found.data_dir_root), "downloads", "manual")
    return path, os.path.isdir(path) and bool(os.listdir(path))


def manual_download_message(name: str, found, manual_dir: str, error: Exception | None = None) -> str:
    """One line: the dataset needs a manual download, where the files go, what else works."""
    instructions = " ".join(str(found.MANUAL_DOWNLOAD_INSTRUCTIONS).split())
    if len(instructions) > 300:
        instructions = instructions[:297] + "..."
    problem = (
        f"preparing it from the files in {manual_dir} failed ({type(error).__name__}: "
        f"{' '.join(str(error).split())[:160]})" if error is not None else f"{manual_dir} is missing or empty"
    )
    return (
        f"tensorflow-datasets {name!r} needs a manual download and {problem}. TFDS says: {instructions} "
        f"Put those files in {manual_dir} (TFDS's manual_dir under --data-dir) and run the same command again; "
        f"or train on the images directly: --dataset folder:PATH (PATH/train/<class>/*.jpg), or "
        f"python prepare.py --src PATH --out SHARDS, then --dataset tfrecord:SHARDS"
    )


def test_split(found) -> str | None:
    """The split evaluation uses as the test split: "test", else "validation", else None."""
    splits = list(found.info.splits.keys())
    return next((s for s in ("test", "validation") if s in splits), None)


def own_val_split(found) -> str | None:
    """The dataset's own validation split, when it has one beside its test split."""
    splits = list(found.info.splits.keys())
    return "validation" if "validation" in splits and test_split(found) == "test" else None


def tfds_source(name: str, data_dir: str | None):
    """A prepared tensorflow-datasets image dataset as a `sources.ShardSource`."""
    import tensorflow_datasets as tfds

    from simsiam_tf.input.sources import ShardSource

    found = builder(name, data_dir)
    features = found.info.features
    if "image" not in features:
        raise UsageError(f"tensorflow-datasets {name!r} has no 'image' feature; it is not an image dataset")
    if found.info.file_format != tfds.core.file_adapters.FileFormat.TFRECORD:
        raise UsageError(
            f"tensorflow-datasets {name!r} is stored as {found.info.file_format.value}, not TFRecord; "
            "prepare it with file_format='tfrecord', or export its images to a folder and use --dataset folder:PATH"
        )
    has_label = "label" in features
    class_names = list(getattr(features["label"], "names", None) or []) if has_label else []
    shards, counts = {}, {}
    for split, info in found.info.splits.items():
        instructions = info.file_instructions
        shards[split] = [str(i.filename) for i in instructions]
        counts[split] = [int(i.examples_in_shard) for i in instructions]
        if any(i.skip or i.take != i.examples_in_shard for i in instructions):
            raise UsageError(f"tensorflow-datasets {name!r}: split {split!r} does not cover its files whole")
    if "train" not in shards:
        raise UsageError(f"tensorflow-datasets {name!r} has no 'train' split (it has {sorted(shards)})")
    labelled = {s: has_label for s in shards}
    return ShardSource(
        name, shards, counts, ("image", "label" if has_label else None), class_names, labelled,
        test_split=test_split(found), own_val=own_val_split(found),
    )
