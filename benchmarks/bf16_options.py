"""TensorFlow's bfloat16 options, each timed in the same run as PyTorch's bfloat16 step.

    SIMSIAM_TORCH_PYTHON=VENV/bin/python python benchmarks/bf16_options.py --batch 128 --rounds 2
    python benchmarks/bf16_options.py --options policy,rewrite --rounds 1     # a subset, no PyTorch if absent

Each option is one `benchmarks/train_step.py --precision bfloat16 --xla off --fit-only`
run in a process of its own (environment variables are read when TensorFlow starts),
on the ResNet-18 CIFAR step at `--batch`. Every round times the PyTorch reference's
bfloat16 step first (`torch_simsiam.py --step-bench --bf16`, see train_step.py), then
each option, so that every option is measured beside PyTorch on the same machine
minutes apart. Prints pairs/s per round, and for each option its best over the rounds
divided by PyTorch's best and by the default's best (noise on a shared machine only
slows, so the best is the steady speed).

The options (docs/performance.md, "bfloat16 against PyTorch: what was tried"):
- policy: the default, Keras's mixed_bfloat16 policy (float32 variables, bfloat16
  compute, each kernel cast to bfloat16 where a layer reads it);
- rewrite: a float32 model rewritten to bfloat16 by grappler's
  auto_mixed_precision_onednn_bfloat16 pass when the step is traced;
- caller-thread: TF_ONEDNN_THREADPOOL_USE_CALLER_THREAD=1, the thread that starts a
  oneDNN primitive works on it too instead of waiting for the pool;
- inter-op-1: TF_NUM_INTEROP_THREADS=1, one op at a time (PyTorch's way), each with
  both cores;
- system-allocator: TF_ONEDNN_USE_SYSTEM_ALLOCATOR=1, oneDNN's buffers from malloc
  instead of TensorFlow's allocator;
- frozen-weights: TF_ONEDNN_ASSUME_FROZEN_WEIGHTS=1, oneDNN's weight caching, which
  assumes weights never change: an inference option, timed to show whether it
  touches training at all.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import REPO, Parser, batch_size, positive_int, report  # noqa: E402

OPTIONS = {
    "policy": ({}, []),
    "rewrite": ({}, ["--rewrite"]),
    "caller-thread": ({"TF_ONEDNN_THREADPOOL_USE_CALLER_THREAD": "1"}, []),
    "inter-op-1": ({"TF_NUM_INTEROP_THREADS": "1"}, []),
    "system-allocator": ({"TF_ONEDNN_USE_SYSTEM_ALLOCATOR": "1"}, []),
    "frozen-weights": ({"TF_ONEDNN_ASSUME_FROZEN_WEIGHTS": "1"}, []),
}
TRAIN_STEP = os.path.join(os.path.dirname(os.path.abspath(__file__)), "train_step.py")


def ours(option: str, batch: int, steps: int) -> float:
    """Pairs/s of our bfloat16 fit step with `option`, in a fresh process."""
    env, flags = OPTIONS[option]
    cmd = [sys.executable, TRAIN_STEP, "--precision", "bfloat16", "--xla", "off", "--fit-only",
           "--batch", str(batch), "--steps", str(steps), *flags]
    done = subprocess.run(cmd, cwd=REPO, env={**os.environ, **env}, capture_output=True, text=True)
    lines = [line for line in done.stdout.splitlines() if line.startswith('{"benchmark"')]
    if done.returncode or not lines:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise SystemExit(f"bf16_options: error: option {option} failed ({last}): {' '.join(cmd)}")
    return float(json.loads(lines[-1])["rows"][0]["step_pairs_per_s"])


def main(argv=None) -> int:
    p = Parser(description=__doc__)
    p.add_argument("--batch", type=batch_size, default=128, help="global batch (default 128, as the PyTorch table)")
    p.add_argument("--steps", type=positive_int, default=4, help="timed steps per run, after 2 warm-up steps")
    p.add_argument("--rounds", type=positive_int, default=2, help="rounds, each PyTorch then every option")
    p.add_argument("--options", default=",".join(OPTIONS),
                   help=f"comma-separated, from {','.join(OPTIONS)} (default all; policy is always run first)")
    args = p.parse_args(argv)
    chosen = [o.strip() for o in args.options.split(",") if o.strip()]
    unknown = sorted(set(chosen) - set(OPTIONS))
    if unknown:
        p.error(f"unknown option {', '.join(unknown)}; choose from {','.join(OPTIONS)}")
    chosen = ["policy"] + [o for o in chosen if o != "policy"]

    from train_step import torch_python, torch_step

    python, note = torch_python()
    if note:
        print(note, flush=True)
    threads = os.cpu_count() or 1
    speeds = {o: [] for o in chosen}
    peer = []
    for rnd in range(1, args.rounds + 1):
        if python:
            peer.append(torch_step(python, "bfloat16", args.batch, args.steps, 64, threads))
            print(f"  round {rnd} PyTorch bfloat16 {peer[-1]:6.1f} pairs/s", flush=True)
        for option in chosen:
            speeds[option].append(ours(option, args.batch, args.steps))
            print(f"  round {rnd} ours {option:<17} {speeds[option][-1]:6.1f} pairs/s", flush=True)
    best_peer = max(peer) if peer else None
    rows = []
    for option in chosen:
        env, flags = OPTIONS[option]
        best = max(speeds[option])
        rows.append({"option": option, "how": " ".join([f"{k}={v}" for k, v in env.items()] + flags) or "(default)",
                     "pairs_per_s": " / ".join(f"{s:.1f}" for s in speeds[option]), "best": best,
                     "over_pytorch": best / best_peer if best_peer else None,
                     "over_policy": best / max(speeds["policy"])})
    report("bf16_options", rows,
           [("option", "option"), ("how", "how"), ("pairs_per_s", "pairs/s by round"), ("best", "best"),
            ("over_pytorch", "best / PyTorch's best"), ("over_policy", "best / policy's best")],
           {"batch": args.batch, "steps": args.steps, "threads": threads,
            "pytorch_pairs_per_s": peer, "pytorch_skipped": note or None})
    return 0


if __name__ == "__main__":
    sys.exit(main())
