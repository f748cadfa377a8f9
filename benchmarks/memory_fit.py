"""How well the memory check predicts a training step's peak memory, and what gradient
accumulation saves.

    python benchmarks/memory_fit.py            # digits, cifar and imagenet presets
    python benchmarks/memory_fit.py --quick    # digits and a narrow cifar only
    python benchmarks/memory_fit.py --cases digits

For each case, in a fresh process: the estimate `simsiam_tf.memory_fit.measure` makes
before training (one step at 4 and 8 images, a line through the two peaks), then the
peak of a real training step of the same model at the case's batch, whole and in
micro-batches (`TwoViewModel.accumulation_steps`), measured the same way (host RSS
high-water mark above the process's resident memory before the estimate), and the
upper bound counted from the model's layers (`memory_fit.upper_bound`), which plan()
trusts without measuring when it is under half the free memory. The ratio actual /
estimate says how far the line can be trusted; plan() adds 15% on top.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import REPO, Parser, report  # noqa: E402

GIB = 2**30
CASES = {
    # name: (preset, overrides, batch, micro-batch)
    "digits": ("digits", {}, 128, 32),
    "cifar-w32": ("cifar", {"width": 32}, 128, 32),
    "cifar": ("cifar", {}, 128, 32),
    "imagenet": ("imagenet", {}, 32, 8),
}
QUICK = ("digits", "cifar-w32")


def child(name: str) -> dict:
    sys.path.insert(0, REPO)
    import keras

    from simsiam_tf import memory_fit
    from simsiam_tf.config import make_config
    from simsiam_tf.model import build_model
    from simsiam_tf.optim import make_optimizer

    preset, overrides, batch, micro = CASES[name]
    config = make_config(preset, batch_size=batch, precision="float32", **overrides)
    baseline = memory_fit._status_kib("VmRSS") * 1024
    started = time.perf_counter()
    estimate = memory_fit.measure(config, batch, 0)
    seconds = time.perf_counter() - started
    row = {
        "case": name, "batch": batch, "probe_s": round(seconds, 1),
        "estimate_gib": round((estimate.fixed + estimate.per_image * batch) / GIB, 3),
        "planned_gib": round(estimate.needed(batch) / GIB, 3),
    }
    row["bound_gib"] = round(memory_fit.upper_bound(memory_fit._probe_model(config), batch) / GIB, 3)
    meter = memory_fit.HostPeak()
    for label, size in (("micro", micro), ("whole", batch)):
        keras.utils.set_random_seed(0)
        model = build_model(config.replace(micro_batch=0 if size == batch else size))
        model.accumulation_steps = batch // size
        model.compile(optimizer=make_optimizer(model, config, 1), jit_compile=False)
        (_, peak), = memory_fit.step_peaks(model, meter, (batch,), config.image_size, baseline)
        row[f"{label}_gib"] = round(peak / GIB, 3)
        if label == "micro":
            row["micro"] = size
            row["micro_estimate_gib"] = round((estimate.fixed + estimate.per_image * size) / GIB, 3)
        del model
        memory_fit.release_free_memory()
    row["actual_over_estimate"] = round(row["whole_gib"] / row["estimate_gib"], 3)
    row["micro_over_estimate"] = round(row["micro_gib"] / row["micro_estimate_gib"], 3)
    return row


def main(argv=None) -> int:
    p = Parser(prog="benchmarks/memory_fit.py", description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="the two smallest cases only")
    p.add_argument("--cases", help="comma-separated cases to run: " + ", ".join(CASES))
    p.add_argument("--child", choices=sorted(CASES), help=argparse_hidden())
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child)))
        return 0
    cases = args.cases.split(",") if args.cases else QUICK if args.quick else list(CASES)
    unknown = [c for c in cases if c not in CASES]
    if unknown:
        p.error(f"unknown case(s) {', '.join(unknown)}; choose from {', '.join(CASES)}")
    rows = []
    for name in cases:
        out = subprocess.run(
            [sys.executable, os.path.abspath(__file__), "--child", name],
            capture_output=True, text=True, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"},
        )
        if out.returncode:
            raise SystemExit(f"case {name} failed: {out.stderr.strip().splitlines()[-1:]}")
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    report(
        "memory_fit",
        rows,
        [("case", "case"), ("batch", "batch"), ("bound_gib", "bound GiB"), ("estimate_gib", "estimate GiB"), ("whole_gib", "actual GiB"),
         ("actual_over_estimate", "actual/est"), ("micro", "micro"), ("micro_estimate_gib", "micro est GiB"),
         ("micro_gib", "micro actual GiB"), ("micro_over_estimate", "actual/est"), ("probe_s", "probe s")],
    )
    return 0


def argparse_hidden():
    import argparse

    return argparse.SUPPRESS


if __name__ == "__main__":
    sys.exit(main())
