"""The default recipe learns, and the stop-gradient is what keeps it from collapsing.

Both runs use the digits preset (the offline default) with fewer epochs, so the whole
file takes a few minutes on 2 cores. `python train.py` itself runs 60 epochs; its
numbers are in the README.
"""

import pytest

from simsiam_tf import training
from simsiam_tf.config import make_config

EPOCHS = 15


@pytest.fixture(scope="module")
def learned(tmp_path_factory):
    config = make_config("digits", epochs=EPOCHS, knn_every=EPOCHS)
    return training.run(config, str(tmp_path_factory.mktemp("learn")), verbose=0)


def test_default_recipe_beats_its_own_random_init(learned):
    # Random-init kNN (with BatchNorm statistics from data) is about 0.55 on digits.
    assert learned["knn_top1"] > learned["knn_top1_init"] + 0.05
    assert learned["loss"] < -0.3  # the predictor learned to match the other view


def test_healthy_run_keeps_z_std_near_one_over_sqrt_d(learned):
    assert learned["z_std"] > 0.5 * learned["z_std_reference"]
