"""benchmarks/probe_ranks.py: with the run's own 8 views it reads what the run recorded."""

import json
import os
import subprocess
import sys

import pytest

from simsiam_tf import training
from simsiam_tf.config import make_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "benchmarks"))
import probe_ranks  # noqa: E402


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    logdir = str(tmp_path_factory.mktemp("ranks") / "run")
    config = make_config(
        "digits", width=8, proj_dim=64, pred_dim=16, batch_size=32, epochs=1, train_limit=128,
        knn_every=0, diag_every=1, diag_images=48, projector_images=0, precision="float32",
    )
    training.run(config, logdir, verbose=0)
    return logdir


def test_the_runs_own_views_give_its_recorded_ranks(run_dir):
    with open(os.path.join(run_dir, "diagnostics.jsonl")) as f:
        recorded = [json.loads(line) for line in f][-1]
    measured = probe_ranks.probe_ranks(run_dir, 8, "last")
    for key in ("effective_rank", "between_rank", "between_rank_split"):
        assert measured[key] == pytest.approx(recorded[key], rel=1e-4), key
    assert measured["within_trace"] == pytest.approx(recorded["within_trace"], rel=1e-4)
    # More views see the same images through other augmentations: other numbers.
    more = probe_ranks.probe_ranks(run_dir, 16, "last")
    assert more["views"] == 16 and more["effective_rank"] != measured["effective_rank"]


def test_too_few_views_is_one_line_and_exit_2(run_dir):
    result = subprocess.run(
        [sys.executable, os.path.join(REPO, "benchmarks", "probe_ranks.py"), "--run", run_dir, "--views", "1"],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 2 and "--views must be at least 2" in result.stderr
    assert "Traceback" not in result.stderr
