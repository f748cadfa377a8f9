"""`--xla`: the train step compiled with XLA computes what it computes without, and runs
from train.py (where `auto` means on for GPUs and TPUs, off on CPUs)."""

import json
import os
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf
from test_train_cli import REPO, TINY_FLAGS, _train

from simsiam_tf import augment as aug
from simsiam_tf import distribute, rundir
from simsiam_tf import input as input_lib
from simsiam_tf.config import UsageError, make_config, save_config
from simsiam_tf.model import build_simsiam
from simsiam_tf.optim import make_optimizer

SMALL = dict(width=8, proj_dim=64, pred_dim=16, batch_size=64)


@pytest.fixture(scope="module")
def digits_batches():
    digits, _ = input_lib.open_input(make_config("digits", val_fraction=0.0, input="memory"))
    spec = aug.AugmentSpec.for_image_size(32)
    return list(digits.worker_batches(64, 0, 1, spec, seed=0, epochs=1).take(2))


def _one_step(weights, batch, jit, augment_on="host"):
    """The loss of one fit() step from `weights` on `batch`, and the weights after it."""
    config = make_config("digits", augment_on=augment_on, **SMALL)
    model = build_simsiam(config)
    model.set_weights(weights)
    model.compile(optimizer=make_optimizer(model, config, steps_per_epoch=10), jit_compile=jit)
    history = model.fit(tf.data.Dataset.from_tensors(batch), epochs=1, verbose=0, shuffle=False).history
    return history["loss"][0], model.get_weights()


def _apart(a, b, start):
    """How far apart two weight lists are, over all variables, as a fraction of how far
    `b`'s step moved them from `start`."""
    norm = lambda ws: np.sqrt(sum(float(np.sum(np.square(w))) for w in ws))
    return norm([x - y for x, y in zip(a, b)]) / norm([y - s for y, s in zip(b, start)])


def test_one_step_with_and_without_xla_is_the_same(digits_batches):
    keras.utils.set_random_seed(0)
    start = build_simsiam(make_config("digits", **SMALL)).get_weights()
    batch, other = digits_batches
    loss_off, after_off = _one_step(start, batch, jit=False)
    loss_on, after_on = _one_step(start, batch, jit=True)
    loss_other, after_other = _one_step(start, other, jit=False)
    # Measured on a 2-core AMD EPYC (AVX512-BF16), float32: |loss on - loss off| 1.3e-7,
    # and the weights after the step 1.8e-5 of the step's size apart (the largest
    # single difference 7e-5, in a BatchNorm moving variance of a few hundred): the
    # round-off of differently fused kernels. Another batch moves the loss by 0.0016
    # and the weights by 0.040 of the step.
    assert abs(loss_on - loss_off) < 1e-5, (loss_on, loss_off)
    assert _apart(after_on, after_off, start) < 1e-3
    # The bounds can fail: another batch's step is far outside them.
    assert abs(loss_other - loss_off) > 1e-4 and _apart(after_other, after_off, start) > 1e-2


def test_device_augmentation_compiles_under_xla():
    # --augment-on device runs keras-cv's layer and this project's colour steps inside
    # the step; under XLA they compile. XLA's stateless random numbers are not
    # TensorFlow's kernels' for the same seed (measured, even with alg="philox"), so the
    # views differ from those drawn without XLA; drawn under XLA, the parameters keep
    # the recipe's probabilities.
    spec = aug.AugmentSpec.for_image_size(32)
    params = tf.function(lambda seed: aug.draw_params(seed, 20000, spec), jit_compile=True)(tf.constant([0, 7], tf.int64))
    for key, p in (("flip", spec.flip_prob), ("jitter", spec.jitter_prob), ("grayscale", spec.grayscale_prob)):
        assert np.mean(params[key].numpy()) == pytest.approx(p, abs=0.015), key
    keras.utils.set_random_seed(0)
    config = make_config("digits", augment_on="device", **SMALL)
    start = build_simsiam(config).get_weights()
    views = tf.cast(tf.random.uniform([64, 2, 32, 32, 3], 0, 256, tf.int32, seed=1), tf.uint8)
    loss, after = _one_step(start, views, jit=True, augment_on="device")
    assert np.isfinite(loss) and max(np.abs(a - b).max() for a, b in zip(after, start)) > 0


def test_auto_xla_is_on_for_accelerators_only(monkeypatch):
    strategy = tf.distribute.get_strategy()
    assert distribute.resolve_xla("on", strategy) == ("on", "--xla on")
    assert distribute.resolve_xla("off", strategy) == ("off", "--xla off")
    real = tf.config.list_physical_devices
    monkeypatch.setattr(tf.config, "list_physical_devices", lambda kind=None: [] if kind == "GPU" else real(kind))
    assert distribute.resolve_xla("auto", strategy)[0] == "off"
    gpu = tf.config.PhysicalDevice(name="/physical_device:GPU:0", device_type="GPU")
    monkeypatch.setattr(tf.config, "list_physical_devices", lambda kind=None: [gpu] if kind == "GPU" else real(kind))
    assert distribute.resolve_xla("auto", strategy) == ("on", "auto: GPU")


def test_xla_may_change_on_resume_and_is_recorded(tmp_path):
    logdir = tmp_path / "run"
    logdir.mkdir()
    save_config(make_config("digits", xla="on"), str(logdir / "config.json"))
    said = []
    config = rundir.resolve_resume(str(logdir), {"xla": "off"}, announce=lambda line, **k: said.append(line))
    assert config.xla == "off" and config.resume_changes == ({"from_epoch": 1, "xla": {"from": "on", "to": "off"}},)
    assert "--xla on -> off" in said[0] and "cosine" not in said[0]
    assert rundir.resolve_resume(str(logdir), {"xla": "on"}) == make_config("digits", xla="on")
    with pytest.raises(UsageError, match="only --lr, --batch-size, --micro-batch, --xla and --data-service-wire may change"):
        rundir.resolve_resume(str(logdir), {"width": 4})


# train.py, preempted after its first epoch's checkpoint (os._exit, as a lost node
# would stop), then continued with --resume by train.py itself.
PREEMPTED = """
import functools, os, sys
import keras
sys.path.insert(0, {repo!r})
import train
from simsiam_tf import training

class Preempt(keras.callbacks.Callback):
    def on_epoch_end(self, epoch, logs=None):  # after SaveBackup: epoch 1 is kept
        os._exit(99)

training.run = functools.partial(training.run, extra_callbacks=[Preempt()])
sys.exit(train.main(sys.argv[1:]))
"""


def test_train_py_with_xla_on_runs_and_resumes(tmp_path):
    logdir = tmp_path / "run"
    args = [*TINY_FLAGS, "--xla", "on", "--epochs", "2", "--knn-every", "1", "--logdir", str(logdir)]
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    env.pop("TF_ENABLE_ONEDNN_OPTS", None)
    first = subprocess.run([sys.executable, "-c", PREEMPTED.format(repo=REPO), *args], cwd=tmp_path,
                           capture_output=True, text=True, timeout=300, env=env)
    assert first.returncode == 99, first.stderr[-2000:]
    assert "xla: on for the train step (--xla on)" in first.stdout
    assert json.loads((logdir / "config.json").read_text())["xla"] == "on"
    assert json.loads((logdir / "summary.json").read_text())["epochs_completed"] == 1

    resumed = _train(["--resume", str(logdir)], cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "epochs 2-2" in resumed.stdout and "xla: on for the train step" in resumed.stdout
    summary = json.loads((logdir / "summary.json").read_text())
    assert summary["epochs_completed"] == 2 and summary["xla"] == "on" and summary["precision"] == "float32"
    assert [h["epoch"] for h in summary["history"]] == [1, 2]
    assert all(np.isfinite(h["loss"]) for h in summary["history"])
    assert json.loads((logdir / "config.json").read_text())["xla"] == "on"
