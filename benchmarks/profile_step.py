"""Where a training step's time goes: TensorFlow's profiler and oneDNN's own log.

    python benchmarks/profile_step.py --batch 64                  # op types in the TF profiler
    python benchmarks/profile_step.py --batch 64 --onednn         # oneDNN primitives, ours
    python benchmarks/profile_step.py --batch 64 --onednn --torch # ... and the PyTorch reference's
    python benchmarks/profile_step.py --batch 64 --precision bfloat16 --onednn --torch \
        --by-shape backward_weights --threads 1                   # per shape, side by side, one thread

Without --onednn: `SimSiam.train_step` in a `tf.function`, on one batch of random uint8
views in the batch format ([B, 2, 32, 32, 3], which the step unpacks and normalises), warm-up
steps first, then `--steps` steps traced with `tf.profiler.experimental`; prints the time
per step of each TensorFlow op type (summed over threads, so the total exceeds the wall
time when ops run side by side) and its share.

With --onednn: the same steps in a child process with ONEDNN_VERBOSE=1 (and one op at a
time, --inter-op 1, so that each primitive's logged time is its own), whose log names
every oneDNN primitive executed (kind, implementation, shapes, milliseconds); prints
per-step totals by (kind, implementation, propagation), counting only the timed steps'
share of the log. With --torch, the PyTorch reference (../shared/peers/torch_simsiam.py
--step-bench, same batch and width) is logged and summed the same way: both frameworks
call oneDNN, so the two tables compare kernel for kernel (see train_step.py for how the
PyTorch interpreter is found). docs/performance.md, "Against PyTorch", reads these.
"""

from __future__ import annotations

import argparse
import collections
import glob
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import CIFAR, Parser, batch_size, machine, nonnegative_int, positive_int  # noqa: E402
from train_step import PEER, torch_python  # noqa: E402


TIMED = "profile_step: timed steps begin"


def _step_function(batch: int, precision: str, width: int):
    import keras
    import tensorflow as tf

    from simsiam_tf.config import make_config
    from simsiam_tf.model import build_simsiam
    from simsiam_tf.optim import make_optimizer

    config = make_config("cifar", precision=precision, batch_size=batch, width=width)
    keras.utils.set_random_seed(0)
    model = build_simsiam(config)
    model.compile(optimizer=make_optimizer(model, config, steps_per_epoch=100))
    # One batch in the batch format (uint8 [B, 2, S, S, 3], both views), as every input delivers it.
    views = tf.cast(tf.random.uniform([batch, 2, 32, 32, 3], 0, 256, tf.int32, seed=1), tf.uint8)
    step = tf.function(model.train_step)
    return lambda: step(views)["loss"].numpy()


def profile_ops(batch: int, precision: str, width: int, steps: int, warmup: int) -> list[dict]:
    """Op-type totals per step from a TensorFlow profiler trace of `steps` steps."""
    import tensorflow as tf
    from tensorflow.tsl.profiler.protobuf import xplane_pb2

    run = _step_function(batch, precision, width)
    for _ in range(warmup):
        run()
    with tempfile.TemporaryDirectory() as logdir:
        tf.profiler.experimental.start(logdir)
        for _ in range(steps):
            run()
        tf.profiler.experimental.stop()
        (path,) = glob.glob(os.path.join(logdir, "**", "*.xplane.pb"), recursive=True)
        space = xplane_pb2.XSpace()
        with open(path, "rb") as f:
            space.ParseFromString(f.read())
    seconds, count = collections.Counter(), collections.Counter()
    for plane in space.planes:
        names = plane.event_metadata
        for line in plane.lines:
            for event in line.events:
                name = names[event.metadata_id].name
                if "/" in name and ":" in name:  # "scope/op_name:OpType": one op execution
                    kind = name.rsplit(":", 1)[1]
                    seconds[kind] += event.duration_ps / 1e12
                    count[kind] += 1
    total = sum(seconds.values())
    return [
        {"op": kind, "ms_per_step": 1000 * s / steps, "ops_per_step": count[kind] / steps, "share": s / total}
        for kind, s in seconds.most_common()
    ]


def _timed_executions(log: str, steps_logged: int, steps_timed: int) -> tuple[str | None, list[list[str]]]:
    """oneDNN's version and the `exec` lines (split into fields) of the timed steps of
    an ONEDNN_VERBOSE log.

    Our child process marks where its timed steps begin (TIMED); for a log without
    the mark (the PyTorch reference's), every step after the first runs the same
    primitives, so the timed steps are the log's last steps_timed / steps_logged of
    executions. Either way the warm-up steps (tracing, primitive creation, JIT) are
    left out."""
    lines = log.splitlines()
    version = next((l.split(",info,", 1)[1] for l in lines if l.startswith("onednn_verbose") and ",info,oneDNN v" in l), None)
    marked = TIMED in lines
    if marked:
        lines = lines[lines.index(TIMED):]
    executions = [line.strip().split(",") for line in lines if line.startswith("onednn_verbose") and ",exec," in line]
    if not marked:
        executions = executions[len(executions) - len(executions) * steps_timed // steps_logged:]
    return version, executions


def onednn_totals(log: str, steps_logged: int, steps_timed: int) -> list[dict]:
    """Per-step totals by primitive (kind, implementation, propagation) over the timed steps."""
    version, executions = _timed_executions(log, steps_logged, steps_timed)
    seconds, count = collections.Counter(), collections.Counter()
    for fields in executions:
        i = fields.index("exec")
        key = (fields[i + 2], fields[i + 3], fields[i + 4])
        seconds[key] += float(fields[-1])
        count[key] += 1
    total = sum(seconds.values())
    return [
        {"primitive": " ".join(k), "ms_per_step": ms / steps_timed, "calls_per_step": count[k] / steps_timed,
         "share": ms / total, "onednn": version}
        for k, ms in seconds.most_common()
    ]


def onednn_by_shape(log: str, steps_logged: int, steps_timed: int, propagation: str) -> dict[str, float]:
    """The median milliseconds of one call, per problem shape, of the timed steps'
    convolutions of one propagation (e.g. backward_weights)."""
    _, executions = _timed_executions(log, steps_logged, steps_timed)
    times = collections.defaultdict(list)
    for fields in executions:
        i = fields.index("exec")
        if fields[i + 2] == "convolution" and fields[i + 4] == propagation:
            times[fields[-2]].append(float(fields[-1]))
    return {shape: float(statistics.median(ms)) for shape, ms in times.items()}


def _print_by_shape(ours: dict, theirs: dict | None) -> None:
    print("median ms per call, by shape (ours" + (", PyTorch, ours / PyTorch)" if theirs is not None else ")"))
    for shape in sorted(ours, key=ours.get, reverse=True):
        line = f"  {shape:<64} {ours[shape]:8.2f}"
        if theirs is not None:
            other = theirs.get(shape)
            line += f" {other:8.2f} {ours[shape] / other:6.2f}" if other else "        -      -"
        print(line)


def _child(args) -> None:
    """Run in the ONEDNN_VERBOSE child: warm-up and timed steps, nothing else."""
    import tensorflow as tf

    if args.inter_op:
        tf.config.threading.set_inter_op_parallelism_threads(args.inter_op)
    if args.threads:
        tf.config.threading.set_intra_op_parallelism_threads(args.threads)
    run = _step_function(args.batch, args.precision, args.width)
    for _ in range(args.warmup):
        run()
    print(TIMED, flush=True)  # oneDNN flushes each log line, so this marks where the timed steps begin
    for _ in range(args.steps):
        run()


def _print(title: str, rows: list[dict], key: str, count: str, limit: int = 20) -> None:
    print(title)
    for r in rows[:limit]:
        print(f"  {r[key]:<70} {r['ms_per_step']:9.1f} ms/step {r[count]:9.1f}/step {100 * r['share']:5.1f}%")
    print(f"  {'total':<70} {sum(r['ms_per_step'] for r in rows):9.1f} ms/step")


def main(argv=None) -> int:
    p = Parser(description=__doc__)
    p.add_argument("--batch", type=batch_size, default=64)
    p.add_argument("--width", type=positive_int, default=64)
    p.add_argument("--steps", type=positive_int, default=2)
    p.add_argument("--warmup", type=nonnegative_int, default=2)
    p.add_argument("--precision", choices=("float32", "bfloat16"), default="float32")
    p.add_argument("--onednn", action="store_true", help="oneDNN's log instead of the TF profiler")
    p.add_argument("--torch", action="store_true", help="with --onednn: also the PyTorch reference's log")
    p.add_argument("--inter-op", type=nonnegative_int, default=1,
                   help="with --onednn: TensorFlow's inter-op threads (default 1: one op at a time, as PyTorch "
                        "runs; with 2, two primitives share the cores and each one's logged time doubles; "
                        "0: TensorFlow's default)")
    p.add_argument("--threads", type=nonnegative_int, default=0,
                   help="with --onednn: intra-op threads of both frameworks (default 0: TensorFlow's default, "
                        "the reference's 2)")
    p.add_argument("--by-shape", metavar="PROPAGATION", default=None,
                   help="with --onednn: also the median time of one call per shape of the convolutions of this "
                        "propagation (forward_training, backward_data, backward_weights), side by side")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if min(args.batch, args.width, args.steps) < 1 or min(args.warmup, args.inter_op) < 0:
        p.error("--batch, --width and --steps must be at least 1, --warmup and --inter-op at least 0")
    if (args.torch or args.by_shape or args.threads) and not (args.onednn or args.child):
        p.error("--torch, --by-shape and --threads read oneDNN logs: add --onednn")
    if args.child:
        _child(args)
        return 0
    out = {"benchmark": "profile_step", "machine": machine(), "batch": args.batch, "width": args.width, "precision": args.precision}
    if not args.onednn:
        rows = profile_ops(args.batch, args.precision, args.width, args.steps, args.warmup)
        _print("TensorFlow ops (profiler trace, summed over threads):", rows, "op", "ops_per_step")
        out["tensorflow_ops"] = rows
        print(json.dumps(out))
        return 0
    env = dict(os.environ, ONEDNN_VERBOSE="1", TF_CPP_MIN_LOG_LEVEL="3")
    cmd = [sys.executable, os.path.abspath(__file__), "--child", "--batch", str(args.batch), "--width",
           str(args.width), "--steps", str(args.steps), "--warmup", str(args.warmup), "--precision", args.precision,
           "--inter-op", str(args.inter_op), "--threads", str(args.threads)]
    started = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise SystemExit(f"error: the profiled steps failed: {(done.stderr.strip().splitlines() or ['?'])[-1]}")
    rows = onednn_totals(done.stdout, args.warmup + args.steps, args.steps)
    if not rows:
        raise SystemExit("error: oneDNN logged nothing: TensorFlow's oneDNN kernels are off (TF_ENABLE_ONEDNN_OPTS=0?)")
    _print(f"ours, {rows[0]['onednn']} ({time.perf_counter() - started:.0f} s):", rows, "primitive", "calls_per_step")
    out["ours"] = rows
    ours_by_shape = onednn_by_shape(done.stdout, args.warmup + args.steps, args.steps, args.by_shape) if args.by_shape else None
    theirs_by_shape = None
    if args.torch:
        python, note = torch_python()
        if python is None:
            print(note)
            out["pytorch_skipped"] = note
        else:
            peer_warmup = 5  # fixed in the reference's --step-bench
            cmd = [python, PEER, "--data", CIFAR, "--step-bench", str(args.steps), "--batch-size", str(args.batch),
                   "--width", str(args.width)] + (["--bf16"] if args.precision == "bfloat16" else []) + (
                      ["--threads", str(args.threads)] if args.threads else [])
            done = subprocess.run(cmd, capture_output=True, text=True, env=env)
            if done.returncode != 0:
                raise SystemExit(f"error: the PyTorch reference failed: {(done.stderr.strip().splitlines() or ['?'])[-1]}")
            rows = onednn_totals(done.stdout, peer_warmup + args.steps, args.steps)
            _print(f"PyTorch, {rows[0]['onednn'] if rows else '?'}:", rows, "primitive", "calls_per_step")
            out["pytorch"] = rows
            if args.by_shape:
                theirs_by_shape = onednn_by_shape(done.stdout, peer_warmup + args.steps, args.steps, args.by_shape)
    if args.by_shape:
        _print_by_shape(ours_by_shape, theirs_by_shape)
        out["by_shape"] = {"propagation": args.by_shape, "ours": ours_by_shape, "pytorch": theirs_by_shape}
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
