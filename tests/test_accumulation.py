"""Gradient accumulation (--micro-batch): K micro-batches one after another make the
update of the whole batch, the one K replicas with per-replica BatchNorm would make."""

import json
import os
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf

from simsiam_tf import training
from simsiam_tf.config import UsageError, load_config, make_config
from simsiam_tf.model import build_model
from simsiam_tf.optim import make_optimizer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# base_lr 0.8: the rate the round-off bounds below were measured at (the preset has since moved to 1.6).
CONFIG = dict(width=8, proj_dim=64, pred_dim=16, batch_size=16, weight_decay=5e-4, base_lr=0.8, precision="float32")


def _train(strategy, config, init, batches, accumulation, sync_bn=False):
    """Trainable weights, moving statistics and last loss after one step per batch."""
    with strategy.scope():
        model = build_model(config, sync_bn=sync_bn)
        model.set_weights(init)
        model.accumulation_steps = accumulation
        model.compile(optimizer=make_optimizer(model, config, steps_per_epoch=10))
    ds = tf.data.Dataset.from_tensor_slices(np.stack(batches))
    history = model.fit(ds, epochs=1, steps_per_epoch=len(batches), verbose=0, shuffle=False)
    return (
        [v.numpy() for v in model.trainable_weights],
        [v.numpy() for v in model.non_trainable_weights],
        history.history["loss"][-1],
    )


def _largest_difference(a, b):
    return max(float(np.abs(x - y).max()) for x, y in zip(a, b))


def test_accumulating_micro_batches_equals_replicas_with_their_own_batchnorm(mirrored):
    config = make_config("digits", **CONFIG)
    keras.utils.set_random_seed(0)
    init = build_model(config).get_weights()
    rng = np.random.default_rng(0)
    batches = [rng.integers(0, 256, (16, 2, 32, 32, 3), dtype=np.uint8) for _ in range(3)]
    single = tf.distribute.get_strategy()

    accumulated, stats_acc, loss_acc = _train(single, config, init, batches, accumulation=2)
    replicas, stats_rep, loss_rep = _train(mirrored, config, init, batches, accumulation=1)
    whole, _, _ = _train(single, config, init, batches, accumulation=1)
    both, _, _ = _train(mirrored, config, init, batches, accumulation=2)
    four, _, _ = _train(single, config, init, batches, accumulation=4)

    # Three optimizer steps (weights, momentum and the moving statistics the next
    # step's BatchNorm does not read all carried over). Measured 2026-12-05 on the AMD
    # EPYC with AVX512-BF16: 1.2e-7 apart, and 9.7e-8 for 2 replicas x 2 micro-batches
    # against 4 micro-batches on one device: float32 round-off.
    assert _largest_difference(accumulated, replicas) < 2e-6
    assert _largest_difference(both, four) < 2e-6
    assert loss_acc == pytest.approx(loss_rep, abs=1e-6)
    # What the test can tell apart: BatchNorm over the whole batch gives other weights
    # (measured 0.020), so a step that ignored the micro-batches would fail above.
    assert _largest_difference(accumulated, whole) > 1e-3
    # The moving statistics are not part of the equivalence: accumulation updates them
    # once per micro-batch, the replicas once per step with their mean (measured 0.35).
    assert _largest_difference(stats_acc, stats_rep) > 1e-3


def _tiny(**kw):
    # 72 images leave 65 after the validation split: two steps of 32 per epoch.
    base = dict(width=8, proj_dim=64, pred_dim=16, batch_size=32, micro_batch=8, epochs=2, train_limit=72,
                knn_every=1, knn_k=20, diag_every=0, projector_images=0)
    base.update(kw)
    return make_config("digits", **base)


def _weights(logdir):
    model = build_model(load_config(os.path.join(logdir, "config.json")))
    model.load_weights(os.path.join(logdir, "checkpoints", "last", "latest.weights.h5"))
    return [v.numpy() for v in model.weights]


class _Steps(keras.callbacks.Callback):
    def __init__(self):
        super().__init__()
        self.seen = []

    def on_train_batch_begin(self, batch, logs=None):
        opt = self.model.optimizer
        self.seen.append((int(opt.iterations.numpy()), float(opt.learning_rate.numpy())))


def test_the_schedule_counts_optimizer_steps_and_resume_continues_exactly(tmp_path):
    # Accumulation happens inside one step, so every checkpoint is at a step boundary:
    # a resumed run starts the next whole step, and equals the run that never stopped.
    config = _tiny()
    steps = _Steps()
    straight = str(tmp_path / "straight")
    training.run(config, straight, verbose=0, extra_callbacks=[steps])
    # 2 steps per epoch of the global batch 32 (4 micro-batches of 8 each); the
    # per-epoch cosine reads optimizer steps.
    assert [s for s, _ in steps.seen] == [0, 1, 2, 3]
    lr0 = config.lr
    assert [r for _, r in steps.seen] == pytest.approx([lr0, lr0, 0.5 * lr0, 0.5 * lr0], rel=1e-6)
    # The summary and config record the run with its micro-batch (once a test of its own,
    # with a run of its own).
    assert load_config(os.path.join(straight, "config.json")).micro_batch == 8
    assert json.load(open(os.path.join(straight, "summary.json")))["epochs_completed"] == 2

    stopped = str(tmp_path / "resumed")
    training.run(config.replace(epochs=1), stopped, verbose=0)
    training.run(config, stopped, resume=True, verbose=0)
    for a, b in zip(_weights(straight), _weights(stopped)):
        np.testing.assert_array_equal(a, b)


def test_simclr_is_not_accumulated():
    with pytest.raises(UsageError, match="NT-Xent's negatives"):
        make_config("digits", method="simclr", batch_size=32, micro_batch=8)
    out = subprocess.run(
        [sys.executable, "train.py", "--method", "simclr", "--batch-size", "32", "--micro-batch", "8"],
        cwd=REPO, capture_output=True, text=True,
    )
    assert out.returncode == 2
    errors = [line for line in out.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and "--micro-batch with --method simclr" in errors[0]


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--batch-size", "32", "--micro-batch", "12"], "must divide --batch-size 32"),
        (["--micro-batch", "1"], "at least 2 images"),
        (["--micro-batch", "some"], "expected auto, off or a whole number"),
    ],
)
def test_bad_micro_batches_are_one_line_and_exit_2(flags, message):
    out = subprocess.run([sys.executable, "train.py", *flags], cwd=REPO, capture_output=True, text=True)
    assert out.returncode == 2
    errors = [line for line in out.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and message in errors[0], out.stderr
