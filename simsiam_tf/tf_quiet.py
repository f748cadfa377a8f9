"""Import TensorFlow without its start-up noise on stderr.

TensorFlow writes a few lines to stderr before its C++ logging is set up, so
TF_CPP_MIN_LOG_LEVEL does not hide them. On a CPU-only machine one of them is
"failed call to cuInit: ... CUDA error", which newcomers read as a failure. They come
at `import tensorflow` and at the first device query.

`import_tensorflow()`, or a `with first_import():` block, runs both with file
descriptor 2 pointed at a temporary file. Then, in a `finally`, it restores fd 2 and
writes back every captured line that is not in NOISE. Other lines, Python's own stderr writes and a traceback raised in the
window all still reach stderr. A process killed by a signal inside the window loses
what the window captured; the window lasts only the import.

When the user has set TF_CPP_MIN_LOG_LEVEL (any value), nothing is hidden: they asked
for the logs. Otherwise the level is set to 2 (TensorFlow's errors only).

This module imports no TensorFlow at its top: entry points import it before parsing
their arguments and call `import_tensorflow()` only for a command that will run.
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
import tempfile

LEVEL = "2"  # hide TensorFlow's C++ INFO and WARNING lines; keep its errors
# Set beside TF_CPP_MIN_LOG_LEVEL when this module chose the level, so that a child
# process (a benchmark's train.py) can tell it from a level the user asked for.
MARK = "SIMSIAM_TF_QUIET_LEVEL"

_GLOG = r"^[IWEF]\d{4} [\d:.]+\s+\d+ "  # absl's line prefix: I0000 00:00:1796532557.472800   22747
NOISE = tuple(
    re.compile(p)
    for p in (
        r"^WARNING: All log messages before absl::InitializeLog\(\) is called are written to STDERR$",
        _GLOG + r"port\.cc:\d+\] oneDNN custom operations are on\.",
        _GLOG + r"cudart_stub\.cc:\d+\] Could not find cuda drivers on your machine, GPU will not be used\.",
        # Error 303: no CUDA driver library at all (a CPU-only machine). A GPU machine
        # whose driver fails gets another code and still sees the line.
        _GLOG + r"cuda_platform\.cc:\d+\] failed call to cuInit: .*\(303\)$",
        # The CUDA build's plug-ins registered twice (TensorFlow and JAX or PyTorch in one process).
        _GLOG + r"cuda_(dnn|fft|blas)\.cc:\d+\] Unable to register cu(DNN|FFT|BLAS) factory: Attempting to register "
        r"factory for plugin cu(DNN|FFT|BLAS) when one has already been registered$",
        _GLOG + r"computation_placer\.cc:\d+\] computation placer already registered\.",
    )
)


def user_asked_for_logs(environ=None) -> bool:
    """Whether TF_CPP_MIN_LOG_LEVEL was set by the user rather than by this module."""
    environ = os.environ if environ is None else environ
    level = environ.get("TF_CPP_MIN_LOG_LEVEL")
    return level is not None and level != environ.get(MARK)


def is_noise(line: str) -> bool:
    """Whether `line` (without its newline) is one of TensorFlow's known start-up lines."""
    return any(p.search(line) for p in NOISE)


@contextlib.contextmanager
def hidden_noise():
    """Capture fd 2 for the block; then restore it and write back all but the noise.

    Works on the file descriptor, so it catches C++ writes as well as Python's. If
    fd 2 cannot be duplicated (closed, as under some daemons), the block runs as it is.
    """
    _flush_stderr()
    try:
        saved = os.dup(2)
    except OSError:
        yield
        return
    capture = tempfile.TemporaryFile()
    try:
        os.dup2(capture.fileno(), 2)
        yield
    finally:
        _flush_stderr()
        os.dup2(saved, 2)
        os.close(saved)
        capture.seek(0)
        kept = b"".join(
            line for line in capture.read().splitlines(keepends=True)
            if not is_noise(line.decode("utf-8", "replace").rstrip("\r\n"))
        )
        capture.close()
        _write_all(2, kept)


@contextlib.contextmanager
def first_import():
    """Run a block that may import TensorFlow first, with its start-up noise hidden.

    If the block imported TensorFlow, its first device query runs inside the window
    too: the cuInit line comes there, not at the import. Does nothing when TensorFlow
    is already imported or the user set TF_CPP_MIN_LOG_LEVEL.
    """
    if "tensorflow" in sys.modules or user_asked_for_logs():
        yield
        return
    os.environ["TF_CPP_MIN_LOG_LEVEL"] = os.environ[MARK] = LEVEL
    with hidden_noise():
        yield
        tf = sys.modules.get("tensorflow")
        if tf is not None:
            tf.config.list_physical_devices()


def import_tensorflow():
    """`import tensorflow` and its first device query, without the start-up noise.

    Returns the module. Call it where the command first needs TensorFlow, after its
    arguments and paths are checked.
    """
    with first_import():
        import tensorflow as tf
    return tf


def _flush_stderr() -> None:
    with contextlib.suppress(Exception):
        sys.stderr.flush()


def _write_all(fd: int, data: bytes) -> None:
    while data:
        try:
            data = data[os.write(fd, data):]
        except OSError:
            return
