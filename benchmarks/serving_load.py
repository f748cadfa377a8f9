"""Load test of the local REST server while a new model version is published.

    python benchmarks/serving_load.py                       # 8 clients, 2,000 requests
    python benchmarks/serving_load.py --quick               # 400 requests

The server runs in its own process on 127.0.0.1; this process is the load. Requests
carry 1, 4, 16 or 32 PNG images (seeded mix). When half of them have been answered,
version 2 (different weights) is published the way export.py does it: written
beside the versions and renamed into place. Every response is checked against both
versions' embeddings computed in-process: it must match one version for all its
images, never an error or a mixture. The server's RSS is sampled throughout.
"""

from __future__ import annotations

import base64
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import Parser, positive_int  # noqa: E402

BATCH_SIZES = (1, 4, 16, 32)


def _rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _export_two_versions(directory: str, width: int):
    """Version 1 in the base path, version 2 staged outside it; both from different seeds."""
    import keras

    from simsiam_tf import export
    from simsiam_tf.config import make_config
    from simsiam_tf.model import build_simsiam

    config = make_config("digits", width=width, proj_dim=64, pred_dim=16)
    base = os.path.join(directory, "models", "simsiam")
    staged = os.path.join(directory, "staged")
    for version, seed, target in ((1, 1, base), (2, 2, staged)):
        keras.utils.set_random_seed(seed)
        export.export_saved_model(build_simsiam(config), config, target, version=version)
    return base, os.path.join(staged, "2")


def _growth(samples):
    third = len(samples) // 3
    if third == 0:
        return 0.0
    return round(max(samples[2 * third :]) - max(samples[third : 2 * third]), 1)


def run_load(requests=2000, concurrency=8, width=8, seed=0, poll=0.2):
    """Run the load test; returns a dict of results (see the module docstring)."""
    import tensorflow as tf
    from PIL import Image

    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (32, 32, 32, 3), dtype=np.uint8)
    pngs = []
    for im in images:
        buf = io.BytesIO()
        Image.fromarray(im).save(buf, "PNG")
        pngs.append(base64.b64encode(buf.getvalue()).decode("ascii"))

    with tempfile.TemporaryDirectory() as tmp:
        base, staged_v2 = _export_two_versions(tmp, width)
        reference = {
            v: tf.saved_model.load(p).signatures["serving_pixels"](images=tf.constant(images))["embedding"].numpy()
            for v, p in ((1, os.path.join(base, "1")), (2, staged_v2))
        }
        server = subprocess.Popen(
            [sys.executable, os.path.join(REPO, "serving", "local_server.py"), "--model_name", "simsiam",
             "--model_base_path", base, "--rest_api_port", "0", "--rest_api_num_threads", str(concurrency),
             "--file_system_poll_wait_seconds", str(poll)],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
        )
        try:
            url = server.stdout.readline().split()[2] + "/v1/models/simsiam:predict"
            plan = rng.choice(BATCH_SIZES, size=requests)
            starts = rng.integers(0, 32 - max(BATCH_SIZES) + 1, size=requests)
            results = [None] * requests
            next_index = [0]
            answered = [0]
            lock = threading.Lock()
            published = threading.Event()
            rss = []

            def sample_memory():
                while not done.is_set():
                    rss.append((published.is_set(), _rss_mb(server.pid)))
                    time.sleep(0.1)

            def worker():
                while True:
                    with lock:
                        i = next_index[0]
                        if i >= requests:
                            return
                        next_index[0] += 1
                    n, s = int(plan[i]), int(starts[i])
                    body = json.dumps({"instances": [{"b64": b} for b in pngs[s : s + n]]}).encode()
                    started = time.perf_counter()
                    try:
                        req = urllib.request.Request(url, data=body, method="POST")
                        with urllib.request.urlopen(req, timeout=120) as r:
                            out = np.array(json.loads(r.read())["predictions"], np.float32)
                        error = None
                    except (urllib.error.URLError, OSError, ValueError, KeyError) as e:
                        out, error = None, f"{type(e).__name__}: {e}"
                    latency = time.perf_counter() - started
                    version = None
                    if out is not None:
                        for v, ref in reference.items():
                            if out.shape == ref[s : s + n].shape and np.allclose(out, ref[s : s + n], atol=1e-4):
                                version = v
                    results[i] = {"n": n, "latency": latency, "error": error, "version": version,
                                  "after_publish": published.is_set()}
                    with lock:
                        answered[0] += 1
                        if answered[0] == requests // 2 and not published.is_set():
                            tmp_target = os.path.join(base, ".tmp-2")
                            shutil.copytree(staged_v2, tmp_target)
                            os.rename(tmp_target, os.path.join(base, "2"))
                            published.set()

            done = threading.Event()
            sampler = threading.Thread(target=sample_memory, daemon=True)
            sampler.start()
            threads = [threading.Thread(target=worker) for _ in range(concurrency)]
            t0 = time.perf_counter()
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            elapsed = time.perf_counter() - t0
            done.set()
            sampler.join()
        finally:
            server.terminate()
            server.wait(timeout=30)

    latencies = sorted(r["latency"] for r in results)
    before = [m for after, m in rss if not after]
    after = [m for after, m in rss if after]
    return {
        "benchmark": "serving_load",
        "requests": requests,
        "concurrency": concurrency,
        "images": int(sum(r["n"] for r in results)),
        "failed": sum(r["error"] is not None for r in results),
        "errors": sorted({r["error"] for r in results if r["error"]})[:5],
        "unmatched": sum(r["error"] is None and r["version"] is None for r in results),
        "served_by_v1": sum(r["version"] == 1 for r in results),
        "served_by_v2": sum(r["version"] == 2 for r in results),
        "v2_after_publish": sum(r["version"] == 2 and r["after_publish"] for r in results),
        "p50_ms": round(1000 * latencies[len(latencies) // 2], 2),
        "p99_ms": round(1000 * latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))], 2),
        "requests_per_sec": round(requests / elapsed, 1),
        # Growth within each phase: the peak of its last third over the peak of its middle
        # third. A leak grows with requests; loading version 2 is a step between phases.
        "rss_mb_growth_before_publish": _growth(before),
        "rss_mb_growth_after_publish": _growth(after),
        "rss_mb_max": round(max(m for _, m in rss), 1),
        "rss_mb_samples": len(rss),
    }


def main(argv=None) -> int:
    p = Parser(description=__doc__)
    p.add_argument("--requests", type=positive_int, default=2000)
    p.add_argument("--concurrency", type=positive_int, default=8)
    p.add_argument("--width", type=positive_int, default=8, help="backbone width of the served model")
    p.add_argument("--quick", action="store_true", help="400 requests")
    args = p.parse_args(argv)
    result = run_load(400 if args.quick else args.requests, args.concurrency, args.width)
    for key in ("requests", "failed", "unmatched", "served_by_v1", "served_by_v2", "p50_ms", "p99_ms",
                "requests_per_sec", "rss_mb_max", "rss_mb_growth_before_publish", "rss_mb_growth_after_publish"):
        print(f"{key:<28}{result[key]:>12}")
    print(json.dumps(result))
    return 0 if result["failed"] == 0 and result["unmatched"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
