"""A newcomer's first commands: no TensorFlow start-up noise, and bad input fails at once.

TensorFlow prints a few lines before its logging is set up, whatever
TF_CPP_MIN_LOG_LEVEL says; one reads "failed call to cuInit: ... CUDA error" on a
CPU-only machine. simsiam_tf.tf_quiet hides them unless the user set the level.
"""

import os
import subprocess
import sys

import pytest
from conftest import REPO

from simsiam_tf import tf_quiet

# Substrings of the start-up lines, written here rather than taken from tf_quiet.NOISE.
NOISE = ("absl::InitializeLog", "oneDNN custom operations", "Could not find cuda drivers", "cuInit")

# Lines TensorFlow 2.21 printed on a 2-core AMD EPYC, AVX512-BF16, 2026-12-06.
SEEN = (
    "WARNING: All log messages before absl::InitializeLog() is called are written to STDERR",
    "I0000 00:00:1796532557.472800   22747 port.cc:153] oneDNN custom operations are on. You may see slightly "
    "different numerical results due to floating-point round-off errors from different computation orders. To turn "
    "them off, set the environment variable `TF_ENABLE_ONEDNN_OPTS=0`.",
    "I0000 00:00:1796532557.473106   22747 cudart_stub.cc:31] Could not find cuda drivers on your machine, GPU will "
    "not be used.",
    "E0000 00:00:1796532571.562365   23394 cuda_platform.cc:52] failed call to cuInit: INTERNAL: CUDA error: Failed "
    "call to cuInit: UNKNOWN ERROR (303)",
)


def _env(**extra):
    env = {k: v for k, v in os.environ.items() if k not in ("TF_CPP_MIN_LOG_LEVEL", tf_quiet.MARK)}
    return {**env, **extra}


def _python(code, env, timeout=120):
    return subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=timeout)


def _noise(stderr):
    return [line for line in stderr.splitlines() if any(n in line for n in NOISE)]


@pytest.mark.parametrize("line", SEEN)
def test_the_lines_seen_on_this_machine_are_noise(line):
    assert tf_quiet.is_noise(line)


@pytest.mark.parametrize("line", [
    # A GPU machine whose driver fails: the user needs to see it.
    "E0000 00:00:1796532571.562365   23394 cuda_platform.cc:52] failed call to cuInit: CUDA_ERROR_NO_DEVICE: no "
    "CUDA-capable device is detected (100)",
    "E0000 00:00:1796532571.562365   23394 some_kernel.cc:12] a real error",
    "Traceback (most recent call last):",
])
def test_other_lines_are_not_noise(line):
    assert not tf_quiet.is_noise(line)


def test_a_level_this_module_set_is_not_the_users():
    assert not tf_quiet.user_asked_for_logs({})
    assert tf_quiet.user_asked_for_logs({"TF_CPP_MIN_LOG_LEVEL": "0"})
    # A child process (a benchmark's train.py) inherits the level and the mark: still quiet.
    assert not tf_quiet.user_asked_for_logs({"TF_CPP_MIN_LOG_LEVEL": tf_quiet.LEVEL, tf_quiet.MARK: tf_quiet.LEVEL})
    # The user changed the level afterwards: theirs.
    assert tf_quiet.user_asked_for_logs({"TF_CPP_MIN_LOG_LEVEL": "0", tf_quiet.MARK: tf_quiet.LEVEL})


def test_a_short_training_run_prints_no_start_up_noise(tmp_path):
    command = [sys.executable, "train.py", "--epochs", "1", "--train-limit", "64", "--batch-size", "16",
               "--knn-every", "0", "--diag-every", "0", "--projector-images", "0"]

    def train(logdir, **env):
        return subprocess.run([*command, "--logdir", str(tmp_path / logdir)], cwd=REPO, env=_env(**env),
                              capture_output=True, text=True, timeout=600)

    quiet = train("quiet")
    assert quiet.returncode == 0, quiet.stderr[-2000:]
    assert "Training SimSiam" in quiet.stdout
    assert _noise(quiet.stderr) == []
    # The user's own level is respected, and shows the noise exists here.
    loud = train("loud", TF_CPP_MIN_LOG_LEVEL="0")
    assert loud.returncode == 0, loud.stderr[-2000:]
    if not any("oneDNN custom operations" in line for line in loud.stderr.splitlines()):
        pytest.skip("this TensorFlow prints no oneDNN line on this CPU, so nothing shows the noise exists here")


def test_other_lines_written_in_the_window_reach_stderr():
    code = (
        "import os, sys\n"
        "from simsiam_tf import tf_quiet\n"
        "with tf_quiet.hidden_noise():\n"
        f"    os.write(2, {(SEEN[0] + chr(10)).encode()!r})\n"
        "    os.write(2, b'native code: disk full\\n')\n"
        f"    os.write(2, {(SEEN[3] + chr(10)).encode()!r})\n"
        "    print('python: a warning', file=sys.stderr)\n"
        "print('after the window', file=sys.stderr)\n"
    )
    result = _python(code, _env())
    assert result.returncode == 0, result.stderr
    assert result.stderr.splitlines() == ["native code: disk full", "python: a warning", "after the window"]


def test_a_traceback_raised_in_the_window_is_shown():
    code = (
        "import os\n"
        "from simsiam_tf import tf_quiet\n"
        "with tf_quiet.hidden_noise():\n"
        "    os.write(2, b'written before the error\\n')\n"
        "    raise RuntimeError('boom in the window')\n"
    )
    result = _python(code, _env())
    assert result.returncode == 1
    assert "written before the error" in result.stderr
    assert "Traceback (most recent call last):" in result.stderr
    assert "RuntimeError: boom in the window" in result.stderr


def test_import_tensorflow_hides_the_noise_and_keeps_the_rest():
    code = (
        "import os, sys\n"
        "from simsiam_tf import tf_quiet\n"
        "with tf_quiet.first_import():\n"
        "    os.write(2, b'native code: kept\\n')\n"
        "    import tensorflow as tf\n"
        "print(os.environ['TF_CPP_MIN_LOG_LEVEL'], tf.config.list_physical_devices('CPU')[0].device_type)\n"
    )
    result = _python(code, _env())
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split() == [tf_quiet.LEVEL, "CPU"]
    assert "native code: kept" in result.stderr
    assert _noise(result.stderr) == []


# Runs an entry point as `python SCRIPT ARGS` (or `python -m MODULE ARGS`) would, then
# prints on stdout whether TensorFlow was imported.
WRAPPER = """
import atexit, os, runpy, sys
atexit.register(lambda: print("tensorflow imported:", "tensorflow" in sys.modules))
target, sys.argv = sys.argv[1], sys.argv[1:]
if target.startswith("-m"):
    runpy.run_module(target[2:], run_name="__main__", alter_sys=True)
else:
    sys.path[0] = os.path.dirname(os.path.abspath(target))
    runpy.run_path(target, run_name="__main__")
"""


def _entry_point_cases():
    missing = "/nonexistent-simsiam-path"
    cases = []
    for script in ("train.py", "evaluate.py", "export.py", "analyze.py", "prepare.py", "make_cifar10_folder.py",
                   "serving/local_server.py", "serving/client.py", "serving/similar.py", "-msimsiam_tf.data_service"):
        cases.append((script, ["--no-such-flag"], "error:"))
    cases += [
        ("train.py", ["--dataset", f"folder:{missing}"], "does not exist"),
        ("evaluate.py", ["--run", missing], "is not a directory"),
        ("evaluate.py", ["--run", "EMPTY"], "config.json does not exist"),
        ("evaluate.py", ["--saved-model", missing], "is not a directory"),
        ("export.py", ["--run", missing], "is not a directory"),
        ("export.py", ["--run", "EMPTY"], "config.json does not exist"),
        ("analyze.py", ["--run", missing], "is not a directory"),
        ("prepare.py", ["--src", missing, "--out", "EMPTY/out"], "does not exist"),
        ("make_cifar10_folder.py", ["--out", "FILE"], "is a file"),
        ("serving/local_server.py", ["--model_base_path", missing], "is not a directory"),
        ("serving/client.py", ["--folder", missing, "--out", "EMPTY/out.jsonl"], "is not a directory"),
        ("serving/similar.py", ["--embeddings", missing, "--query", "x.jpg"], "holds no embeddings"),
        ("-msimsiam_tf.data_service", ["dispatcher", "--work-dir", "FILE"], "is a file"),
        ("-msimsiam_tf.data_service", ["worker", "--dispatcher", "no-port"], "expected HOST:PORT"),
    ]
    return cases


@pytest.mark.parametrize("script, args, message", _entry_point_cases())
def test_bad_input_fails_in_one_line_before_tensorflow(script, args, message, tmp_path):
    (tmp_path / "EMPTY").mkdir()
    (tmp_path / "FILE").write_text("not a folder")
    args = [str(tmp_path / a) if a.split("/")[0] in ("EMPTY", "FILE") else a for a in args]
    result = subprocess.run([sys.executable, "-c", WRAPPER, script, *args], cwd=REPO, env=_env(),
                            capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert len(result.stderr.splitlines()) == 1, result.stderr
    assert message in result.stderr
    assert result.stdout.splitlines()[-1] == "tensorflow imported: False"
