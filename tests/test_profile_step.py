"""profile_step.py's reading of oneDNN's verbose log: per-step totals and per-shape medians."""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
import profile_step  # noqa: E402


def _line(prop, shape, ms, kind="convolution", impl="jit_bf16:avx512_core_bf16"):
    return f"onednn_verbose,v1,primitive,exec,cpu,{kind},{impl},{prop},src:bf16 wei:bf16,,alg:x,{shape},{ms}"


def test_by_shape_takes_the_median_of_the_timed_steps_of_one_propagation():
    warmup = [_line("backward_weights", "A", 100.0)]  # before the mark: left out
    timed = [
        _line("backward_weights", "A", 1.0), _line("backward_weights", "A", 3.0), _line("backward_weights", "A", 2.0),
        _line("backward_weights", "B", 5.0),
        _line("forward_training", "A", 50.0),  # another propagation
        _line("backward_weights", "A", 70.0, kind="matmul"),  # not a convolution
    ]
    log = "\n".join(["onednn_verbose,v1,info,oneDNN v3.7.3"] + warmup + [profile_step.TIMED] + timed)
    assert profile_step.onednn_by_shape(log, 2, 1, "backward_weights") == {"A": 2.0, "B": 5.0}
    totals = {r["primitive"]: r["ms_per_step"] for r in profile_step.onednn_totals(log, 2, 1)}
    assert totals["convolution jit_bf16:avx512_core_bf16 backward_weights"] == 11.0
    assert totals["convolution jit_bf16:avx512_core_bf16 forward_training"] == 50.0


def test_an_unmarked_log_keeps_its_last_timed_share_of_executions():
    # The PyTorch reference's log has no mark: 4 logged steps, 2 timed -> the last half.
    lines = [_line("backward_weights", "A", ms) for ms in (9.0, 9.0, 1.0, 3.0)]
    assert profile_step.onednn_by_shape("\n".join(lines), 4, 2, "backward_weights") == {"A": 2.0}
