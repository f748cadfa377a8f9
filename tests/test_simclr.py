"""SimCLR, the contrastive baseline, in SimSiam's harness: it learns, and its options are checked.

The loss itself is tested in tests/test_simclr_loss.py; one step on two replicas
against one device in tests/test_distribute.py.

Measured before choosing the bounds (`python train.py --method simclr --epochs 30
--lr 1.6 --precision float32`, digits, seed 0, the sweep in docs/contrastive.md): test
kNN 0.5467 at random init, 0.796 at epoch 10, 0.867 at epoch 30; NT-Xent 4.64 at epoch
10, against log(2N - 1) = 5.54 for a batch of N = 128 images that it cannot tell apart.
"""

import math

import pytest

from simsiam_tf import training
from simsiam_tf.config import PRESETS, SIMCLR_PRESETS, UsageError, make_config
from simsiam_tf.diagnostics import probe

EPOCHS = 10


@pytest.fixture(scope="module")
def learned(tmp_path_factory):
    config = make_config("digits", method="simclr", epochs=EPOCHS, knn_every=EPOCHS, diag_every=EPOCHS, projector_images=0)
    run_dir = str(tmp_path_factory.mktemp("simclr"))
    return training.run(config, run_dir, verbose=0), run_dir


def test_simclr_beats_its_own_random_init(learned):
    summary, _ = learned
    assert summary["knn_top1"] > summary["knn_top1_init"] + 0.10
    chance = math.log(2 * 128 - 1)  # every view equally similar to the 2N - 1 others
    assert summary["loss"] < chance - 0.5


def test_simclr_diagnostics_skip_the_predictor_and_measure_the_volume(learned):
    _, run_dir = learned
    (record,) = probe.read_records(run_dir)
    assert record["predictor_cosine"] is None and record["bandwidth"] is None
    assert 0 < record["shard_ratio"] < 0.875  # views carry image information
    assert record["within_trace"] > 0 and record["within_log_volume_gap"] < 0  # shards tighter than mixed groups


def test_simclr_presets_keep_the_recipe_and_take_their_own_lr():
    for name in PRESETS:
        simsiam, simclr = make_config(name).to_dict(), make_config(name, method="simclr").to_dict()
        assert {k for k in simsiam if simsiam[k] != simclr[k]} <= {"method", "base_lr", "fix_pred_lr"}, name
    assert make_config("digits", method="simclr").base_lr == SIMCLR_PRESETS["digits"]["base_lr"]
    assert make_config("digits", method="simclr", base_lr=0.1).base_lr == 0.1  # --lr wins
    assert make_config("imagenet", method="simclr").fix_pred_lr is False  # the preset's fixed predictor lr


def test_simsiam_only_options_are_refused_for_simclr():
    with pytest.raises(UsageError, match="SimSiam's"):
        make_config("digits", method="simclr", stop_gradient=False)
    with pytest.raises(UsageError, match="SimSiam's"):
        make_config("digits", method="simclr", fix_pred_lr=True)
    with pytest.raises(UsageError, match="--method 'byol'"):
        make_config("digits", method="byol")
    with pytest.raises(UsageError, match="--temperature"):
        make_config("digits", method="simclr", temperature=0.0)
