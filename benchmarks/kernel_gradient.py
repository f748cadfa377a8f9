"""The bfloat16 kernel gradient of each ResNet-18 convolution, three ways, beside PyTorch's.

    python benchmarks/kernel_gradient.py --batch 128
    SIMSIAM_TORCH_PYTHON=VENV/bin/python python benchmarks/kernel_gradient.py --batch 128 --torch

For every distinct convolution of the CIFAR ResNet-18 at `--width` (stem, the 3x3
convolutions of each stage, the strided ones, the 1x1 shortcuts), times d loss / d kernel
of a batch of `--batch` images in bfloat16, in one process, the methods interleaved:
- backprop_filter: TensorFlow's Conv2DBackpropFilter, what tf.nn.conv2d's gradient runs;
- taps: one matrix product per kernel tap (kh x kw of them), the input rows the tap
  reads times the output gradient;
- transposed: simsiam_tf.conv_grad.kernel_gradient, the same sum as one forward
  convolution of the input, batch and channels swapped, with the output gradient as
  its kernel.
Each is called as simsiam_tf.model.Conv2D calls the convolution: stride 1 with padding
SAME, a strided convolution on its input padded beforehand, with padding VALID.
With --torch, PyTorch's kernel gradient of the same shapes (aten convolution_backward,
channels-last, what its autograd runs) in its own process. Prints the best of
`--repeats` milliseconds per method (noise on a shared machine only slows) and each
method's ratio to TensorFlow's kernel.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import Parser, batch_size, positive_int, report  # noqa: E402

TORCH_SCRIPT = r"""
import json, sys, time, torch
torch.set_num_threads(int(sys.argv[2]))
BATCH = int(sys.argv[3])
rows = []
for name, size, cin, cout, k, stride, repeats in json.loads(sys.argv[1]):
    out = (size + 2 * (k // 2) - k) // stride + 1
    x = torch.randn(BATCH, cin, size, size).to(torch.bfloat16).contiguous(memory_format=torch.channels_last)
    dy = torch.randn(BATCH, cout, out, out).to(torch.bfloat16).contiguous(memory_format=torch.channels_last)
    w = torch.randn(cout, cin, k, k).to(torch.bfloat16).contiguous(memory_format=torch.channels_last)
    def run():
        return torch.ops.aten.convolution_backward(dy, x, w, None, [stride] * 2, [k // 2] * 2, [1, 1],
                                                   False, [0, 0], 1, [False, True, False])
    run(); run()
    times = []
    for _ in range(repeats):
        t = time.perf_counter(); run(); times.append(time.perf_counter() - t)
    rows.append(min(times) * 1e3)
print(json.dumps(rows))
"""


def layers(width: int) -> list[tuple]:
    """(name, input size, in channels, out channels, kernel, stride) of each distinct
    convolution of the CIFAR ResNet-18 (simsiam_tf.model, preset cifar) at `width`."""
    rows = [("stem", 32, 3, width, 3, 1)]
    size, channels = 32, width
    for stage, mult in enumerate((1, 2, 4, 8), start=1):
        out = width * mult
        if stage > 1:
            rows += [(f"stage{stage} 3x3/2", size, channels, out, 3, 2),
                     (f"stage{stage} shortcut 1x1/2", size, channels, out, 1, 2)]
            size //= 2
        rows.append((f"stage{stage} 3x3", size, out, out, 3, 1))
        channels = out
    return rows


def time_tensorflow(shapes, batch: int, repeats: int, threads: int) -> list[dict]:
    import tensorflow as tf

    from simsiam_tf import conv_grad

    tf.config.threading.set_intra_op_parallelism_threads(threads)

    def taps(x, dy, kh, kw, stride):
        out_h, out_w, cin, cout = dy.shape[1], dy.shape[2], x.shape[-1], dy.shape[-1]
        flat_dy = tf.reshape(dy, [-1, cout])
        products = [tf.matmul(tf.reshape(x[:, i:i + (out_h - 1) * stride + 1:stride,
                                            j:j + (out_w - 1) * stride + 1:stride, :], [-1, cin]),
                              flat_dy, transpose_a=True)
                    for i in range(kh) for j in range(kw)]
        return tf.reshape(tf.stack(products), [kh, kw, cin, cout])

    rows = []
    for name, size, cin, cout, k, stride in shapes:
        # As simsiam_tf.model.Conv2D calls them: stride 1 with padding SAME, strided
        # convolutions on a map padded beforehand, with padding VALID.
        pad = k // 2
        out = (size + 2 * pad - k) // stride + 1
        x = tf.cast(tf.random.normal([batch, size, size, cin]), tf.bfloat16)
        padded = tf.pad(x, [[0, 0], [pad, pad], [pad, pad], [0, 0]])
        dy = tf.cast(tf.random.normal([batch, out, out, cout]), tf.bfloat16)
        x, padding = (x, "SAME") if stride == 1 else (padded, "VALID")
        methods = {
            "backprop_filter": tf.function(lambda: tf.raw_ops.Conv2DBackpropFilter(
                input=x, filter_sizes=[k, k, cin, cout], out_backprop=dy, strides=[1, stride, stride, 1],
                padding=padding)),
            "taps": tf.function(lambda: taps(tf.pad(x, [[0, 0], [pad, pad], [pad, pad], [0, 0]])
                                             if padding == "SAME" else x, dy, k, k, stride)),
            "transposed": tf.function(lambda: conv_grad.kernel_gradient(x, dy, (k, k, cin, cout), (stride, stride),
                                                                         padding)),
        }
        best = {m: float("inf") for m in methods}
        for fn in methods.values():  # trace and warm up
            fn().numpy()
        for _ in range(repeats):  # interleaved: a slow minute slows every method
            for m, fn in methods.items():
                start = time.perf_counter()
                fn().numpy()
                best[m] = min(best[m], time.perf_counter() - start)
        rows.append({"layer": name, "map": f"{out}x{out}", "cin": cin, "cout": cout,
                     **{f"{m}_ms": round(t * 1e3, 2) for m, t in best.items()}})
    return rows


def time_torch(python: str, shapes, batch: int, repeats: int, threads: int) -> list[float]:
    arg = json.dumps([[*s, repeats] for s in shapes])
    done = subprocess.run([python, "-c", TORCH_SCRIPT, arg, str(threads), str(batch)], capture_output=True, text=True)
    if done.returncode:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise SystemExit(f"error: the PyTorch timing failed ({last})")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    p = Parser(description=__doc__)
    p.add_argument("--batch", type=batch_size, default=128, help="images per convolution call")
    p.add_argument("--width", type=positive_int, default=64, help="backbone width (64 = ResNet-18)")
    p.add_argument("--repeats", type=positive_int, default=8)
    p.add_argument("--threads", type=positive_int, default=os.cpu_count())
    p.add_argument("--torch", action="store_true", help="also time PyTorch's kernel gradient")
    args = p.parse_args(argv)
    shapes = layers(args.width)
    python = None
    if args.torch:
        from train_step import torch_python

        python, why = torch_python()
        if python is None:
            print(why, file=sys.stderr)
    rows = time_tensorflow(shapes, args.batch, args.repeats, args.threads)
    columns = [("layer", "layer"), ("map", "out map"), ("cin", "in"), ("cout", "out"),
               ("backprop_filter_ms", "TF kernel ms"), ("taps_ms", "taps ms"), ("transposed_ms", "transposed ms")]
    if python:
        for row, ms in zip(rows, time_torch(python, shapes, args.batch, args.repeats, args.threads)):
            row["torch_ms"] = round(ms, 2)
        columns.append(("torch_ms", "PyTorch ms"))
    for row in rows:
        for m in ("taps", "transposed", "torch"):
            if f"{m}_ms" in row:
                row[f"{m}_speedup"] = round(row["backprop_filter_ms"] / row[f"{m}_ms"], 2)
    columns += [(f"{m}_speedup", f"{m} x") for m in ("taps", "transposed", "torch") if f"{m}_speedup" in rows[0]]
    report("kernel_gradient", rows, columns, {"batch": args.batch, "width": args.width, "threads": args.threads})
    return 0


if __name__ == "__main__":
    sys.exit(main())
