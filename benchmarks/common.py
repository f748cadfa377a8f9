"""Shared helpers for the benchmark scripts: machine description, timing, output.

Every benchmark prints a readable table and then one JSON line, so that numbers in the
docs can be traced to a command and re-measured.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The CIFAR-10 folder (train|test/<class>/*.jpg) the benchmarks read: data/cifar10 in the
# repository, as `python make_cifar10_folder.py --out data/cifar10` writes it, or the
# folder the environment variable SIMSIAM_CIFAR10 names. `cifar_folder()` checks it.
CIFAR_VARIABLE = "SIMSIAM_CIFAR10"
CIFAR = os.environ.get(CIFAR_VARIABLE) or os.path.join(REPO, "data", "cifar10")
MAKE_CIFAR = "python make_cifar10_folder.py --out data/cifar10"
if REPO not in sys.path:
    sys.path.insert(0, REPO)
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
import simsiam_tf  # noqa: E402,F401  (before tensorflow: switches on oneDNN, see simsiam_tf/__init__.py)
from simsiam_tf.cli import Parser  # noqa: E402,F401  (every script's parser: one-line errors, exit 2)


def _whole(text: str, least: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}")
    if value < least:
        raise argparse.ArgumentTypeError(f"expected a whole number >= {least}, got {value}")
    return value


def positive_int(text: str) -> int:
    """argparse type: a whole number >= 1 (batch sizes, steps, counts)."""
    return _whole(text, 1)


def batch_size(text: str) -> int:
    """argparse type: a batch of at least 2 (BatchNorm needs two images)."""
    return _whole(text, 2)


def nonnegative_int(text: str) -> int:
    """argparse type: a whole number >= 0 (0 = off or the default)."""
    return _whole(text, 0)


def nonnegative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}")
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text}")
    return value


def missing_cifar(folder: str = CIFAR) -> str | None:
    """Why `folder` is no CIFAR-10 folder (one line naming how to make one), or None."""
    if os.path.isdir(os.path.join(folder, "train")):
        return None
    shown = os.path.relpath(folder) if not os.path.relpath(folder).startswith("..") else folder
    named = f" (${CIFAR_VARIABLE})" if os.environ.get(CIFAR_VARIABLE) and folder == CIFAR else ""
    return (f"no CIFAR-10 folder at {shown}{named}: make it with `{MAKE_CIFAR}` (run in the repository), "
            f"or set {CIFAR_VARIABLE} to a folder train|test/<class>/*.jpg")


def cifar_folder() -> str:
    """CIFAR, checked: a missing folder ends the script with one line and exit 2."""
    why = missing_cifar()
    if why:
        print(f"{os.path.basename(sys.argv[0]) or 'benchmark'}: error: {why}", file=sys.stderr)
        raise SystemExit(2)
    return CIFAR


def existing_dir(text: str) -> str:
    """argparse type: a directory that exists."""
    if not os.path.isdir(text):
        raise argparse.ArgumentTypeError(f"{text!r} is not a directory" if os.path.exists(text) else f"{text!r} does not exist")
    return text


def machine() -> dict:
    """CPU model, core count and the instruction-set extensions that matter for bf16."""
    from simsiam_tf.distribute import cpu_flags

    model = "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), model)
    except OSError:
        pass
    flags = cpu_flags()
    wanted = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")
    return {
        "cpu": model,
        "cores": os.cpu_count(),
        "isa": [f for f in wanted if f in flags],
        # oneDNN's instruction-set cap, when set: kernels of an older CPU on this one.
        **({"onednn_max_cpu_isa": os.environ["ONEDNN_MAX_CPU_ISA"]} if os.environ.get("ONEDNN_MAX_CPU_ISA") else {}),
        "python": platform.python_version(),
    }


def median_seconds(fn, warmup: int, repeats: int) -> float:
    """Median wall time of `fn()` over `repeats` calls, after `warmup` untimed calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def report(name: str, rows: list[dict], columns: list[tuple[str, str]], extra: dict | None = None) -> None:
    """Print `rows` as a table of `columns` (key, header), then one JSON line."""
    widths = [max([len(h)] + [len(_fmt(r.get(k))) for r in rows]) for k, h in columns]
    print("  ".join(h.ljust(w) for (_, h), w in zip(columns, widths)))
    for r in rows:
        print("  ".join(_fmt(r.get(k)).ljust(w) for (k, _), w in zip(columns, widths)))
    print(json.dumps({"benchmark": name, "machine": machine(), **(extra or {}), "rows": rows}))


def _fmt(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:,.1f}" if abs(value) >= 10 else f"{value:.3f}"
    return str(value)


# ImageNet's typical image: about 500 x 375, JPEG. CIFAR-10 upscaled to that size and
# re-encoded, so that decode and crop costs are those of photos (docs/data.md).
PHOTO_SIZE = (375, 500)  # height, width
PHOTO_QUALITY = 90


def photo_folder(count: int, grain: float = 0.0) -> str:
    """A folder train/<class>/*.jpg (and test/, a quarter as many) of the first `count`
    CIFAR-10 training images (spread over the classes) upscaled to 500 x 375 (bicubic)
    and re-encoded as JPEG at quality 90, with Gaussian grain of std `grain` added when
    given (upscaled CIFAR is smoother than a photo, so it decodes faster; grain brings
    the file size towards ImageNet's ~110 KB).

    Made once in the system's temp dir and reused; never inside the repository.
    """
    import tempfile

    import tensorflow as tf

    root = os.path.join(tempfile.gettempdir(), "simsiam-tf-bench", f"cifar-{count}-500x375-q90-grain{grain:g}")
    done = os.path.join(root, ".complete")
    if os.path.exists(done):
        return root
    cifar = cifar_folder()
    classes = sorted(os.listdir(os.path.join(cifar, "train")))
    jobs = []
    for split, n in (("train", count), ("test", max(len(classes), count // 4))):
        per_class = -(-n // len(classes))
        for c in classes:
            os.makedirs(os.path.join(root, split, c), exist_ok=True)
            for name in sorted(os.listdir(os.path.join(cifar, split, c)))[:per_class]:
                jobs.append((os.path.join(cifar, split, c, name), os.path.join(root, split, c, name)))

    def convert(src, dst):
        image = tf.image.resize(tf.io.decode_jpeg(tf.io.read_file(src), channels=3), PHOTO_SIZE, method="bicubic")
        if grain:
            seed = tf.stack([tf.strings.to_hash_bucket_fast(dst, 2**31), 0])
            image += tf.random.stateless_normal(tf.shape(image), tf.cast(seed, tf.int64), stddev=grain)
        image = tf.cast(tf.clip_by_value(tf.round(image), 0, 255), tf.uint8)
        with tf.control_dependencies([tf.io.write_file(dst, tf.io.encode_jpeg(image, quality=PHOTO_QUALITY))]):
            return tf.constant(0)

    srcs, dsts = zip(*jobs)
    ds = tf.data.Dataset.from_tensor_slices((list(srcs), list(dsts))).map(convert, num_parallel_calls=tf.data.AUTOTUNE)
    for _ in ds:
        pass
    open(done, "w").close()
    return root


def training_input(dataset: str, image_size: int, kind: str):
    """The training input train.py would read for `--dataset dataset --image-size
    image_size --input kind` ("memory" or "stream"), every training image kept (no
    validation split held out): `simsiam_tf.input.open_input`."""
    from simsiam_tf.config import make_config
    from simsiam_tf.input import open_input

    config = make_config(dataset=dataset, image_size=image_size, input=kind, val_fraction=0.0)
    return open_input(config)[0]


def peak_rss_mb() -> float:
    """This process's peak resident memory so far, in MiB (Linux: ru_maxrss is in KiB)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def current_rss_mb() -> float:
    """This process's resident memory now, in MiB (Linux /proc/self/status)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")
