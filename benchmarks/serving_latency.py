"""Latency and throughput of the local REST server (serving/local_server.py).

    python benchmarks/serving_latency.py                 # CIFAR ResNet-18, 32 px
    python benchmarks/serving_latency.py --quick         # fewer requests
    python benchmarks/serving_latency.py --model-base-path exports/simsiam

Starts the server in its own process on 127.0.0.1, then from this process measures:
- single-image latency: sequential requests of one PNG, p50 and p99;
- throughput: `--concurrency` clients sending batches of `--batch` images, images/s.
Prints a table and one JSON line. The weights do not matter for speed, so without
--model-base-path an untrained encoder of the chosen preset is exported to a temp dir.
"""

from __future__ import annotations

import base64
import io
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import Parser, existing_dir, positive_int  # noqa: E402


def _export_untrained(preset: str, width: int | None, directory: str) -> str:
    from simsiam_tf import export
    from simsiam_tf.config import make_config
    from simsiam_tf.model import build_simsiam

    overrides = {"width": width} if width else {}
    config = make_config(preset, **overrides)
    model = build_simsiam(config)
    base = os.path.join(directory, "simsiam")
    export.export_saved_model(model, config, base)
    return base


def _png_b64(size: int, seed: int) -> str:
    import numpy as np
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)).save(buf, "PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _post(url: str, body: bytes) -> None:
    req = urllib.request.Request(url, data=body, method="POST", headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as r:
        r.read()


def _percentile(values, q):
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q / 100 * (len(values) - 1))))]


def main(argv=None) -> int:
    p = Parser(description=__doc__)
    p.add_argument("--model-base-path", type=existing_dir, help="an export directory holding 1/, 2/, ...")
    p.add_argument("--preset", default="cifar", help="preset of the untrained encoder to export (default cifar)")
    p.add_argument("--width", type=positive_int, help="override the preset's backbone width")
    p.add_argument("--image-size", type=positive_int, default=32, help="size of the PNGs sent")
    p.add_argument("--single", type=positive_int, default=200, help="sequential single-image requests")
    p.add_argument("--batch", type=positive_int, default=32)
    p.add_argument("--concurrency", type=positive_int, default=8)
    p.add_argument("--batched-requests", type=positive_int, default=80, help="batch requests in the throughput phase")
    p.add_argument("--threads", type=positive_int, default=8, help="server --rest_api_num_threads")
    p.add_argument("--quick", action="store_true", help="50 single and 16 batch requests")
    args = p.parse_args(argv)
    if args.quick:
        args.single, args.batched_requests = 50, 16

    with tempfile.TemporaryDirectory() as tmp:
        base = args.model_base_path or _export_untrained(args.preset, args.width, tmp)
        server = subprocess.Popen(
            [sys.executable, os.path.join(REPO, "serving", "local_server.py"), "--model_name", "simsiam",
             "--model_base_path", base, "--rest_api_port", "0", "--rest_api_num_threads", str(args.threads)],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
        )
        try:
            url = server.stdout.readline().split()[2] + "/v1/models/simsiam:predict"
            one = json.dumps({"instances": [{"b64": _png_b64(args.image_size, 0)}]}).encode()
            batch = json.dumps({"instances": [{"b64": _png_b64(args.image_size, i)} for i in range(args.batch)]}).encode()
            for _ in range(5):  # warm up: first calls trace and allocate
                _post(url, one)
                _post(url, batch)

            latencies = []
            for _ in range(args.single):
                started = time.perf_counter()
                _post(url, one)
                latencies.append(time.perf_counter() - started)

            remaining = [args.batched_requests]
            lock = threading.Lock()

            def worker():
                while True:
                    with lock:
                        if remaining[0] == 0:
                            return
                        remaining[0] -= 1
                    _post(url, batch)

            threads = [threading.Thread(target=worker) for _ in range(args.concurrency)]
            started = time.perf_counter()
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            elapsed = time.perf_counter() - started
        finally:
            server.terminate()
            server.wait(timeout=30)

    result = {
        "benchmark": "serving_latency",
        "model": args.model_base_path or f"untrained {args.preset} preset" + (f", width {args.width}" if args.width else ""),
        "image_size": args.image_size,
        "single_requests": args.single,
        "p50_ms": round(1000 * _percentile(latencies, 50), 2),
        "p99_ms": round(1000 * _percentile(latencies, 99), 2),
        "batch": args.batch,
        "concurrency": args.concurrency,
        "batched_requests": args.batched_requests,
        "images_per_sec": round(args.batch * args.batched_requests / elapsed, 1),
        "server_threads": args.threads,
        "cpus": os.cpu_count(),
        "machine": platform.machine(),
    }
    print(f"{'single image p50':<28}{result['p50_ms']:>10.2f} ms")
    print(f"{'single image p99':<28}{result['p99_ms']:>10.2f} ms")
    print(f"{f'batch {args.batch} x {args.concurrency} clients':<28}{result['images_per_sec']:>10.1f} images/s")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
