"""One check for the day a GPU is at hand: under 8 minutes on one GPU, one table, one JSON line.

    python benchmarks/gpu_check.py                 # on the GPU machine (budget 480 s)
    SIMSIAM_TORCH_PYTHON=VENV/bin/python python benchmarks/gpu_check.py   # with the PyTorch peer
    python benchmarks/gpu_check.py --quick         # tiny, on a CPU too: the test suite's smoke run

Rows, in the order they run (docs/gpu.md, "Measuring a GPU", says how to read them):
- device: the first GPU TensorFlow sees (name, compute capability, total memory from
  nvidia-smi), or without one the CPU model and MemTotal;
- pytorch step: the PyTorch SimSiam the project compares with (../shared/peers/torch_simsiam.py
  beside the repository, --step-bench; CIFAR ResNet-18, 32 px,
  random tensors, channels_last, autocast for bfloat16) in its own process, run first,
  before TensorFlow builds a model on the GPU; with this Python if it imports torch,
  else with $SIMSIAM_TORCH_PYTHON, else skipped with the reason (benchmarks/train_step.py's
  torch_python and torch_step);
- step: one SimSiam training step through fit() on a constant batch
  (benchmarks/train_step.py's `measure`, fit step only), ResNet-18 at 32 px (cifar
  preset) and ResNet-50 at 224 px (imagenet preset), in float32 and the low precision
  (bfloat16; float16 on GPUs of compute capability below 8.0, which have no native
  bfloat16), XLA off and on;
- end to end: the step row's fit() step fed by the streamed training input instead of
  a constant batch (`simsiam_tf.input.open_input` with --input stream, what train.py
  reads), 500 x 375 JPEGs from a folder cropped to 224 px, ResNet-50 in the low
  precision, XLA off as train.py compiles, --augment-on host and device (with device,
  train_step also runs the colour steps); `over_step` is its pairs/s over the step row
  of the same model, batch and precision: 1.0 when the input keeps up;
- input only: the same stream alone, no model (`StreamInput.worker_batches`), and the
  host cores it kept busy: the process's CPU time over wall time while only the input
  runs (`host_cores_used`, of `cores_available` = os.sched_getaffinity).
Peak memory per row: on a GPU the allocator's peak on GPU:0 after
tf.config.experimental.reset_memory_stats; on a CPU, and for the input-only rows, the
process's peak RSS (VmHWM after `echo 5 > /proc/self/clear_refs`).

The photos are made once in the system's temp dir (smooth random colour fields with
grain, JPEG quality 90, about 90 KB each, ImageNet's typical size): nothing but this
repository is needed, not the CIFAR-10 folder (data/cifar10). Batches are the recipes' per-GPU ones
(256 at 32 px, 64 at 224 px), halved while a step runs out of memory (the row says so).
A row that would start after --budget seconds is skipped and says so; a row that fails
says why and the others still run.

--quick shrinks everything and says so in its output (`quick` in the JSON line): width 8,
batch 8 (ResNet-18) and 4 (ResNet-50), ResNet-50 and the stream at 128 px (the same
code paths as 224 px, at half the compile time), 2 timed steps after 1 warm-up, 48
photos, and two ResNet-18 step rows and one ResNet-50 row instead of four each (every
model built costs 5-15 s on a 2-core CPU and every XLA compile 10-60 s); every kind of
row still runs. Its numbers are not GPU figures.
"""

from __future__ import annotations

import functools
import gc
import os
import sys
import tempfile
import time

STARTED = time.perf_counter()  # the budget counts TensorFlow's import too

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import Parser, machine, nonnegative_float, positive_int, report, training_input  # noqa: E402

import tensorflow as tf  # noqa: E402

# TensorFlow otherwise reserves nearly all GPU memory when it starts, leaving none to the
# PyTorch peer.
for _gpu in tf.config.list_physical_devices("GPU"):
    tf.config.experimental.set_memory_growth(_gpu, True)

import keras  # noqa: E402

from simsiam_tf import augment as aug  # noqa: E402
from simsiam_tf import memory_fit  # noqa: E402
from train_step import measure, torch_python, torch_step  # noqa: E402

PHOTO_SIZE = (375, 500)  # height, width: ImageNet's typical photo
CLASSES = 10

# What a run measures. The GPU sizes are the recipes' per-GPU batches; the steps are
# few enough for the whole check to stay within 8 minutes on one GPU.
ALL_STEPS = (("float32", False), ("float32", True), ("low", False), ("low", True))
FULL = {"width": 64, "batch18": 256, "batch50": 64, "size50": 224, "steps18": 20, "steps50": 10, "warmup": 2,
        "rows18": ALL_STEPS, "rows50": ALL_STEPS, "e2e_steps": 8, "input_batches": 30, "photos": 512,
        "torch_steps": 10}
# Every kind of row still runs once: both precisions, XLA off and on (ResNet-18), the
# low-precision ResNet-50 step the end-to-end rows are compared with. On the 2-core CPU
# each model built and traced costs 5-15 s of CPU time, each XLA compile 10-60 s, and an
# end-to-end row twice as much at 224 px as at 128 px (35-42 s against 21-23 s, mostly
# the augmentation's XLA kernels compiling), where the stream takes the same path
# (>= 96 px: crops drawn on the originals, per-image colour steps, blur).
QUICK = {"width": 8, "batch18": 8, "batch50": 4, "size50": 128, "steps18": 2, "steps50": 2, "warmup": 1,
         "rows18": (("float32", False), ("low", True)), "rows50": (("low", False),),
         "e2e_steps": 2, "input_batches": 16, "photos": 48, "torch_steps": 2}
QUICK_SAYS = ("--quick: width 8, batch 8 (ResNet-18) and 4 (ResNet-50), ResNet-50 and the stream at 128 px, "
              "2 timed steps after 1 warm-up, 48 photos; step rows only for ResNet-18 float32 without XLA and "
              "the low precision with XLA, and ResNet-50 in the low precision without XLA; not a GPU figure")


# ----------------------------------------------------------------------------------
# The device and its memory


def _meminfo_total_mb() -> float | None:
    try:
        with open("/proc/meminfo") as f:
            return next((int(line.split()[1]) / 1024 for line in f if line.startswith("MemTotal:")), None)
    except OSError:
        return None


def device_info() -> dict:
    """What the check ran on: the first GPU, or the CPU when there is none."""
    gpus = tf.config.list_physical_devices("GPU")
    cores = len(os.sched_getaffinity(0))
    if not gpus:
        return {"kind": "CPU", "name": machine()["cpu"], "memory_total_mb": _meminfo_total_mb(),
                "memory_source": "/proc/meminfo MemTotal", "host_cores": cores}
    details = tf.config.experimental.get_device_details(gpus[0])
    capability = details.get("compute_capability")
    total = memory_fit.gpu_total_bytes()
    return {"kind": "GPU", "name": details.get("device_name", gpus[0].name),
            "compute_capability": ".".join(map(str, capability)) if capability else None,
            "memory_total_mb": None if total is None else total / 2**20,
            "memory_source": "nvidia-smi" if total is not None else "nvidia-smi not found or failed", "gpus_visible": len(gpus), "host_cores": cores}


def low_precision(device: dict) -> str:
    """bfloat16 where the device computes it natively (CPUs and GPUs of compute capability
    8.0 or newer), float16 on older GPUs."""
    capability = device.get("compute_capability")
    if capability and tuple(int(x) for x in capability.split(".")) < (8, 0):
        return "float16"
    return "bfloat16"


class PeakMemory:
    """The peak memory of one row: GPU:0's allocator on a GPU, else (and with host=True)
    this process's peak RSS: the meters the memory check uses (simsiam_tf.memory_fit)."""

    def __init__(self, gpu: bool):
        self.gpu = gpu
        self.host = memory_fit.HostPeak()
        self.device = memory_fit.GpuPeak() if gpu else None
        self.host_reset = False

    def reset(self, host: bool = False) -> None:
        if self.gpu and not host:
            self.device.reset()
            return
        try:
            self.host.reset()
            self.host_reset = True
        except OSError:  # not allowed here: the peak since the process started
            self.host_reset = False

    def peak(self, host: bool = False) -> dict:
        if self.gpu and not host:
            return {"peak_mb": self.device.peak() / 2**20, "peak_of": "GPU:0"}
        return {"peak_mb": self.host.peak() / 2**20, "peak_of": "host RSS" if self.host_reset else "host RSS since start"}


# ----------------------------------------------------------------------------------
# Photos to stream


def synthetic_photos(train: int, test: int) -> str:
    """A folder train/<class>/*.jpg and test/<class>/*.jpg of `train` and `test` random
    500 x 375 photos over CLASSES classes: smooth random colour fields (8 x 6 and 64 x 48
    grids upscaled bicubic) plus Gaussian grain (std 16), JPEG quality 90, about 90 KB
    each, near ImageNet's ~110 KB, so that reading and decoding cost what photos cost.

    Made once in the system's temp dir and reused; never inside the repository.
    """
    root = os.path.join(tempfile.gettempdir(), "simsiam-tf-bench", f"synthetic-{train}-{test}-500x375-q90")
    done = os.path.join(root, ".complete")
    if os.path.exists(done):
        return root
    paths = []
    for split, n in (("train", train), ("test", test)):
        for c in range(CLASSES):
            os.makedirs(os.path.join(root, split, f"class{c}"), exist_ok=True)
        paths += [os.path.join(root, split, f"class{i % CLASSES}", f"{i:05d}.jpg") for i in range(n)]

    def make(index, path):
        seed = tf.stack([index, tf.constant(7, tf.int64)])
        coarse = tf.random.stateless_uniform([1, 6, 8, 3], seed, 0, 255)
        detail = tf.random.stateless_uniform([1, 48, 64, 3], seed + 1, -40, 40)
        image = tf.image.resize(coarse, PHOTO_SIZE, "bicubic") + tf.image.resize(detail, PHOTO_SIZE, "bicubic")
        image += tf.random.stateless_normal(tf.shape(image), seed + 2, stddev=16)
        image = tf.cast(tf.clip_by_value(tf.round(image[0]), 0, 255), tf.uint8)
        with tf.control_dependencies([tf.io.write_file(path, tf.io.encode_jpeg(image, quality=90))]):
            return tf.constant(0)

    with tf.device("/CPU:0"):
        ds = tf.data.Dataset.from_tensor_slices((tf.range(len(paths), dtype=tf.int64), paths))
        for _ in ds.map(make, num_parallel_calls=tf.data.AUTOTUNE):
            pass
    open(done, "w").close()
    return root


# ----------------------------------------------------------------------------------
# The rows


def _out_of_memory(error: Exception) -> bool:
    # XLA can report an allocation failure as an InternalError that names it.
    text = str(error)
    return isinstance(error, (tf.errors.ResourceExhaustedError, MemoryError)) or "RESOURCE_EXHAUSTED" in text


def halving(batch: int, run):
    """`run(batch)`, halving the batch while it runs out of memory; (result, batch, note)."""
    note = ""
    while True:
        try:
            return run(batch), batch, note
        except Exception as e:  # re-raised unless it is an out-of-memory error
            if not _out_of_memory(e) or batch // 2 < 2:
                raise
            note += f"out of memory at batch {batch} ({type(e).__name__}), halved; "
            batch //= 2
        finally:
            keras.backend.clear_session()
            gc.collect()


def step_row(precision, jit, preset, size, batch, plan, memory) -> dict:
    steps = plan["steps18"] if preset == "cifar" else plan["steps50"]

    def run(b):
        memory.reset()
        out = measure(precision, jit, b, steps, plan["warmup"], plan["width"], preset, size, fit_only=True)
        return {"pairs_per_s": out["step_pairs_per_s"], **memory.peak()}

    out, batch, note = halving(batch, run)
    return {**out, "batch": batch, **({"note": note.rstrip("; ")} if note else {})}


def stream_batches(root, size, augment_on, batch):
    """The streamed training input's batches of the photos (`simsiam_tf.input.open_input`
    with --input stream, what train.py reads), epoch after epoch."""
    stream = training_input(f"folder:{root}", size, "stream")
    return stream.worker_batches(batch, aug.AugmentSpec.for_image_size(size), seed=0, epochs=10_000,
                                 augment_on=augment_on)


def end_to_end_row(root, precision, size, augment_on, batch, plan, memory) -> dict:
    """The step row's fit() step fed by the stream instead of a constant batch (with
    --augment-on device, train_step also augments): the same model, compiled as
    train.py compiles it (XLA off), so the two differ only by the input."""
    def run(b):
        memory.reset()
        out = measure(precision, False, b, plan["e2e_steps"], plan["warmup"], plan["width"], "imagenet", size,
                      fit_only=True, batches=stream_batches(root, size, augment_on, b), augment_on=augment_on)
        return {"pairs_per_s": out["step_pairs_per_s"], **memory.peak()}

    out, batch, note = halving(batch, run)
    return {**out, "batch": batch, **({"note": note.rstrip("; ")} if note else {})}


def input_only_row(root, size, augment_on, batch, plan, memory) -> dict:
    """The stream alone: pairs/s over input_batches batches after 2, and the process's
    CPU time over wall time meanwhile (nothing else runs)."""
    it = iter(stream_batches(root, size, augment_on, batch))
    for _ in range(2):
        next(it)
    memory.reset(host=True)
    cpu, started = time.process_time(), time.perf_counter()
    for _ in range(plan["input_batches"]):
        last = next(it)
    last.numpy()
    wall = time.perf_counter() - started
    cores_used = (time.process_time() - cpu) / wall
    rate = plan["input_batches"] * batch / wall
    return {"pairs_per_s": rate, "batch": batch, "host_cores_used": cores_used,
            "pairs_per_s_per_core": rate / max(cores_used, 1e-9), **memory.peak(host=True)}


def torch_rows(root, low, batch, plan, device) -> list[tuple[dict, dict]]:
    """The PyTorch peer's step in both precisions: (row, result) pairs, the result
    {"pairs_per_s": ...} or {"skipped": why} (no PyTorch; no float16 in the peer) or
    {"error": ...} (the peer failed)."""
    base = {"row": "pytorch step", "model": "resnet18", "px": 32, "xla": None, "batch": batch}
    python, why = torch_python(root)
    if python is None:  # the table shows the reason's first clause, the JSON line all of it
        return [({**base, "precision": None, "note": why}, {"skipped": why.split(";")[0]})]
    threads = int(tf.config.threading.get_intra_op_parallelism_threads()) or os.cpu_count()
    rows = []
    for precision in ("float32", low):
        row = {**base, "precision": precision}
        if precision == "float16":
            rows.append((row, {"skipped": "skipped PyTorch float16: the peer has only --bf16 (autocast to bfloat16)"}))
            continue
        try:
            speed = torch_step(python, precision, batch, plan["torch_steps"], plan["width"], threads, root,
                               "cuda" if device["kind"] == "GPU" else "cpu")
            rows.append((row, {"pairs_per_s": speed}))
        except SystemExit as e:  # torch_step's one line when the peer fails
            rows.append((row, {"skipped": str(e)}))  # "error: the PyTorch reference failed ..."
    return rows


def readings(rows: list[dict], step50: dict | None) -> dict:
    """What the rows say together, per augmentation placement: end to end over step
    (1.0: the input keeps up), and the host cores the stream would need to feed the
    ResNet-50 step at its rate (step pairs/s over input-only pairs/s per core)."""
    out = {}
    for r in rows:
        if r["result"] != "measured" or "augment_on" not in r:
            continue
        if "over_step" in r:
            out.setdefault("end_to_end_over_step", {})[r["augment_on"]] = round(r["over_step"], 3)
        if r["row"] == "input only":
            out.setdefault("input_pairs_per_s_per_core", {})[r["augment_on"]] = round(r["pairs_per_s_per_core"], 1)
            if step50:
                cores = step50["pairs_per_s"] / r["pairs_per_s_per_core"]
                out.setdefault("host_cores_to_feed_step", {})[r["augment_on"]] = round(cores, 2)
    return out


# ----------------------------------------------------------------------------------


def main(argv=None) -> int:
    p = Parser(description=__doc__)
    p.add_argument("--quick", action="store_true", help="tiny sizes, runs on a CPU (the test suite's run)")
    p.add_argument("--budget", type=nonnegative_float, default=480.0,
                   help="seconds: rows that would start later are skipped (default 480)")
    p.add_argument("--photos", type=positive_int, default=None,
                   help="training photos to generate and stream (default 512; --quick 48)")
    args = p.parse_args(argv)
    device = device_info()
    if device["kind"] != "GPU" and not args.quick:
        p.error("no GPU visible to TensorFlow (tf.config.list_physical_devices('GPU') is empty): the full check "
                "would take hours on a CPU; --quick runs the small CPU check")
    plan = dict(QUICK if args.quick else FULL)
    if args.photos:
        plan["photos"] = args.photos
    low = low_precision(device)
    memory = PeakMemory(device["kind"] == "GPU")
    capability = f" (compute capability {device['compute_capability']})" if device.get("compute_capability") else ""
    print(f"device: {device['kind']} {device['name']}{capability}, {device['memory_total_mb'] or 0:,.0f} MiB "
          f"({device['memory_source']}); low precision {low}", flush=True)
    if args.quick:
        print(QUICK_SAYS, flush=True)
    root = synthetic_photos(plan["photos"], max(CLASSES, plan["photos"] // 4))
    rows = []

    def spent() -> float:
        return time.perf_counter() - STARTED

    def add(base: dict, work=None, skipped: str = "") -> dict:
        """Run one row within the budget. `result` says measured, or why not: skipped
        (the budget, --quick, no PyTorch) or the error that stopped it."""
        if not skipped and spent() > args.budget:
            skipped = f"skipped: time budget spent ({spent():.0f} s of {args.budget:.0f} s)"
        row = {**base, "result": skipped}
        if not skipped:
            try:
                row.update(work(), result="measured")
            except Exception as e:  # noqa: BLE001  (one failing row must not lose the others)
                first = (str(e).strip().splitlines() or [""])[0][:200]
                row["result"] = f"error: {type(e).__name__}: {first}"
        rows.append(row)
        shown = f"{row['pairs_per_s']:9,.1f} pairs/s" if "pairs_per_s" in row else row["result"]
        print(f"  [{spent():4.0f} s] {row['row']:<12} {row['model'] or '':<8} {row['px']:>3} px "
              f"{row['precision'] or '':<8} xla={row['xla']!s:<5} {row.get('augment_on', ''):<6} "
              f"batch {row['batch']}: {shown}" + (f" ({row['note']})" if row.get("note") else ""), flush=True)
        return row

    # The peer first, before TensorFlow takes GPU memory for our models.
    for base, result in torch_rows(root, low, plan["batch18"], plan, device):
        add(base, functools.partial(dict, result), skipped=result.get("skipped", ""))

    # The step: ResNet-18 at 32 px, ResNet-50 at 224 px; float32 and the low precision; XLA off and on.
    for preset, model, size, batch, wanted in (("cifar", "resnet18", 32, plan["batch18"], plan["rows18"]),
                                               ("imagenet", "resnet50", plan["size50"], plan["batch50"], plan["rows50"])):
        for kind, jit in ALL_STEPS:
            precision = low if kind == "low" else kind
            base = {"row": "step", "model": model, "px": size, "precision": precision, "xla": jit, "batch": batch}
            if (kind, jit) in wanted:
                add(base, functools.partial(step_row, precision, jit, preset, size, batch, plan, memory))
            else:
                add(base, skipped="skipped: --quick")

    # End to end: train.py's loop on the streamed photos at the batch the step fitted,
    # then the same stream alone.
    size = plan["size50"]
    step50 = next((r for r in rows if r["row"] == "step" and r["model"] == "resnet50" and r["precision"] == low
                   and r["xla"] is False and r["result"] == "measured"), None)
    batch = step50["batch"] if step50 else plan["batch50"]
    for on in ("host", "device"):
        base = {"row": "end to end", "model": "resnet50", "px": size, "precision": low, "xla": False,
                "augment_on": on, "batch": batch}
        row = add(base, functools.partial(end_to_end_row, root, low, size, on, batch, plan, memory))
        if step50 and row["result"] == "measured" and row["batch"] == step50["batch"]:
            row["over_step"] = row["pairs_per_s"] / step50["pairs_per_s"]
    for on in ("host", "device"):
        base = {"row": "input only", "model": None, "px": size, "precision": None, "xla": None, "augment_on": on,
                "batch": batch}
        add(base, functools.partial(input_only_row, root, size, on, batch, plan, memory))

    elapsed = spent()
    extra = {
        "device": device, "low_precision": low, "quick": QUICK_SAYS if args.quick else False,
        "width": plan["width"], "photos": plan["photos"], "photo_size": "500x375",
        "cores_available": len(os.sched_getaffinity(0)), "elapsed_s": round(elapsed, 1), "budget_s": args.budget,
        "within_budget": elapsed <= args.budget, **readings(rows, step50),
    }
    print(f"elapsed {elapsed:.0f} s (budget {args.budget:.0f} s)", flush=True)
    for on, cores in extra.get("host_cores_to_feed_step", {}).items():
        print(f"to feed the ResNet-50 {low} step ({step50['pairs_per_s']:,.1f} pairs/s) with --augment-on {on}: "
              f"{cores:.2f} host cores at the input-only rate per core", flush=True)
    report(
        "gpu_check", rows,
        [("row", "row"), ("model", "model"), ("px", "px"), ("precision", "precision"), ("xla", "xla"),
         ("augment_on", "aug"), ("batch", "batch"), ("pairs_per_s", "pairs/s"), ("over_step", "vs step"),
         ("host_cores_used", "cores"), ("pairs_per_s_per_core", "pairs/s/core"), ("peak_mb", "peak MiB"),
         ("peak_of", "peak of"), ("result", "result")],
        extra,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
