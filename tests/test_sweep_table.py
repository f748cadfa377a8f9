"""benchmarks/sweep_table.py: chooses on validation, never on test, from hand-made runs."""

import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "benchmarks"))
import sweep_table  # noqa: E402


def _run(root, name, lr, seed, val, test):
    """A run directory whose history has validation kNN `val` (one per evaluation)."""
    path = root / name
    path.mkdir()
    (path / "config.json").write_text(json.dumps({"base_lr": lr, "seed": seed}))
    history = [{"epoch": 1, "loss": -0.1}]  # an epoch without evaluation is skipped
    history += [{"epoch": 5 * (i + 1), "knn_val_top1": v, "knn_top1": test} for i, v in enumerate(val)]
    (path / "summary.json").write_text(json.dumps({"history": history}))
    return str(path)


def test_the_best_mean_of_the_last_evaluations_on_validation_is_chosen(tmp_path):
    runs = [
        # lr 0.4: the best test kNN by far, but the worse validation score: not chosen.
        _run(tmp_path, "a0", 0.4, 0, [0.9, 0.70, 0.70, 0.70], test=0.99),
        _run(tmp_path, "a1", 0.4, 1, [0.9, 0.72, 0.72, 0.72], test=0.99),
        # lr 0.8: its first evaluation (0.1) falls outside the last three.
        _run(tmp_path, "b0", 0.8, 0, [0.1, 0.80, 0.81, 0.79], test=0.5),
        _run(tmp_path, "b1", 0.8, 1, [0.1, 0.76, 0.78, 0.77], test=0.5),
    ]
    rows = sweep_table.table([sweep_table.read_run(r, "base_lr", 3) for r in runs])
    by_value = {r["value"]: r for r in rows}
    assert by_value[0.8]["chosen"] == "chosen" and by_value[0.4]["chosen"] == ""
    assert by_value[0.8]["val_mean"] == pytest.approx((0.80 + 0.77) / 2)
    assert by_value[0.4]["val_mean"] == pytest.approx(0.71)
    assert by_value[0.4]["val_std"] == pytest.approx(0.0141421, rel=1e-4)
    assert by_value[0.4]["behind_best"] == pytest.approx(0.785 - 0.71)
    assert by_value[0.8]["seeds"] == [0, 1] and by_value[0.4]["test_mean"] == pytest.approx(0.99)


def test_too_few_evaluations_or_a_missing_key_is_one_line(tmp_path):
    run = _run(tmp_path, "r", 0.8, 0, [0.5, 0.6], test=0.5)
    script = os.path.join(REPO, "benchmarks", "sweep_table.py")
    started = tmp_path / "started"  # a run still in its first epoch: config.json only
    started.mkdir()
    (started / "config.json").write_text(json.dumps({"base_lr": 0.8, "seed": 0}))
    for runs, args, message in (([run], [], "fewer than --last 3"), ([run], ["--by", "width"], "has no key 'width'"),
                                ([str(started), run], [], "has no summary.json")):
        result = subprocess.run([sys.executable, script, "--run", *runs, *args], capture_output=True, text=True, timeout=60)
        assert result.returncode != 0 and message in result.stderr, result.stderr
        assert "Traceback" not in result.stderr
