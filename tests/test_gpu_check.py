"""benchmarks/gpu_check.py, the check for the day a GPU is at hand, runs on this CPU.

Its --quick run measures every kind of row it has, at tiny sizes (the numbers are not
judged). A file of its own (from tests/test_benchmarks.py): the quick run is the
suite's longest benchmark, and pytest-xdist hands whole files to its two workers.
"""

import importlib.util
import json
import math
import os

from test_benchmarks import _positive, _run, _run_each


def test_gpu_check_quick_measures_every_kind_of_row(python):
    # Every kind of row the GPU run has is measured at least once (--quick skips some
    # combinations); a budget no loaded machine reaches, so that none is skipped for time.
    out = _run(python, "gpu_check.py", "--quick", "--budget", "3600")
    device, low = out["device"], out["low_precision"]
    assert device["kind"] in ("CPU", "GPU") and device["name"] and device["memory_total_mb"] > 0
    assert low in ("bfloat16", "float16") and (device["kind"] == "GPU" or low == "bfloat16")
    assert out["quick"].startswith("--quick:") and out["elapsed_s"] > 0 and out["within_budget"]
    rows = out["rows"]
    assert not [r for r in rows if r["result"].startswith("error")], rows
    measured = [r for r in rows if r["result"] == "measured"]
    steps = [r for r in measured if r["row"] == "step"]
    assert {r["model"] for r in steps} == {"resnet18", "resnet50"}
    assert {r["precision"] for r in steps} == {"float32", low} and {r["xla"] for r in steps} == {False, True}
    assert len([r for r in rows if r["row"] == "step"]) == 8  # the skipped ones are listed too
    for kind in ("end to end", "input only"):
        assert sorted(r["augment_on"] for r in measured if r["row"] == kind) == ["device", "host"], kind
    for r in measured:
        if r["row"] != "pytorch step":
            assert _positive(r["pairs_per_s"]) and _positive(r["peak_mb"]) and r["peak_of"], r
        if r["row"] == "end to end":
            assert math.isclose(r["over_step"], out["end_to_end_over_step"][r["augment_on"]], abs_tol=1e-3)
        if r["row"] == "input only":
            assert 0 < r["host_cores_used"] <= out["cores_available"] + 0.5, r
            assert math.isclose(r["pairs_per_s_per_core"] * r["host_cores_used"], r["pairs_per_s"], rel_tol=1e-6)
    assert set(out["host_cores_to_feed_step"]) == {"host", "device"}
    assert all(_positive(c) for c in out["host_cores_to_feed_step"].values())
    torch_rows = [r for r in rows if r["row"] == "pytorch step"]
    if importlib.util.find_spec("torch") is None and not os.environ.get("SIMSIAM_TORCH_PYTHON"):
        (row,) = torch_rows
        assert row["result"].startswith("skipped PyTorch") and "torch" in row["note"], row
    else:
        assert {r["precision"] for r in torch_rows} == {"float32", "bfloat16"}
        assert all(_positive(r["pairs_per_s"]) for r in torch_rows if r["result"] == "measured")


def test_gpu_check_skips_rows_past_the_budget_and_without_a_gpu_points_to_quick(python):
    # Both in one process (benchmarks import TensorFlow first: seconds per process).
    import tensorflow as tf

    cases = [("gpu_check.py", ["--quick", "--budget", "0"])]
    no_gpu = not tf.config.list_physical_devices("GPU")  # with a GPU the full check would run
    if no_gpu:
        cases.append(("gpu_check.py", []))
    results = _run_each(python, cases)
    assert results[0]["code"] == 0, results[0]["stderr"][-2000:]
    out = json.loads(results[0]["stdout"].strip().splitlines()[-1])
    ours = [r for r in out["rows"] if r["row"] != "pytorch step"]
    assert len(ours) == 12 and not out["within_budget"]
    assert all(r["result"].startswith(("skipped: time budget spent", "skipped: --quick")) for r in ours), ours
    if no_gpu:
        lines = [line for line in results[1]["stderr"].splitlines() if "error:" in line]
        assert results[1]["code"] == 2 and len(lines) == 1 and "--quick" in lines[0], results[1]["stderr"][-2000:]
