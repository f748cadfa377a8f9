"""Whether a run's batch fits this machine's memory, decided before the first step.

Measured, not guessed: one training step of the run's own model at two small batches
per replica, its peak memory read back (host RSS on a CPU, the allocator's peak on a
GPU), and a straight line through the two points extrapolated to the run's batch. On a
CPU that is what the kernel kills a process for (TensorFlow raises nothing there: the
imagenet preset's global batch 512 at 224 px was killed at 23 GB with exit 137 on a
24 GB machine); on a GPU it is what ends in ResourceExhaustedError mid-epoch.

`plan` compares the estimate with what is free, less room for the input pipeline, and
returns the micro-batch to train with (`--micro-batch`: the whole batch when it fits,
else the largest that fits, whose gradients `TwoViewModel` accumulates), or raises
`OutOfMemory` with one line naming the largest batch that fits.
"""

from __future__ import annotations

import ctypes
import dataclasses
import gc
import os
import shutil
import subprocess
import time

import numpy as np
import tensorflow as tf

from simsiam_tf.errors import OutOfMemory

GIB = 2**30
# Per-replica batches the probe steps at; a run whose per-replica batch is at most the
# larger one is measured at its own batch instead.
PROBE_BATCHES = (8, 16)
# The estimate is raised by SAFETY for a whole-batch step and by ACCUMULATING_SAFETY
# for a step that accumulates micro-batches. Measured with benchmarks/memory_fit.py
# (2026-12-05, AMD EPYC with AVX512-BF16, host RSS): a whole step peaked at 0.92-1.21x
# the line's estimate (digits, cifar at widths 32 and 64, imagenet at batch 32), an
# accumulating step at 1.25-1.63x the estimate for its micro-batch (the sums of the
# gradients and the whole batch beside one micro-batch's activations). GPUs are not
# measured yet (benchmarks/gpu_check.py). On top, HEADROOM is left to the input
# pipeline and the rest of the process beside INPUT_BATCHES global batches in flight.
SAFETY = 1.3
ACCUMULATING_SAFETY = 1.8
HEADROOM = 1 * GIB
INPUT_BATCHES = 8
# upper_bound's allowance for the backward pass, and the share of the free memory
# under which that bound is trusted without measuring.
BOUND_FACTOR = 3
BOUND_SHARE = 0.5


@dataclasses.dataclass(frozen=True)
class Estimate:
    """Peak memory of a training step as `fixed + per_image x images`, in bytes, where
    images is the per-replica batch on a GPU (each has its own memory) and the global
    batch on a CPU (the replicas share the host's)."""

    device: str  # "host" or a GPU name
    fixed: float
    per_image: float
    available: float  # bytes free for training's steps, headroom taken off
    probed: tuple  # ((batch, peak bytes), ...) as measured

    def needed(self, images: int, accumulating: bool = False) -> float:
        return (ACCUMULATING_SAFETY if accumulating else SAFETY) * (self.fixed + self.per_image * images)

    def largest(self, accumulating: bool = False) -> int:
        """The most images a step can hold within `available` (0 if none)."""
        room = self.available / (ACCUMULATING_SAFETY if accumulating else SAFETY) - self.fixed
        return max(0, int(room // self.per_image)) if self.per_image > 0 else 1 << 30


def _status_kib(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise OSError(f"{key} is not in /proc/self/status")


def host_available() -> int:
    """Bytes this process may still take: MemAvailable, and the cgroup's limit less its
    usage where a container sets one."""
    with open("/proc/meminfo") as f:
        info = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in f}
    available = info["MemAvailable"]
    for limit_file, usage_file in (
        ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
        ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory/memory.usage_in_bytes"),
    ):
        try:
            with open(limit_file) as f:
                limit = f.read().strip()
            with open(usage_file) as f:
                usage = int(f.read().strip())
        except OSError:
            continue
        if limit.isdigit() and int(limit) < info["MemTotal"]:
            available = min(available, int(limit) - usage)
        break
    return available


class HostPeak:
    """The process's peak resident memory since `reset` (Linux: VmHWM, reset through
    /proc/self/clear_refs)."""

    name = "host"

    def reset(self) -> None:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")

    def peak(self) -> int:
        return _status_kib("VmHWM") * 1024


class GpuPeak:
    """The TensorFlow allocator's peak on the first GPU since `reset`."""

    def __init__(self, device: str = "GPU:0"):
        self.device = device
        self.name = tf.config.experimental.get_device_details(tf.config.list_physical_devices("GPU")[0]).get(
            "device_name", device
        )

    def reset(self) -> None:
        tf.config.experimental.reset_memory_stats(self.device)

    def peak(self) -> int:
        return tf.config.experimental.get_memory_info(self.device)["peak"]


def gpu_total_bytes() -> int | None:
    """The memory of the first GPU TensorFlow sees, from nvidia-smi (TensorFlow does not
    report it), or None. nvidia-smi numbers GPUs ignoring CUDA_VISIBLE_DEVICES, so the
    first visible one is asked for by its index there."""
    if not shutil.which("nvidia-smi"):
        return None
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0].strip() or "0"
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=memory.total", "--format=csv,noheader,nounits", "-i", visible],
            capture_output=True, text=True, timeout=20, check=True,
        ).stdout
        return int(float(out.split()[0]) * 2**20)
    except (OSError, subprocess.SubprocessError, ValueError, IndexError):
        return None


def probe_batches(per_replica: int) -> tuple[int, int]:
    """The two per-replica batches to measure at (the run's own if it is small)."""
    if per_replica <= PROBE_BATCHES[1]:
        return max(2, per_replica // 2), per_replica
    return PROBE_BATCHES


def release_free_memory() -> None:
    """Hand memory the process has freed back to the system (glibc's malloc_trim), so
    that resident memory is what is in use and a high-water mark measures one step, not
    what earlier steps left cached."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def step_peaks(model, meter, batches: tuple, image_size: int, baseline: int) -> tuple:
    """((images, peak bytes above `baseline`), ...): the peak of a training step of
    `model` at each batch size, each measured on the second step at that size (the
    first fills the kernels' caches). One trace serves every size."""
    step = tf.function(
        model.train_step, input_signature=[tf.TensorSpec([None, 2, image_size, image_size, 3], tf.uint8)]
    )
    rng = np.random.default_rng(0)
    points = []
    for images in batches:
        batch = tf.constant(rng.integers(0, 256, (images, 2, image_size, image_size, 3), dtype=np.uint8))
        step(batch)
        release_free_memory()
        meter.reset()
        step(batch)
        points.append((images, meter.peak() - baseline))
    return tuple(points)


def upper_bound(model, images: int) -> float:
    """Bytes a step at `images` per replica can need at most, counted from the model:
    every layer's output for both views held for the backward pass, times
    BOUND_FACTOR for their gradients and the kernels' scratch, plus weights, gradients,
    momentum and accumulators (float32). benchmarks/memory_fit.py prints it beside the
    measured peak: 2-4x above it on every case measured."""
    elements = 0
    for part in (model.backbone, model.projector, getattr(model, "predictor", None)):
        for layer in part.layers if part is not None else ():
            elements += int(np.prod(layer.output.shape[1:]))
    params = sum(int(np.prod(v.shape)) for v in model.weights)
    return BOUND_FACTOR * 2 * 4 * elements * images + 4 * 4 * params


def _probe_model(config):
    from simsiam_tf.model import build_model
    from simsiam_tf.optim import make_optimizer

    probe_config = config.replace(micro_batch=0)
    model = build_model(probe_config, sync_bn=False)
    model.compile(optimizer=make_optimizer(model, probe_config, 1), jit_compile=False)
    return model


def measure(config, per_replica: int, input_batch_bytes: int, model=None) -> Estimate:
    """Measure the peak memory of `config`'s training step at two small batches on one
    replica (on a throwaway copy of the model: the run's own starts untouched) and fit
    `fixed + per_image x images` through them."""
    on_gpu = bool(tf.config.list_physical_devices("GPU"))
    meter = GpuPeak() if on_gpu else HostPeak()
    release_free_memory()
    available, baseline = _available(on_gpu, input_batch_bytes)
    model = model or _probe_model(config)
    try:
        points = step_peaks(model, meter, probe_batches(per_replica), config.image_size, baseline)
    finally:
        del model
        release_free_memory()
    (b1, p1), (b2, p2) = points
    per_image = max(0.0, (p2 - p1) / (b2 - b1)) if b2 != b1 else p2 / b2
    fixed = p1 - per_image * b1
    return Estimate(meter.name, fixed, per_image, available, points)


def _available(on_gpu: bool, input_batch_bytes: int) -> tuple[float, int]:
    """(bytes free for training's steps, the resident baseline peaks are measured from)."""
    if on_gpu:
        total = gpu_total_bytes()
        if total is None:
            return float("inf"), 0
        # TensorFlow's allocator keeps a few percent of the card to itself.
        return 0.93 * total - tf.config.experimental.get_memory_info("GPU:0")["current"], 0
    available = host_available() - HEADROOM - INPUT_BATCHES * input_batch_bytes
    return available, _status_kib("VmRSS") * 1024


def plan(config, replicas: int, local_replicas: int, estimate: Estimate | None = None, advise=None) -> tuple[int, str]:
    """(micro-batch, one line) for `config` on `replicas` replicas, `local_replicas` of
    them in this process: the global micro-batch to train with (0 = the whole batch in
    one step) and what was measured.

    config.fit_memory says what to do when the batch does not fit: "accumulate" picks
    the largest micro-batch that fits and divides the per-replica batch; "check" keeps
    the batch (config.micro_batch, or the whole batch) and raises `OutOfMemory`. SimCLR
    is never accumulated (its negatives would shrink to the micro-batch). `advise(micro,
    batch)` words the fix (default: the flags of a new run).

    Raises:
        OutOfMemory: the batch does not fit and may not be accumulated, or not even
            two images per replica fit.
    """
    per_replica = config.batch_size // replicas
    input_batch_bytes = config.batch_size // replicas * local_replicas * 2 * config.image_size**2 * 3
    started = time.perf_counter()
    if estimate is None:
        model = _probe_model(config)
        on_gpu = bool(tf.config.list_physical_devices("GPU"))
        bound = upper_bound(model, per_replica) * (1 if on_gpu else local_replicas)
        available, _ = _available(on_gpu, input_batch_bytes)
        if available == float("inf"):
            return config.micro_batch, "memory: not checked: the GPU's memory is unknown (nvidia-smi was not found)"
        wanted_images = (config.micro_batch or config.batch_size) // replicas
        if bound <= BOUND_SHARE * available and wanted_images == per_replica:
            del model
            return config.micro_batch, (
                f"memory: a step at {per_replica} images per replica needs at most {bound / GIB:.1f} GiB (counted "
                f"from the model's layers), {available / GIB:.1f} GiB free for it; it fits"
            )
        estimate = measure(config, per_replica, input_batch_bytes, model)
        del model  # the last reference to the copy
        release_free_memory()
    seconds = time.perf_counter() - started
    host = estimate.device == "host"
    # A CPU's replicas share the host's memory; each GPU has its own.
    share = local_replicas if host else 1
    wanted = (config.micro_batch or config.batch_size) // replicas
    where = "this machine" if host else f"one {estimate.device}"
    measured = ", ".join(f"{p / GIB:.2f} GiB at {b}" for b, p in estimate.probed)
    line = (
        f"memory: a step at {per_replica} images per replica needs ~{estimate.needed(per_replica * share) / GIB:.1f} "
        f"GiB on {where}, {estimate.available / GIB:.1f} GiB free for it (measured: {measured} images per replica"
        f"{'; room for the input pipeline kept' if host else ''}; {seconds:.0f} s)"
    )
    whole = estimate.largest() // share  # images per replica a whole-batch step holds
    micro_most = estimate.largest(accumulating=True) // share  # ... and an accumulating step
    if wanted == per_replica and wanted <= whole:
        return config.micro_batch, line + "; it fits"
    if wanted < per_replica and wanted <= micro_most:
        return config.micro_batch, line + f"; micro-batch {config.micro_batch} fits"
    fitting = [m for m in range(min(micro_most, per_replica - 1), 1, -1) if per_replica % m == 0]
    if config.fit_memory == "accumulate" and config.method == "simsiam" and fitting:
        micro = fitting[0] * replicas
        return micro, line + (
            f"; training with micro-batch {micro} ({fitting[0]} per replica), accumulating the gradients of "
            f"{config.batch_size // micro} micro-batches per step: the update of global batch {config.batch_size} "
            "(--micro-batch; docs/gpu.md)"
        )
    if whole < 2 and not fitting:
        raise OutOfMemory(
            f"{line}; not even 2 images per replica fit: use a smaller --image-size or --width, or a machine with "
            "more memory"
        )
    best = fitting[0] * replicas if fitting else 0
    advise = advise or (lambda micro, batch: (f"use --micro-batch {micro}, or " if micro else "use ") + f"--batch-size {batch}")
    if config.method != "simsiam":
        advise = lambda micro, batch: f"use --batch-size {batch}"  # noqa: E731 (SimCLR: no accumulation)
    raise OutOfMemory(
        f"{line}; at most {max(whole, 2) * replicas} images (global) fit in one step: "
        f"{advise(best, max(whole, 2) * replicas)} (--micro-batch keeps the global batch {config.batch_size} and "
        "accumulates its gradients)"
    )
