"""Does a lossy wire format change what SimSiam learns? Short runs through the tf.data
service, the same command and seed, only `--data-service-wire` differing.

    python benchmarks/wire_learning.py                      # uint8, jpeg, uint8 again
    python benchmarks/wire_learning.py --quick              # tiny: that it runs

A dispatcher and two workers on loopback (the wire format's effect on learning does
not depend on the network), then `train.py` on real CIFAR-10 photos (`--train-limit` of
them; data/cifar10, made by `python make_cifar10_folder.py --out data/cifar10`, or --data)
at 32 px with the digits preset's narrow ResNet-18, once per wire format in `--wires`. The service hands units to workers first come,
first served, so two runs with the same seed see the same pairs in other batches: the
repeated uint8 run measures that noise, against which the jpeg run's difference is read.

Prints each run's final loss, kNN top-1 on the test split, and wall time, then one
JSON line. JPEG at 32 px is the hard case: its 8 x 8 blocks are a quarter of the view's
side; at 224 px they are 1/28.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import REPO, Parser, cifar_folder, existing_dir, nonnegative_int, positive_int, report  # noqa: E402

ENV = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")


def _servers(work_dir: str):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    module = [sys.executable, "-m", "simsiam_tf.data_service"]
    procs = [subprocess.Popen([*module, "dispatcher", "--port", str(port), "--work-dir", work_dir], cwd=REPO, env=ENV,
                              stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)]
    procs[0].stdout.readline()
    for _ in range(2):
        procs.append(subprocess.Popen([*module, "worker", "--dispatcher", f"127.0.0.1:{port}", "--port", "0",
                                       "--worker-address", "127.0.0.1:%port%"], cwd=REPO, env=ENV,
                                      stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True))
        procs[-1].stdout.readline()
    return f"grpc://127.0.0.1:{port}", procs


def main(argv=None) -> int:
    p = Parser(description=__doc__)
    p.add_argument("--quick", action="store_true", help="256 images, 2 epochs")
    p.add_argument("--data", type=existing_dir, default=None,
                   help="a folder train|test/<class>/*.jpg (default data/cifar10, or $SIMSIAM_CIFAR10)")
    p.add_argument("--train-limit", type=positive_int, help="training images (default 5,000; --quick: 256)")
    p.add_argument("--epochs", type=positive_int, help="default 10 (--quick: 2)")
    p.add_argument("--seed", type=nonnegative_int, default=0)
    p.add_argument("--wires", default="uint8,jpeg,uint8", help="one run per entry (default uint8,jpeg,uint8)")
    args = p.parse_args(argv)
    args.data = args.data or cifar_folder()  # a missing default: one line naming how to make it, exit 2
    defaults = dict(train_limit=256, epochs=2) if args.quick else dict(train_limit=5000, epochs=10)
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)

    rows = []
    target, procs = _servers(tempfile.mkdtemp(prefix="simsiam-wire-learning-"))
    try:
        for i, wire in enumerate(args.wires.split(",")):
            run = tempfile.mkdtemp(prefix=f"simsiam-wire-{wire}-")
            os.rmdir(run)
            command = [sys.executable, "train.py", "--preset", "digits", "--dataset", f"folder:{args.data}",
                       "--image-size", "32", "--train-limit", str(args.train_limit), "--epochs", str(args.epochs),
                       "--knn-every", str(args.epochs), "--diag-every", "0", "--projector-images", "0",
                       "--val-fraction", "0", "--knn-bank-size", "5000", "--precision", "float32",
                       "--seed", str(args.seed), "--data-service", target, "--data-service-wire", wire,
                       "--logdir", run]
            result = subprocess.run(command, cwd=REPO, env=ENV, capture_output=True, text=True)
            if result.returncode:
                print(f"wire_learning: error: the {wire} run failed: {result.stderr.strip()[-500:]}", file=sys.stderr)
                return 1
            with open(os.path.join(run, "summary.json")) as f:
                summary = json.load(f)
            row = {"run": i + 1, "wire": wire, "loss": summary["loss"], "knn_top1": summary["knn_top1"],
                   "images_missed": summary.get("images_missed", 0), "wall_s": summary["wall_time_s"], "logdir": run}
            rows.append(row)
            print(f"  run {i + 1}  {wire:<6} loss {row['loss']:.4f}  kNN top-1 {row['knn_top1']:.4f}  "
                  f"({row['wall_s']:.0f} s)", flush=True)
    finally:
        for proc in procs:
            proc.terminate()
            proc.wait()
    report("wire_learning", rows,
           [("run", "run"), ("wire", "wire"), ("loss", "final loss"), ("knn_top1", "kNN top-1"),
            ("images_missed", "missed"), ("wall_s", "wall s")],
           {"train_limit": args.train_limit, "epochs": args.epochs, "image_size": 32, "seed": args.seed,
            "preset": "digits (narrow ResNet-18)", "data": args.data})
    return 0


if __name__ == "__main__":
    sys.exit(main())
