"""Our training step against PyTorch's official one, step by step (benchmarks/torch_parity.py).

At a small size (ResNet-18 of width 8, 256-d heads, batch 16, 32 px), five steps of our
`train_step` and of facebookresearch/simsiam's loop on torchvision's ResNet-18, from the
same weights on the same batches, must agree to float32 round-off: z, p, loss, learning
rate, weights after every step and BatchNorm running statistics against PyTorch's
float32 run; and, at each step, everything including every gradient and momentum buffer
against the exact (float64) official step from our state with our ReLU decisions. The
bounds are this file's own, not the script's.

PyTorch is not a project dependency: the test runs when this Python can import torch, or
when SIMSIAM_TORCH_PYTHON names a Python that can (see the script's docstring), and is
skipped otherwise.
"""

import importlib.util
import json
import os
import subprocess
import sys

import pytest

from conftest import REPO

SCRIPT = os.path.join(REPO, "benchmarks", "torch_parity.py")
SMALL = ["--width", "8", "--dim", "256", "--pred-dim", "64", "--batch", "16", "--size", "32", "--steps", "5",
         "--torch-threads", "1"]
# Max relative difference (per tensor, against the tensor's largest entry; see the
# script), per quantity and reference. Measured at this size: at most 8e-6 for
# gradients and momentum at our state, 3e-6 for z and p, 4e-7 for weights and running
# statistics.
BOUND = {"lr": 1e-6, "loss": 1e-4, "z": 1e-4, "p": 1e-4, "grad": 1e-3, "momentum": 1e-3, "weight": 1e-4, "stat": 1e-4}
JUDGED = {"run": ("lr", "loss", "z", "p", "weight", "stat"), "exact": tuple(BOUND)}
PARAM_GROUPS = ("backbone conv", "backbone BN", "projector", "predictor")
STAT_GROUPS = ("running mean", "running var")


def _torch_env():
    if importlib.util.find_spec("torch") is not None:
        return dict(os.environ)
    python = os.environ.get("SIMSIAM_TORCH_PYTHON", "")
    if python and os.path.isfile(python):
        return dict(os.environ)
    pytest.skip(
        "no PyTorch: this Python cannot import torch and SIMSIAM_TORCH_PYTHON does not name an existing "
        "interpreter (python -m venv VENV && VENV/bin/pip install torch==2.14.1 torchvision==0.29.1, "
        "then SIMSIAM_TORCH_PYTHON=VENV/bin/python)"
    )


def test_five_small_steps_match_pytorch():
    env = _torch_env()
    env["TF_CPP_MIN_LOG_LEVEL"] = "3"
    done = subprocess.run([sys.executable, SCRIPT, *SMALL], capture_output=True, text=True, env=env, timeout=600)
    lines = done.stdout.strip().splitlines()
    assert done.returncode == 0, "\n".join(lines[-1:]) + done.stderr[-2000:]
    assert lines[-1].startswith("PASS: ")
    out = json.loads(next(line for line in lines if line.startswith('{"benchmark": "torch_parity"')))

    # It compared the whole model: every trainable variable of ours met a PyTorch
    # parameter, every BatchNorm statistic a buffer, every ReLU layer a ReLU call.
    ours, torch = out["ours"], out["torch"]
    assert ours["trainable_variables"] == torch["parameters_matched"] == torch["torch_parameters"] == 69
    assert ours["parameters"] == torch["torch_parameter_count"]
    assert ours["weights"] == torch["torch_state_tensors"] == 69 + 2 * 23  # + running mean and var of 23 BNs
    assert torch["bn_layers"] == 23 and torch["bn_mismatch"] == []
    assert ours["relu_calls"] == torch["relu_calls_matched"] == 1 + 2 * 8 + 1 + 1  # stem, 2 per block, heads

    steps = out["steps"]
    assert [s["step"] for s in steps] == [1, 2, 3, 4, 5]
    # The cosine schedule moved within the run (2 steps per epoch over 4 epochs).
    assert len({round(s["lr"]["torch"], 12) for s in steps}) == 3
    expected = {("lr", ""), ("loss", ""), ("z", ""), ("p", "")}
    expected |= {(q, g) for q in ("grad", "momentum", "weight") for g in PARAM_GROUPS}
    expected |= {("stat", g) for g in STAT_GROUPS}
    for s in steps:
        rows = {(r["what"], r["group"]): r for r in s["rows"]}
        assert expected <= set(rows), s["step"]
        for ref, quantities in JUDGED.items():
            for (what, group), r in rows.items():
                if what in quantities:
                    assert r[f"{ref}_rel"] <= BOUND[what], (s["step"], ref, what, group, r)
        assert sum(rows[("grad", g)]["tensors"] for g in PARAM_GROUPS) == 69
        # The exact step took every ReLU decision of ours (each ReLU input of both views).
        assert s["relu"]["inputs"] == 2 * ours["relu_inputs_per_view"]
        # Weights really moved in every step, on both sides. In step 1 the betas of
        # the residual branches stay 0 (zero-initialised gamma after them blocks their
        # gradient, and weight decay of 0 is 0), so from step 2 every tensor must move.
        moved = s["min_tensor_change"]
        for side in ("ours", "torch"):
            for group in PARAM_GROUPS + STAT_GROUPS:
                if s["step"] > 1 or group != "backbone BN":
                    assert moved[f"{side} {group}"] > 0, (s["step"], side, group)
