"""Errors that name the fix: each message below is provoked, read as the user reads it
(one `train.py: error:` line, no traceback, its exit code), and the command it advises
is run and must work."""

import functools
import json
import math
import os
import shlex
import signal
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf

import tfds_tiny
import train
from simsiam_tf.input import tfds_data
from simsiam_tf import distribute, rundir, training
from simsiam_tf.config import UsageError, load_config, make_config, save_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# 72 images leave 65 after the validation split: two steps of 32 per epoch.
TINY = ["--width", "8", "--proj-dim", "64", "--batch-size", "32", "--train-limit", "72", "--knn-every", "1",
        "--diag-every", "0", "--precision", "float32"]


def _one_error_line(err):
    lines = [l for l in err.splitlines() if "error:" in l]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def _advised(line, after=": "):
    """The `python train.py ...` command a message ends with (or holds before ', or')."""
    command = line[line.index("python train.py"):].split(", or ")[0].split(" (or ")[0]
    return shlex.split(command)[2:]


class _LearningRates(keras.callbacks.Callback):
    """Records (optimizer step, learning rate) at the start of every step."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def on_train_batch_begin(self, batch, logs=None):
        opt = self.model.optimizer
        self.seen.append((int(opt.iterations.numpy()), float(keras.ops.convert_to_numpy(opt.learning_rate))))


class _Fault(keras.callbacks.Callback):
    """Raises `error` at the first step of epoch `epoch` (0-based)."""

    def __init__(self, epoch, error):
        super().__init__()
        self.epoch, self.error, self.current = epoch, error, None

    def on_epoch_begin(self, epoch, logs=None):
        self.current = epoch

    def on_train_batch_begin(self, batch, logs=None):
        if self.current == self.epoch:
            raise self.error


class _PoisonAt(keras.callbacks.Callback):
    """A NaN kernel at the start of epoch `epoch` (0-based): the loss diverges."""

    def __init__(self, epoch):
        super().__init__()
        self.epoch = epoch

    def on_epoch_begin(self, epoch, logs=None):
        if epoch == self.epoch:
            kernel = self.model.predictor.layers[-1].kernel
            kernel.assign(np.full(kernel.shape, np.nan, np.float32))


def _patch_run(monkeypatch, *callbacks):
    monkeypatch.setattr(training, "run", functools.partial(_real_run, verbose=0, extra_callbacks=list(callbacks)))


_real_run = training.run


def _cosine(base_lr, batch, epoch, epochs):
    return base_lr * batch / 256 * 0.5 * (1 + math.cos(math.pi * epoch / epochs))


# --- out of memory -------------------------------------------------------------------


def test_out_of_memory_names_a_smaller_batch_and_the_advised_resume_works(tmp_path, monkeypatch, capsys):
    logdir = str(tmp_path / "run")
    oom = tf.errors.ResourceExhaustedError(None, None, "OOM when allocating tensor with shape[32,8,32,32]")
    _patch_run(monkeypatch, _Fault(1, oom))
    code = train.main([*TINY, "--epochs", "3", "--logdir", logdir])
    line = _one_error_line(capsys.readouterr().err)
    assert code == 4 == train.EXIT_CODES["out_of_memory"]
    assert line.startswith("train.py: error: out of memory at global batch 32 (32 per replica on 1 replica(s))")
    assert f"epoch 1 is kept in {os.path.join(logdir, 'checkpoints', 'last')}" in line
    assert f"python train.py --resume {logdir} --batch-size 16" in line

    rates = _LearningRates()
    _patch_run(monkeypatch, rates)
    assert train.main(_advised(line)) == 0
    out = capsys.readouterr().out
    assert "note: from epoch 2 on, --batch-size 32 -> 16" in out and "epochs 2-3" in out
    config = load_config(os.path.join(logdir, "config.json"))
    assert config.batch_size == 16
    assert config.resume_changes == ({"from_epoch": 2, "batch_size": {"from": 32, "to": 16}},)
    # 65 images: 4 steps of 16 per epoch. The schedule continues at epoch 2 (not at the
    # epoch the old step count would give) with the rate of the new batch.
    assert rates.seen[0][0] == 4 and len(rates.seen) == 8
    assert rates.seen[0][1] == pytest.approx(_cosine(config.base_lr, 16, 1, 3), rel=1e-6)
    assert rates.seen[-1][1] == pytest.approx(_cosine(config.base_lr, 16, 2, 3), rel=1e-6)
    summary = json.loads(open(os.path.join(logdir, "summary.json")).read())
    assert summary["epochs_completed"] == 3 and [h["epoch"] for h in summary["history"]] == [1, 2, 3]


def test_out_of_memory_outside_a_step_says_how_to_start_again(tmp_path, monkeypatch, capsys):
    def no_memory(*args, **kwargs):
        raise MemoryError()

    monkeypatch.setattr(training, "run", no_memory)
    logdir = str(tmp_path / "run")
    assert train.main(["--epochs", "1", "--logdir", logdir]) == 4
    line = _one_error_line(capsys.readouterr().err)
    assert "out of memory while loading the data or building the model (MemoryError)" in line
    assert line.endswith(f"start again with a smaller --batch-size or --image-size: python train.py --epochs 1 --logdir {logdir}")
    assert not os.path.exists(logdir)


# --- divergence ----------------------------------------------------------------------


def test_divergence_advises_a_resume_at_half_the_lr_and_it_runs_at_that_rate(tmp_path, monkeypatch, capsys):
    logdir = str(tmp_path / "run")
    _patch_run(monkeypatch, _PoisonAt(1))
    assert train.main([*TINY, "--epochs", "2", "--lr", "0.8", "--logdir", logdir]) == 3
    line = _one_error_line(capsys.readouterr().err)
    assert "loss became nan at step 3 (epoch 2)" in line and "last good checkpoint (epoch 1)" in line
    assert f"Continue at half the learning rate with: python train.py --resume {logdir} --lr 0.4" in line

    rates = _LearningRates()
    _patch_run(monkeypatch, rates)
    assert train.main(_advised(line)) == 0
    assert "note: from epoch 2 on, --lr 0.8 -> 0.4" in capsys.readouterr().out
    config = load_config(os.path.join(logdir, "config.json"))
    assert config.base_lr == 0.4 and config.resume_changes == ({"from_epoch": 2, "base_lr": {"from": 0.8, "to": 0.4}},)
    assert rates.seen[0] == (2, pytest.approx(_cosine(0.4, 32, 1, 2), rel=1e-6))
    summary = json.loads(open(os.path.join(logdir, "summary.json")).read())
    assert summary["epochs_completed"] == 2 and np.isfinite(summary["loss"]) and "diverged" not in summary
    # The same command again (a scheduler's requeue) changes nothing more.
    assert rundir.resolve_resume(logdir, {"base_lr": 0.4}, announce=lambda *a, **k: None) == config


def test_resume_still_refuses_what_it_cannot_change(tmp_path):
    logdir = tmp_path / "run"
    logdir.mkdir()
    save_config(make_config("digits"), str(logdir / "config.json"))
    with pytest.raises(UsageError, match=r"these flags differ: width=32 .*only --lr, --batch-size, --micro-batch, --xla and --data-service-wire may change"):
        rundir.resolve_resume(str(logdir), {"width": 32, "base_lr": 0.1})
    with pytest.raises(UsageError, match=r"--batch-size must be at least 2"):
        rundir.resolve_resume(str(logdir), {"batch_size": 1}, announce=lambda *a, **k: None)


# --- Ctrl-C --------------------------------------------------------------------------


def test_ctrl_c_before_anything_is_saved_gives_a_restart_that_works(tmp_path, monkeypatch, capsys):
    logdir = tmp_path / "run"

    def interrupted_early(config, logdir, resume=False, **kwargs):
        os.makedirs(logdir)  # as training.run does just before writing config.json
        raise KeyboardInterrupt

    monkeypatch.setattr(training, "run", interrupted_early)
    argv = [*TINY, "--epochs", "1", "--logdir", str(logdir)]
    assert train.main(argv) == 130
    err = capsys.readouterr().err
    assert "Traceback" not in err and "--resume" not in err
    assert err.strip() == "train.py: interrupted before anything was saved; start again with: " + shlex.join(
        ["python", "train.py", *argv]
    )
    assert not logdir.exists()  # the empty directory it made is gone
    _patch_run(monkeypatch)
    assert train.main(_advised(err)) == 0
    assert json.loads((logdir / "summary.json").read_text())["epochs_completed"] == 1


def test_ctrl_c_after_config_json_continues_with_resume(tmp_path, monkeypatch, capsys):
    logdir = str(tmp_path / "run")

    def interrupted_after_config(config, logdir, resume=False, **kwargs):
        os.makedirs(logdir)
        save_config(config.replace(precision="float32", input="memory"), os.path.join(logdir, "config.json"))
        raise KeyboardInterrupt

    monkeypatch.setattr(training, "run", interrupted_after_config)
    assert train.main([*TINY, "--epochs", "1", "--logdir", logdir]) == 130
    err = capsys.readouterr().err.strip()
    assert err == (
        "train.py: interrupted; no epoch had completed (it starts again from epoch 1); "
        f"continue with: python train.py --resume {logdir}"
    )
    _patch_run(monkeypatch)
    assert train.main(_advised(err)) == 0
    assert json.loads(open(os.path.join(logdir, "summary.json")).read())["epochs_completed"] == 1


def test_sigint_while_starting_is_one_line_and_exit_130(tmp_path):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    logdir = tmp_path / "run"
    proc = subprocess.Popen(
        [sys.executable, os.path.join(REPO, "train.py"), "--epochs", "1", "--logdir", str(logdir)],
        cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
        # As from a terminal: a test run started in the background (`pytest &` in a
        # script) ignores SIGINT, and a child inherits that, so Python would never
        # raise KeyboardInterrupt and the run would simply finish.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    # Interrupted while loading the data and building the model, after the first line
    # training prints and before config.json: nothing saved yet.
    for line in proc.stdout:
        if line.startswith("precision:"):
            break
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    assert "Traceback" not in err
    assert "train.py: interrupted before anything was saved; start again with: python train.py --epochs 1" in err
    assert not logdir.exists()


# --- TFDS datasets that need a manual download ----------------------------------------


class TinyManualImages(tfds_tiny.TinyImages):
    """tiny_images whose files the user must fetch by hand (as imagenet2012's)."""

    MANUAL_DOWNLOAD_INSTRUCTIONS = "Download tiny.tar from the tiny site and place it in manual_dir."

    def _split_generators(self, dl_manager):
        if not (dl_manager.manual_dir / "tiny.tar").exists():
            raise AssertionError(f"tiny.tar not found in {dl_manager.manual_dir}")
        return super()._split_generators(dl_manager)


@pytest.mark.parametrize("name", ["imagenet2012", "tiny_manual_images"])
def test_tfds_manual_download_says_where_the_files_go(tmp_path, capsys, name):
    data_dir, logdir = tmp_path / "tfds", tmp_path / "run"
    code = train.main(["--dataset", name, "--data-dir", str(data_dir), "--logdir", str(logdir)])
    line = _one_error_line(capsys.readouterr().err)
    assert code == 2 and not logdir.exists()
    manual = os.path.join(str(data_dir), "downloads", "manual")
    assert f"tensorflow-datasets {name!r} needs a manual download and {manual} is missing or empty" in line
    assert f"Put those files in {manual}" in line
    assert "--dataset folder:PATH" in line and "python prepare.py --src PATH --out SHARDS" in line
    assert ("ILSVRC2012_img_train.tar" if name == "imagenet2012" else "tiny.tar") in line


def test_tfds_manual_download_with_the_wrong_files(tmp_path):
    manual = tmp_path / "downloads" / "manual"
    manual.mkdir(parents=True)
    (manual / "something_else.zip").write_bytes(b"x")
    with pytest.raises(UsageError, match=r"needs a manual download and preparing it from the files in .* failed "
                                         r"\(AssertionError: tiny.tar not found"):
        tfds_data.builder("tiny_manual_images", str(tmp_path))
    (manual / "tiny.tar").write_bytes(b"x")  # what the instructions ask for: it prepares
    assert tfds_data.builder("tiny_manual_images", str(tmp_path)).is_prepared()


# --- TF_CONFIG -----------------------------------------------------------------------

GOOD = {"cluster": {"worker": ["host1:12345", "host2:12345"]}, "task": {"type": "worker", "index": 1}}


@pytest.mark.parametrize(
    "tf_config, problem",
    [
        ("{not json", "is not valid JSON"),
        ("[1, 2]", "must be a JSON object, got list"),
        (json.dumps({"task": GOOD["task"]}), 'has no "cluster" object'),
        (json.dumps({**GOOD, "cluster": {"ps": ["h:1"], "worker": ["h:2"]}}), "cluster has job(s) 'ps'"),
        (json.dumps({**GOOD, "cluster": {"worker": "host1:12345"}}), 'cluster "worker" must be a non-empty list'),
        (json.dumps({**GOOD, "cluster": {"worker": ["host1", "host2:2"]}}), "holds 'host1', not \"host:port\""),
        (json.dumps({**GOOD, "cluster": {"worker": ["host1:99999", "h:1"]}}), "a port in 1-65535"),
        (json.dumps({**GOOD, "cluster": {"chief": ["a:1", "b:2"], "worker": ["c:3"]}}), "there is at most one chief"),
        (json.dumps({"cluster": GOOD["cluster"]}), 'has no "task" object'),
        (json.dumps({**GOOD, "task": {"type": "chief", "index": 0}}), "task \"type\" is 'chief', not one of"),
        (json.dumps({**GOOD, "task": {"type": "worker", "index": 2}}), 'task "index" is 2; cluster "worker" has 2'),
        (json.dumps({**GOOD, "task": {"type": "worker", "index": "1"}}), "task \"index\" is '1'"),
        ("", "needs the TF_CONFIG environment variable"),
    ],
)
def test_invalid_tf_config_is_one_line_pointing_to_the_docs(tmp_path, monkeypatch, capsys, tf_config, problem):
    monkeypatch.setenv("TF_CONFIG", tf_config)
    logdir = tmp_path / "run"
    assert train.main(["--strategy", "multi_worker", "--epochs", "1", "--logdir", str(logdir)]) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert problem in line and "docs/multi_worker.md" in line
    assert not logdir.exists()
    with pytest.raises(UsageError, match="docs/multi_worker.md"):
        distribute.make_strategy("multi_worker")  # the library says the same, before TensorFlow reads it


def test_valid_tf_config_names_the_chief(monkeypatch):
    monkeypatch.setenv("TF_CONFIG", json.dumps(GOOD))
    assert rundir.parse_tf_config()["task"]["index"] == 1 and not rundir.tf_config_is_chief()
    monkeypatch.setenv("TF_CONFIG", json.dumps({**GOOD, "task": {"type": "worker", "index": 0}}))
    assert rundir.tf_config_is_chief()
    chief = {"cluster": {"chief": ["[::1]:2222"], "worker": ["10.0.0.2:2222"]}, "task": {"type": "chief", "index": 0}}
    monkeypatch.setenv("TF_CONFIG", json.dumps(chief))
    assert rundir.tf_config_is_chief()


def test_an_input_that_ends_early_exits_75_and_resume_trains_what_was_lost(tmp_path, monkeypatch, capsys):
    # What the tf.data service does when it loses more images than its reserve epoch
    # holds: the stream ends before the run's last step. Keras stops quietly there, and
    # train.py once exited 0 with fewer epochs than asked.
    from simsiam_tf import input as input_lib

    real_open = input_lib.open_input

    def ends_early(config, announce=None):
        opened, kind = real_open(config, announce)
        whole = opened.batches
        opened.batches = lambda *args, **kwargs: whole(*args, **kwargs).take(3)  # of 2 x 2 steps
        return opened, kind

    monkeypatch.setattr(input_lib, "open_input", ends_early)
    _patch_run(monkeypatch)
    logdir = str(tmp_path / "run")
    assert train.main([*TINY, "--epochs", "2", "--logdir", logdir]) == 75
    line = _one_error_line(capsys.readouterr().err)
    assert "the input ran out of data after step 1 of the 2 of epoch 2 (of 2)" in line
    assert line.endswith(f"Continue with: python train.py --resume {logdir}")
    # The cut epoch was not saved as done: the backup holds epoch 1, so --resume trains
    # epoch 2 whole.
    assert rundir.completed_epochs(os.path.join(logdir, rundir.LAST_DIR)) == 1
    monkeypatch.setattr(input_lib, "open_input", real_open)
    assert train.main(_advised(line)) == 0
    summary = json.loads(open(os.path.join(logdir, "summary.json")).read())
    assert [h["epoch"] for h in summary["history"]] == [1, 2] and summary["epochs_completed"] == 2
