"""The typical size of a folder's images, read from their headers.

`config.choose_preset` uses it to give a `folder:PATH` dataset the preset that fits its
images. It imports neither TensorFlow nor NumPy, and Pillow reads only each file's
header (`Image.open` is lazy), so it runs before TensorFlow starts and costs
milliseconds, plus the listing of the folder.
"""

from __future__ import annotations

import dataclasses
import os
import statistics

from simsiam_tf.input.catalog import image_files, train_root

SAMPLE_FILES = 200


@dataclasses.dataclass(frozen=True)
class SizeSample:
    """Median image size of a sample of files.

    Attributes:
        width, height: medians of the sampled images' widths and heights, in pixels.
        shorter: median of each image's shorter side, in pixels.
        read: files whose header gave a size; sampled: files tried.
    """

    width: int
    height: int
    shorter: int
    read: int
    sampled: int


def sample_files(path: str, count: int = SAMPLE_FILES) -> list[str]:
    """Up to `count` image files of the folder dataset PATH, the same ones every time.

    The training split's image files as `input.catalog` finds them (PATH/train, else
    PATH; sorted, symlinked directories not followed), `count` of them taken at even
    spacing, so every class folder is represented in proportion to its size. Returns []
    for a missing or empty folder.
    """
    files = image_files(train_root(path)) if os.path.isdir(path) else []
    if len(files) <= count:
        return files
    return [files[i * len(files) // count] for i in range(count)]


def median_size(path: str, count: int = SAMPLE_FILES) -> SizeSample | None:
    """The median size of up to `count` images of the folder dataset PATH (`sample_files`).

    Only headers are read. Files Pillow cannot open are left out of the medians; None
    when no file gave a size (a missing or empty folder, or no readable image), so the
    caller's own checks report the folder.
    """
    from PIL import Image

    files = sample_files(path, count)
    sizes = []
    for name in files:
        try:
            with Image.open(name) as image:
                sizes.append(image.size)  # (width, height), before any EXIF rotation
        except (OSError, ValueError, Image.DecompressionBombError):
            continue
    if not sizes:
        return None
    return SizeSample(
        width=int(statistics.median(w for w, _ in sizes)),
        height=int(statistics.median(h for _, h in sizes)),
        shorter=int(statistics.median(min(w, h) for w, h in sizes)),
        read=len(sizes),
        sampled=len(files),
    )


def index_median_size(spec: str) -> SizeSample | None:
    """The median size of the training images of the TFRecord shards `spec` (a directory
    or a glob of shards), as prepare.py recorded it in their directory's index.json.

    None when there is no such index, or it predates the record (shards from other
    tools, or from an older prepare.py); the shard reader reports a broken index.
    """
    import json

    directory = spec if os.path.isdir(spec) else os.path.dirname(spec)
    try:
        with open(os.path.join(directory, "index.json")) as f:
            train = json.load(f)["splits"]["train"]
        size = train["median_size"]
        return SizeSample(width=int(size["width"]), height=int(size["height"]), shorter=int(size["shorter"]),
                          read=int(train["count"]), sampled=int(train["count"]))
    except (OSError, ValueError, KeyError, TypeError):
        return None
