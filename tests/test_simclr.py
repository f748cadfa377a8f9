"""SimCLR, the contrastive baseline, in SimSiam's harness: it learns, and its options are checked.

The loss itself is tested in tests/test_simclr_loss.py; one step on two replicas
against one device in tests/test_distribute.py.

Measured before choosing the bounds (`python train.py --method simclr --epochs 20
--precision float32`, digits, seed 0, on 2 AVX2 cores): test kNN 0.5467 at random
init, 0.7533 at epoch 10, 0.8400 at epoch 20 (2.1 min); NT-Xent 4.47 at epoch 19,
against log(2N - 1) = 5.54 for a batch of N = 128 images that it cannot tell apart.
"""

import math

import pytest

from simsiam_tf import training
from simsiam_tf.config import UsageError, make_config

EPOCHS = 10


@pytest.fixture(scope="module")
def learned(tmp_path_factory):
    config = make_config("digits", method="simclr", epochs=EPOCHS, knn_every=EPOCHS, diag_every=0, projector_images=0)
    return training.run(config, str(tmp_path_factory.mktemp("simclr")), verbose=0)


def test_simclr_beats_its_own_random_init(learned):
    assert learned["knn_top1"] > learned["knn_top1_init"] + 0.10
    chance = math.log(2 * 128 - 1)  # every view equally similar to the 2N - 1 others
    assert learned["loss"] < chance - 0.5


def test_simsiam_only_options_are_refused_for_simclr():
    with pytest.raises(UsageError, match="SimSiam's"):
        make_config("digits", method="simclr", stop_gradient=False)
    with pytest.raises(UsageError, match="SimSiam's"):
        make_config("digits", method="simclr", fix_pred_lr=True)
    with pytest.raises(UsageError, match="--method 'byol'"):
        make_config("digits", method="byol")
    with pytest.raises(UsageError, match="--temperature"):
        make_config("digits", method="simclr", temperature=0.0)
