"""benchmarks/compare_runs.py: exact p-values on hand-made groups of runs."""

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "benchmarks"))
import compare_runs  # noqa: E402


def test_permutation_p_of_two_groups_of_four_that_do_not_overlap():
    # Of the C(8, 4) = 70 splits only the observed one and its mirror reach the gap.
    a, b = np.array([1.0, 2.0, 3.0, 4.0]), np.array([5.0, 6.0, 7.0, 8.0])
    assert compare_runs.permutation_p(a, b) == pytest.approx(2 / 70)
    assert compare_runs.permutation_p_min(4, 4) == pytest.approx(2 / 70)  # 0.029
    assert compare_runs.permutation_p_min(2, 2) == pytest.approx(1 / 3)
    # Unequal groups: no split mirrors another, so one split of C(5, 2) = 10.
    assert compare_runs.permutation_p_min(2, 3) == pytest.approx(1 / 10)
    assert compare_runs.permutation_p(np.array([0.0, 1.0]), np.array([5.0, 6.0, 7.0])) == pytest.approx(1 / 10)


def test_sign_flip_p_exact_values():
    # Four differences of one sign: only all-plus and all-minus reach |mean| = 2.5.
    assert compare_runs.sign_flip_p(np.array([1.0, 2.0, 3.0, 4.0])) == pytest.approx(2 / 16)  # 0.125
    assert compare_runs.sign_flip_p_min(4) == pytest.approx(0.125)
    assert compare_runs.sign_flip_p_min(2) == pytest.approx(0.5)
    # d = (1, 1, -1, 3), mean 1; |Σ s_i d_i| >= 4 needs s_4 d_4 = 3 with the other three
    # summing to >= 1 in the same direction, or the mirror: of (s1, s2, s3) the sums
    # s1 + s2 - s3 >= 1 for 4 of 8 patterns; times 2 for the mirror: 8 of 16.
    assert compare_runs.sign_flip_p(np.array([1.0, 1.0, -1.0, 3.0])) == pytest.approx(8 / 16)
    assert compare_runs.sign_flip_p(np.zeros(3)) == 1.0  # every pattern ties


def test_holm_adjusts_over_the_family():
    # Sorted 0.01, 0.02, 0.03, 0.5 -> 4 * 0.01, 3 * 0.02, max(0.06, 2 * 0.03), 0.5.
    adjusted = compare_runs.holm([0.03, 0.01, 0.5, None, 0.02])
    assert adjusted[3] is None
    np.testing.assert_allclose([adjusted[i] for i in (1, 4, 0, 2)], [0.04, 0.06, 0.06, 0.5])
    # Monotone and capped at 1.
    assert compare_runs.holm([0.4, 0.3]) == [0.6, 0.6]
    assert compare_runs.holm([0.9, 0.8, 0.7]) == [1.0, 1.0, 1.0]


def _run(directory, seed, knn, volume=None, rank=None):
    directory.mkdir()
    (directory / "config.json").write_text(json.dumps({"precision": "float32", "seed": seed}))
    (directory / "evaluation.json").write_text(json.dumps({"knn": {"top1": knn}, "linear_probe": {"top1": 0.9}}))
    if volume is not None:
        record = {"epoch": 30, "within_log_volume": volume, "between_rank_split": rank}
        (directory / "diagnostics.jsonl").write_text(json.dumps({"epoch": 5, "within_log_volume": 0.0}) + "\n"
                                                     + json.dumps(record) + "\n")
    return str(directory)


def test_diagnostic_rows_carry_the_p_of_two_non_overlapping_groups_of_four(tmp_path):
    # Issue 29 item 7: the diagnostic rows' p, checked. Group b's log-volumes all lie
    # above group a's: permutation p = 2/70; paired by seed, every difference is
    # positive: sign-flip p = 2/16. kNN overlaps (p = 1: equal means).
    a = [_run(tmp_path / f"a{s}", s, 0.5 + 0.01 * s, volume=-6.0 - s, rank=20.0 + s) for s in range(4)]
    b = [_run(tmp_path / f"b{s}", s, 0.53 - 0.01 * s, volume=-2.0 - s, rank=20.0 + s) for s in range(4)]
    a_runs = [compare_runs.read_run(r) for r in a]
    b_runs = [compare_runs.read_run(r) for r in b]
    rows = {r["metric"]: r for r in compare_runs.compare(a_runs, b_runs)}
    assert set(rows) == {"kNN top-1", "linear probe top-1", "within-image log-volume", "rank of the image means, split-half"}
    volume = rows["within-image log-volume"]
    assert volume["b_minus_a"] == 4.0
    assert volume["p"] == pytest.approx(2 / 70) and volume["p_min"] == pytest.approx(2 / 70)
    assert volume["p_paired"] == pytest.approx(2 / 16) and volume["p_paired_min"] == pytest.approx(2 / 16)
    # Holm over the 4 rows: p of 2/70 (volume) and 1 (the rest): 4 * 2/70 for the smallest.
    assert volume["p_holm"] == pytest.approx(8 / 70) and volume["p_paired_holm"] == pytest.approx(0.5)
    assert rows["rank of the image means, split-half"]["p"] == 1.0  # equal groups
    assert rows["kNN top-1"]["p"] == pytest.approx(1.0) and rows["kNN top-1"]["p_holm"] == 1.0


def test_runs_that_do_not_pair_by_seed_get_no_paired_p(tmp_path):
    a = [_run(tmp_path / f"a{s}", 0, 0.5 + 0.01 * s) for s in range(3)]  # all seed 0
    b = [_run(tmp_path / f"b{s}", s, 0.8 + 0.01 * s) for s in range(3)]
    a_runs = [compare_runs.read_run(r) for r in a]
    b_runs = [compare_runs.read_run(r) for r in b]
    assert compare_runs.pairs_by_seed(a_runs, b_runs) is None
    assert compare_runs.pairs_by_seed(b_runs, list(reversed(b_runs))) == [(0, 2), (1, 1), (2, 0)]
    knn = compare_runs.compare(a_runs, b_runs)[0]
    assert knn["p"] == pytest.approx(0.1) and knn["p_paired"] is None and knn["p_paired_holm"] is None


def test_the_command_prints_the_new_columns_and_json(tmp_path):
    a = [_run(tmp_path / f"a{s}", s, 0.5 + 0.01 * s) for s in range(3)]
    b = [_run(tmp_path / f"b{s}", s, 0.8 + 0.01 * s) for s in range(3)]
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    result = subprocess.run([sys.executable, os.path.join(REPO, "benchmarks", "compare_runs.py"), "--a", *a, "--b", *b],
                            capture_output=True, text=True, check=True, env=env, timeout=300)
    lines = result.stdout.splitlines()
    out = json.loads(lines[-1])
    assert out["pairing"] == "seed" and out["holm_family"] == 2
    header = next(line for line in lines if line.startswith("metric"))
    for column in ("p min", "p Holm", "paired p", "paired p min", "paired p Holm"):
        assert column in header
    knn = out["rows"][0]
    assert math.isclose(knn["p"], 0.1) and math.isclose(knn["p_paired"], 0.25)  # 3 positive differences: 2/8
    assert math.isclose(knn["p_holm"], 0.2)  # 2 rows; linear probe p = 1
