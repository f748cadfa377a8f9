"""TFRecord shards of an image folder, for streaming datasets larger than memory.

`prepare.py` writes them with `write_records`; `sources.tfrecord_source` reads them,
after checking them with `read_index`, `shard_counts` and `check_first_record`.

    DIR/train-00000-of-00016.tfrecord ...   one tf.train.Example per image
    DIR/test-00000-of-00016.tfrecord ...    (when the folder has a test split)
    DIR/index.json                          written last: splits, shards (file, count,
                                            bytes, labels), median image size

Records follow the TF Model Garden classification layout (`image/encoded`,
`image/format`, `image/height`, `image/width`, `image/class/label`, `image/filename`), so
shards written by other tools in that layout can be read too.
"""

from __future__ import annotations

import json
import math
import os
import re
import resource
import shutil
import sys
from typing import Callable

import numpy as np
import tensorflow as tf
from google.protobuf.message import DecodeError

from simsiam_tf.config import UsageError, write_json_atomic
from simsiam_tf.input.catalog import scan_folder
from simsiam_tf.input.decode import MAX_PIXELS

INDEX_FILE = "index.json"
INDEX_FORMAT = "simsiam-tf-tfrecord"
INDEX_VERSION = 1
PARTIAL_DIR = ".partial"  # shards being written; os.replace moves them out when complete
SHARD_SUFFIX = ".tfrecord"
TARGET_SHARD_BYTES = 128 * 2**20
MIN_SHARDS = 16  # enough shards that shuffling their order mixes an epoch well
LAYOUT_FIX = "write shards with prepare.py or the TF Model Garden classification layout"

# The parsing spec of a record. Only image/encoded is required; the defaults are the
# Model Garden decoder's (format "jpeg", label -1), so its shards read the same way.
FEATURES = {
    "image/encoded": tf.io.FixedLenFeature([], tf.string),
    "image/format": tf.io.FixedLenFeature([], tf.string, default_value="jpeg"),
    "image/height": tf.io.FixedLenFeature([], tf.int64, default_value=0),  # 0: not recorded
    "image/width": tf.io.FixedLenFeature([], tf.int64, default_value=0),
    "image/class/label": tf.io.FixedLenFeature([], tf.int64, default_value=-1),
    "image/filename": tf.io.FixedLenFeature([], tf.string, default_value=""),
}
# ---------------------------------------------------------------------------
# Reading.


def parse(serialized: tf.Tensor, image_key: str = "image/encoded", label_key: str | None = "image/class/label"):
    """One serialized tf.train.Example -> (encoded image, tf.string [], label, tf.int32 []).

    Pure TensorFlow ops, for `tf.data.Dataset.map`. The keys default to the Model Garden
    layout; tensorflow-datasets' records use "image" and "label". The label is -1 for
    unlabelled images (no label feature, or `label_key` None).
    """
    spec = {image_key: tf.io.FixedLenFeature([], tf.string)}
    if label_key:
        spec[label_key] = tf.io.FixedLenFeature([], tf.int64, default_value=-1)
    example = tf.io.parse_single_example(serialized, spec)
    label = tf.cast(example[label_key], tf.int32) if label_key else tf.constant(-1, tf.int32)
    return example[image_key], label


def read_index(directory: str) -> dict | None:
    """DIR/index.json as written by `write_records`, or None when there is none.

    Raises:
        UsageError: the file is not valid JSON, not this format, or inconsistent (shard
            counts that do not add up, shard names with a path in them).
    """
    path = os.path.join(directory, INDEX_FILE)
    try:
        with open(path) as f:
            index = json.load(f)
    except FileNotFoundError:
        return None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UsageError(f"{path} is not valid JSON ({e}); re-run prepare.py --overwrite to rewrite it")
    except OSError as e:
        raise UsageError(f"cannot read {path} ({e.strerror})")

    def need(ok: bool, problem: str) -> None:
        if not ok:
            raise UsageError(f"{path}: {problem}; re-run prepare.py --overwrite to rewrite the directory")

    need(isinstance(index, dict), "not a JSON object")
    need(index.get("format") == INDEX_FORMAT, f"format is {index.get('format')!r}, expected {INDEX_FORMAT!r}")
    need(
        index.get("version") == INDEX_VERSION,
        f"version {index.get('version')!r} is not {INDEX_VERSION} (written by another version of prepare.py?)",
    )
    need(isinstance(index.get("class_names"), list), "class_names is not a list")
    splits = index.get("splits")
    need(isinstance(splits, dict) and "train" in splits, "it has no train split")
    for name, split in splits.items():
        need(isinstance(split, dict) and isinstance(split.get("shards"), list), f"split {name!r} has no shard list")
        need(isinstance(split.get("count"), int), f"split {name!r} has no image count")
        for shard in split["shards"]:
            need(
                isinstance(shard, dict) and isinstance(shard.get("file"), str)
                and isinstance(shard.get("count"), int) and isinstance(shard.get("bytes"), int),
                f"a shard of split {name!r} lacks file, count or bytes",
            )
            # Names only: an index must not point training outside its directory.
            plain = os.path.basename(shard["file"]) == shard["file"] and shard["file"] not in ("", ".", "..")
            need(plain, f"shard name {shard['file']!r} is not a plain file name")
            labels = shard.get("labels")
            need(
                labels is None or isinstance(labels, list) and len(labels) == shard["count"],
                f"the labels of shard {shard['file']!r} are not a list of its {shard['count']} records' labels",
            )
        total = sum(s["count"] for s in split["shards"])
        need(total == split["count"], f"split {name!r} counts {split['count']} images but its shards hold {total}")
    return index


def check_shard_sizes(directory: str, index: dict, split: str) -> None:
    """Raise UsageError naming every shard of `split` whose size on disk is not the index's.

    A size mismatch means a truncated copy or a missing file; catching it here is cheap
    (one stat per shard) and happens before training starts, not hours into it.
    """
    if split not in index["splits"]:
        raise UsageError(
            f"{os.path.join(directory, INDEX_FILE)} has no {split!r} split (it has {sorted(index['splits'])})"
        )
    problems = []
    for shard in index["splits"][split]["shards"]:
        try:
            size = os.path.getsize(os.path.join(directory, shard["file"]))
        except OSError:
            problems.append(f"{shard['file']} (missing)")
            continue
        if size != shard["bytes"]:
            problems.append(f"{shard['file']} ({size:,} bytes on disk, index.json says {shard['bytes']:,})")
    if problems:
        raise UsageError(
            f"{len(problems)} shard(s) in {directory} are truncated or missing: {', '.join(problems)}; "
            "copy the directory again or re-run prepare.py --overwrite"
        )


def shard_counts(directory: str, index: dict | None, split: str, shards: list[str]) -> list[int]:
    """Records per shard of `split`: from prepare.py's index (sizes checked), else counted."""
    if index is not None and split in index.get("splits", {}):
        by_file = {s["file"]: s["count"] for s in index["splits"][split]["shards"]}
        if all(os.path.basename(p) in by_file for p in shards):
            check_shard_sizes(directory, index, split)
            return [by_file[os.path.basename(p)] for p in shards]
    print(
        f"note: counting the records of {len(shards)} shard(s) (no {INDEX_FILE} from prepare.py "
        "beside them); this reads them once",
        file=sys.stderr,
    )
    counts = []
    for path in shards:
        try:
            counts.append(int(tf.data.TFRecordDataset(path).reduce(np.int64(0), lambda n, _: n + 1)))
        except tf.errors.DataLossError as e:
            raise UsageError(f"TFRecord shard {path} is damaged ({_first_line(e)}); rewrite it")
    return counts


def index_labels(index: dict, shards: dict[str, list[str]]) -> dict[str, np.ndarray]:
    """The labels prepare.py recorded for each split's records, in shard order (the
    splits whose index entry has them for every shard)."""
    out = {}
    for split, paths in shards.items():
        entries = {s["file"]: s for s in index["splits"].get(split, {}).get("shards", [])}
        found = [entries.get(os.path.basename(p), {}).get("labels") for p in paths]
        if found and all(isinstance(labels, list) for labels in found):
            out[split] = np.asarray([label for labels in found for label in labels], np.int32)
    return out


def first_label(path: str) -> int:
    """The `image/class/label` of the first record of `path` (-1: none, or no records)."""
    first = next(iter(tf.data.TFRecordDataset(path).take(1)), None)
    if first is None:
        return -1
    feature = tf.train.Example.FromString(first.numpy()).features.feature.get("image/class/label")
    return int(feature.int64_list.value[0]) if feature is not None and feature.int64_list.value else -1


def check_first_record(path: str) -> None:
    """Raise UsageError unless the first record of `path` is a tf.train.Example with bytes
    in `image/encoded`. An empty file passes: it has no record to check.

    Training reads shards lazily; without this check a folder of some other TFRecord
    layout would fail deep inside the input pipeline with a parser error that names no file.
    """
    try:
        first = next(iter(tf.data.TFRecordDataset(path).take(1)), None)
    except tf.errors.NotFoundError:
        raise UsageError(f"shard {path} does not exist; copy the directory again or re-run prepare.py --overwrite")
    except tf.errors.OpError as e:
        raise UsageError(f"{path} cannot be read as a TFRecord file ({_first_line(e)}); {LAYOUT_FIX}")
    if first is None:
        return
    try:
        example = tf.train.Example.FromString(first.numpy())
    except DecodeError:
        raise UsageError(f"records in {path} are not tf.train.Example protos; {LAYOUT_FIX}")
    feature = example.features.feature.get("image/encoded")
    if feature is None or feature.WhichOneof("kind") != "bytes_list" or not feature.bytes_list.value:
        raise UsageError(f"records in {path} have no image/encoded feature; {LAYOUT_FIX}")


def find_damaged_shards(paths: list[str]) -> list[tuple[str, str]]:
    """(path, error message) for every shard that cannot be read to the end.

    For after a DataLossError mid-training, whose message does not name the file. Each
    shard is read completely (record lengths and CRCs are checked by the reader) without
    bringing records into Python.
    """
    damaged = []
    for path in paths:
        try:
            tf.data.TFRecordDataset(path).reduce(np.int64(0), lambda n, _: n + 1)
        except tf.errors.OpError as e:
            damaged.append((path, _first_line(e)))
    return damaged


def _first_line(error: tf.errors.OpError) -> str:
    """The error's own words, without TensorFlow's {{function_node ...}} and [Op:...] wrapping."""
    text = (error.message or "").strip().splitlines()[0] if (error.message or "").strip() else ""
    text = re.sub(r"\{\{function_node [^}]*\}\}\s*", "", text)
    text = re.sub(r"\s*\[Op:.*$", "", text).strip()
    return text or type(error).__name__


# ---------------------------------------------------------------------------
# Writing.


def make_example(encoded: bytes, label: int, height: int, width: int, fmt: bytes, filename: str | bytes) -> bytes:
    """A serialized tf.train.Example in the Model Garden classification layout.

    Args:
        encoded: the image file's bytes (JPEG or PNG).
        label: class index, -1 when unlabelled.
        height, width: pixels of the encoded image.
        fmt: b"jpeg" or b"png".
        filename: path relative to the split folder, e.g. "cat/0001.jpg".
    """

    def bytes_feature(value):
        return tf.train.Feature(bytes_list=tf.train.BytesList(value=[value]))

    def int_feature(value):
        return tf.train.Feature(int64_list=tf.train.Int64List(value=[int(value)]))

    if isinstance(filename, str):
        filename = os.fsencode(filename)  # keeps undecodable bytes of a file name
    feature = {
        "image/encoded": bytes_feature(encoded),
        "image/format": bytes_feature(fmt),
        "image/height": int_feature(height),
        "image/width": int_feature(width),
        "image/class/label": int_feature(label),
        "image/filename": bytes_feature(filename),
    }
    return tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString()


def default_num_shards(count: int, total_bytes: int) -> int:
    """Shards for a split: ~128 MiB each, at least 16, never more than one per image."""
    return max(1, min(count, max(MIN_SHARDS, math.ceil(total_bytes / TARGET_SHARD_BYTES))))


def shard_name(split: str, i: int, n: int) -> str:
    return f"{split}-{i:05d}-of-{n:05d}{SHARD_SUFFIX}"


def check_out_dir(out: str, overwrite: bool) -> None:
    """Refuse an --out that holds a prepared dataset (unless `overwrite`) or cannot be written."""
    if os.path.exists(out) and not os.path.isdir(out):
        raise UsageError(f"--out {out!r} is a file, not a directory; choose a directory")
    if os.path.isdir(out) and not overwrite:
        shards = [f for f in os.listdir(out) if f.endswith(SHARD_SUFFIX)]
        if os.path.exists(os.path.join(out, INDEX_FILE)) or shards:
            held = "index.json" if os.path.exists(os.path.join(out, INDEX_FILE)) else "no index.json"
            raise UsageError(
                f"--out {out!r} already holds {len(shards)} shard(s) and {held}; "
                "pass --overwrite to replace them, or choose another --out"
            )
    existing = os.path.abspath(out)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing) or not os.access(existing, os.W_OK | os.X_OK):
        raise UsageError(
            f"--out {out!r} cannot be written ({existing!r} is not a writable directory); choose another --out"
        )


def write_records(
    src: str,
    out: str,
    *,
    shards: int | None = None,
    max_side: int | None = None,
    seed: int = 0,
    workers: int | None = None,
    quality: int = 95,
    overwrite: bool = False,
    progress: Callable[[int, int], None] | None = None,
) -> dict:
    """Write the image folder `src` into TFRecord shards in `out`, then `out`/index.json.

    Each split's file list is shuffled with `seed` and dealt to N shards in turn, so every
    shard mixes classes and holds n//N or n//N+1 of the split's n images. Every image is
    decoded with TensorFlow's decoders (as training decodes it); files that fail are left
    out and listed in index["skipped"] (paths relative to `src`). Records keep the file's
    bytes, except that images whose longer side exceeds `max_side` px are resized to it
    (aspect kept, antialiased) and re-encoded as JPEG at `quality`, and GIF or BMP content
    under a .jpg/.png name is re-encoded as PNG.

    Shards are written in out/.partial/ and renamed into `out` only when complete, and
    index.json is written last, so a killed run never leaves a partial shard in `out`.
    A leftover out/.partial/ is removed first.

    Args:
        shards: shards per split (at most one per file); default `default_num_shards`.
        workers: images decoded in parallel (default: os.cpu_count()).
        progress: called as progress(files_done, files_total) while writing.

    Returns:
        The index, as written to out/index.json.

    Raises:
        UsageError: bad source folder, an --out holding a dataset without `overwrite`,
            an unwritable --out or a full disk, or a train split of which no image decodes.
    """
    found = scan_folder(src, flag="--src")
    splits, class_names = found.splits, found.class_names
    check_out_dir(out, overwrite)
    workers = workers or os.cpu_count() or 1
    try:
        os.makedirs(out, exist_ok=True)
        partial = os.path.join(out, PARTIAL_DIR)
        shutil.rmtree(partial, ignore_errors=True)  # left by a killed run
        if overwrite:
            # The index goes first: an interrupted overwrite must not leave an index
            # describing shards that are being replaced.
            if os.path.exists(os.path.join(out, INDEX_FILE)):
                os.remove(os.path.join(out, INDEX_FILE))
            for f in os.listdir(out):
                if f.endswith(SHARD_SUFFIX):
                    os.remove(os.path.join(out, f))
        os.makedirs(partial)
    except OSError as e:
        raise UsageError(f"--out {out!r} cannot be written ({e.strerror}); choose another --out")

    total = sum(len(s.files) for s in splits.values())
    index = {
        "format": INDEX_FORMAT,
        "version": INDEX_VERSION,
        "source": os.path.abspath(src),
        "class_names": class_names,
        "splits": {},
        "skipped": [],
        "max_side": max_side,
        "seed": seed,
    }
    done = 0
    try:
        for name, split in splits.items():
            report = None if progress is None else (lambda n, base=done: progress(base + n, total))
            try:
                entries, skipped, sizes = _write_split(
                    name, split, out, partial, shards, max_side, quality, seed, workers, report
                )
            except (OSError, tf.errors.OpError) as e:  # a full disk, mostly
                reason = e.strerror if isinstance(e, OSError) else _first_line(e)
                raise UsageError(
                    f"cannot write the shards to {out!r} ({reason}); free some space or choose another --out"
                )
            count = sum(e["count"] for e in entries)
            if name == "train" and count == 0:
                for entry in entries:
                    os.remove(os.path.join(out, entry["file"]))
                raise UsageError(
                    f"none of the {len(split.files)} image files in {split.root!r} could be decoded; "
                    "check that --src holds JPEG or PNG images"
                )
            index["splits"][name] = {"count": count, "shards": entries}
            if sizes:  # what config.choose_preset reads to fit the preset to the images
                index["splits"][name]["median_size"] = {
                    "width": int(np.median([w for w, _ in sizes])),
                    "height": int(np.median([h for _, h in sizes])),
                    "shorter": int(np.median([min(w, h) for w, h in sizes])),
                }
            index["skipped"].extend(os.path.relpath(f, src) for f in skipped)
            done += len(split.files)
        write_json_atomic(os.path.join(out, INDEX_FILE), index)
        _fsync_dir(out)
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return index


def _write_split(name, split, out, partial, shards, max_side, quality, seed, workers, progress):
    """Write one split's shards; returns (index entries, files skipped, (width, height)
    of every image written, as stored)."""
    files, labels = split.files, split.labels
    labelled = labels is not None
    # Non-regular files (FIFOs, sockets) would block or fail the reader; skip them up front.
    skipped = [f for f in files if not os.path.isfile(f)]
    if skipped:
        keep = [i for i, f in enumerate(files) if os.path.isfile(f)]
        files = [files[i] for i in keep]
        labels = None if labels is None else [labels[i] for i in keep]
    order = np.random.default_rng(seed).permutation(len(files))
    files = [files[i] for i in order]
    labels = [-1] * len(files) if labels is None else [labels[i] for i in order]
    prefix = os.path.join(split.root, "")  # catalog.image_files joins onto the root as given
    relnames = [f[len(prefix):] if f.startswith(prefix) else os.path.relpath(f, split.root) for f in files]
    if shards:
        n_shards = max(1, min(shards, len(files)))
    else:
        n_shards = default_num_shards(len(files), sum(_size(f) for f in files))
    _allow_open_files(n_shards)

    # The shuffled images are dealt to the shards in turn, all shards open at once: each
    # shard gets n//N or n//N+1 of the n images that decode, however many files fail,
    # and each image is decoded once. Shards are renamed into `out` when all are complete.
    names = [shard_name(name, i, n_shards) for i in range(n_shards)]
    writers = [tf.io.TFRecordWriter(os.path.join(partial, f)) for f in names]
    seen = np.zeros(len(files), bool)
    written = 0
    sizes = []
    shard_labels = [[] for _ in names]  # recorded in the index: no pass over the records to learn them
    try:
        for encoded, fmt, height, width, pos in _encoded_images(files, max_side, quality, workers):
            for k in range(len(pos)):
                p = int(pos[k])
                example = make_example(encoded[k], labels[p], height[k], width[k], fmt[k], relnames[p])
                writers[written % n_shards].write(example)
                shard_labels[written % n_shards].append(int(labels[p]))
                sizes.append((int(width[k]), int(height[k])))
                written += 1
                seen[p] = True
            if progress is not None:
                progress(int(pos[-1]) + 1 + len(skipped))
    finally:
        for writer in writers:
            writer.close()
    if progress is not None:
        progress(len(files) + len(skipped))
    entries = []
    for i, file in enumerate(names):
        tmp = os.path.join(partial, file)
        _fsync(tmp)  # the rename must not publish a shard whose data is still in flight
        os.replace(tmp, os.path.join(out, file))
        entry = {"file": file, "count": len(shard_labels[i]), "bytes": os.path.getsize(os.path.join(out, file))}
        if labelled:
            entry["labels"] = shard_labels[i]
        entries.append(entry)
    skipped += [files[i] for i in np.flatnonzero(~seen)]
    return entries, sorted(skipped), sizes


def _allow_open_files(n_shards: int) -> None:
    """Raise the open-file limit to hold `n_shards` writers, or say how to need fewer."""
    need = n_shards + 256  # and TensorFlow's own files, the source images in flight
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < need:
        if hard != resource.RLIM_INFINITY and hard < need:
            raise UsageError(
                f"writing {n_shards} shards at once needs {need} open files, but this system allows "
                f"{hard}; pass --shards {max(1, hard - 256)} or fewer"
            )
        resource.setrlimit(resource.RLIMIT_NOFILE, (need, hard))


_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _encoded_images(files: list[str], max_side: int | None, quality: int, workers: int):
    """Batches of (encoded, format, height, width, position) for the files that decode,
    in file order; positions index `files`, so the gaps are the files that failed."""

    def load(path, position):
        raw = tf.io.read_file(path)
        # The decoder training uses (`data._decode` calls the same libjpeg/libpng code).
        # One op rather than _decode itself: its nested control flow, which picks a
        # reduced JPEG scale, halves the throughput on small images. Decode and read
        # errors drop the file (ignore_errors below).
        image = tf.io.decode_image(raw, channels=3, dtype=tf.uint8, expand_animations=False)
        shape = tf.shape(image, out_type=tf.int64)
        height, width = shape[0], shape[1]
        tf.debugging.assert_less_equal(height * width, tf.constant(MAX_PIXELS, tf.int64), message="image too large")
        is_jpeg = tf.io.is_jpeg(raw)
        is_png = tf.equal(tf.strings.substr(raw, 0, len(_PNG_MAGIC)), _PNG_MAGIC)
        large = tf.constant(False) if max_side is None else tf.maximum(height, width) > max_side

        def reencode():
            # GIF or BMP content under a .png/.jpg name: the PNG of what training sees.
            as_png = lambda: (tf.io.encode_png(image), tf.constant(b"png"), height, width)
            return as_png() if max_side is None else tf.cond(large, shrink, as_png)

        def shrink():
            scale = max_side / tf.cast(tf.maximum(height, width), tf.float64)
            size = tf.maximum(tf.cast(tf.round(tf.cast(shape[:2], tf.float64) * scale), tf.int64), 1)
            small = tf.image.resize(image, tf.cast(size, tf.int32), method="bilinear", antialias=True)
            small = tf.cast(tf.clip_by_value(tf.round(small), 0, 255), tf.uint8)
            return tf.io.encode_jpeg(small, quality=quality), tf.constant(b"jpeg"), size[0], size[1]

        keep = lambda: (raw, tf.where(is_jpeg, tf.constant(b"jpeg"), tf.constant(b"png")), height, width)
        encoded, fmt, height, width = tf.cond((is_jpeg | is_png) & ~large, keep, reencode)
        return encoded, fmt, height, width, position

    # Threads in one process rather than worker processes: each process would pay
    # TensorFlow's ~4 s import first. Measured on 2 cores, 2,000 CIFAR-10 JPEGs: 4.8-5.0 s
    # for the whole command this way, 10.3-11.4 s with a spawn or forkserver pool of 2.
    options = tf.data.Options()
    options.threading.private_threadpool_size = workers
    options.threading.max_intra_op_parallelism = 1  # parallel over images, not within one
    paths = tf.constant([os.fsencode(f) for f in files], dtype=tf.string)
    ds = (
        tf.data.Dataset.from_tensor_slices((paths, tf.range(len(files), dtype=tf.int64)))
        .map(load, num_parallel_calls=workers, deterministic=True)
        .ignore_errors()
        .batch(64)
        .prefetch(2)
        .with_options(options)
    )
    return ds.as_numpy_iterator()


def _size(path: str) -> int:
    try:
        return os.path.getsize(path)
    except OSError:
        return 0


def _fsync(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: str) -> None:
    try:
        _fsync(path)
    except OSError:
        pass  # some filesystems cannot sync a directory; the renames are still atomic
