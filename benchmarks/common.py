"""Shared helpers for the benchmark scripts: machine description, timing, output.

Every benchmark prints a readable table and then one JSON line, so that numbers in the
docs can be traced to a command and re-measured.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CIFAR = os.path.join(os.path.dirname(REPO), "shared", "datasets", "cifar10")
if REPO not in sys.path:
    sys.path.insert(0, REPO)
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


def machine() -> dict:
    """CPU model, core count and the instruction-set extensions that matter for bf16."""
    from simsiam_tf.distribute import cpu_flags

    model = "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), model)
    except OSError:
        pass
    flags = cpu_flags()
    wanted = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")
    return {
        "cpu": model,
        "cores": os.cpu_count(),
        "isa": [f for f in wanted if f in flags],
        "python": platform.python_version(),
    }


def median_seconds(fn, warmup: int, repeats: int) -> float:
    """Median wall time of `fn()` over `repeats` calls, after `warmup` untimed calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def report(name: str, rows: list[dict], columns: list[tuple[str, str]], extra: dict | None = None) -> None:
    """Print `rows` as a table of `columns` (key, header), then one JSON line."""
    widths = [max(len(h), *(len(_fmt(r.get(k))) for r in rows)) for k, h in columns]
    print("  ".join(h.ljust(w) for (_, h), w in zip(columns, widths)))
    for r in rows:
        print("  ".join(_fmt(r.get(k)).ljust(w) for (k, _), w in zip(columns, widths)))
    print(json.dumps({"benchmark": name, "machine": machine(), **(extra or {}), "rows": rows}))


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:,.1f}" if abs(value) >= 10 else f"{value:.3f}"
    return str(value)
