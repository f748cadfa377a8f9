"""Distribution strategies for `--strategy default|mirrored|multi_worker|tpu`.

`make_strategy` must run before TensorFlow executes anything: splitting the CPU into
logical devices (for MirroredStrategy without GPUs) and MultiWorkerMirroredStrategy both
need an uninitialised runtime.
"""

from __future__ import annotations

import os
import sys

import tensorflow as tf

from simsiam_tf.config import UsageError


def split_cpu(replicas: int) -> list[str]:
    """Make `replicas` logical CPU devices and return their names.

    Used to run MirroredStrategy on a machine without GPUs, as the tests do.
    """
    cpu = tf.config.list_physical_devices("CPU")[0]
    configured = tf.config.get_logical_device_configuration(cpu)
    if configured is None or len(configured) != replicas:
        try:
            tf.config.set_logical_device_configuration(
                cpu, [tf.config.LogicalDeviceConfiguration() for _ in range(replicas)]
            )
        except RuntimeError:
            raise UsageError(
                f"cannot split the CPU into {replicas} devices: TensorFlow is already "
                "running; create the strategy before anything else"
            )
    return [f"/cpu:{i}" for i in range(replicas)]


def cpu_flags() -> set[str]:
    """The CPU's instruction-set flags from /proc/cpuinfo (empty where it is not readable)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def onednn_state() -> tuple[bool | None, str]:
    """Whether TensorFlow runs its oneDNN kernels in this process, and a line saying so.

    simsiam_tf switches them on before TensorFlow is imported (simsiam_tf/__init__.py);
    they stay off if TensorFlow was imported first or TF_ENABLE_ONEDNN_OPTS=0 is set.
    None where TensorFlow cannot say (the query is not public API).
    """
    try:
        from tensorflow.python.util import _pywrap_util_port

        enabled = bool(_pywrap_util_port.IsMklEnabled())
    except (ImportError, AttributeError):
        return None, "kernels: unknown (this TensorFlow does not report whether oneDNN is on)"
    setting = os.environ.get("TF_ENABLE_ONEDNN_OPTS")
    if enabled:
        return True, f"kernels: oneDNN (TF_ENABLE_ONEDNN_OPTS={setting})"
    why = "TF_ENABLE_ONEDNN_OPTS=0" if setting == "0" else "tensorflow was imported before simsiam_tf"
    return False, (
        f"kernels: TensorFlow's own, oneDNN off ({why}); on x86 CPUs without AVX512_VNNI the "
        "training step runs about 1.5x slower (docs/performance.md)"
    )


def resolve_precision(precision: str, strategy: tf.distribute.Strategy) -> tuple[str, str]:
    """`--precision auto` made concrete: (float32, bfloat16 or float16, the reason).

    bfloat16 where the hardware computes it natively: TPUs, GPUs of compute capability
    8.0 or newer (A100, H100, RTX 30xx and later), and CPUs with AVX512-BF16 or AMX.
    On a 2-core AMD EPYC, AVX512-BF16 (2026-11-28) it trained the CIFAR ResNet-18
    1.35x faster, and whole digits runs end with the same kNN and linear probe within their
    run-to-run spread (docs/performance.md). float16 (with loss scaling) on GPUs of
    compute capability 7.x (V100, T4), whose tensor cores have float16 but not
    bfloat16. Elsewhere (older GPUs, CPUs without native bfloat16) float32, which
    such hardware runs faster than emulated 16-bit types. With GPUs of several
    capabilities the oldest decides. train.py's default.
    """
    if precision != "auto":
        return precision, "--precision " + precision
    if isinstance(strategy, tf.distribute.TPUStrategy):
        return "bfloat16", "auto: TPU"
    gpus = tf.config.list_physical_devices("GPU")
    if gpus:
        capabilities = [tf.config.experimental.get_device_details(g).get("compute_capability", (0, 0)) for g in gpus]
        oldest = min(tuple(c) for c in capabilities)
        if oldest >= (8, 0):
            return "bfloat16", f"auto: GPU compute capability {oldest}"
        if oldest >= (7, 0):
            return "float16", f"auto: GPU compute capability {oldest}: float16 tensor cores, no bfloat16"
        return "float32", f"auto: GPU compute capability {oldest} < 7.0"
    native = sorted(cpu_flags() & {"avx512_bf16", "amx_bf16"})
    if native:
        return "bfloat16", "auto: CPU with " + ", ".join(native)
    return "float32", "auto: no native bfloat16 on this CPU"


def resolve_xla(xla: str, strategy: tf.distribute.Strategy) -> tuple[str, str]:
    """`--xla auto` made concrete: ("on" or "off", the reason).

    On for GPUs and TPUs; off on CPUs, where TensorFlow's oneDNN kernels beat the code
    XLA generates: the ResNet-18 step ran 35-40% slower with XLA on this project's
    2-core EPYC (docs/performance.md, section 2). train.py's default.
    """
    if xla != "auto":
        return xla, "--xla " + xla
    if isinstance(strategy, tf.distribute.TPUStrategy):
        return "on", "auto: TPU"
    if tf.config.list_physical_devices("GPU"):
        return "on", "auto: GPU"
    return "off", "auto: CPU, where the step runs slower under XLA (docs/performance.md)"


def make_strategy(name: str, cpu_replicas: int = 1) -> tf.distribute.Strategy:
    """The tf.distribute strategy for `--strategy`.

    mirrored: all local GPUs; without GPUs, `cpu_replicas` logical CPU devices.
    multi_worker: MultiWorkerMirroredStrategy configured from the TF_CONFIG variable.
    tpu: TPUStrategy on the TPU found by TPUClusterResolver.
    """
    if cpu_replicas > 1 and name != "mirrored":
        raise UsageError("--cpu-replicas only applies to --strategy mirrored")
    if name == "default":
        return tf.distribute.get_strategy()
    if name == "mirrored":
        if tf.config.list_physical_devices("GPU"):
            return tf.distribute.MirroredStrategy()
        devices = split_cpu(cpu_replicas) if cpu_replicas > 1 else ["/cpu:0"]
        if cpu_replicas == 1:
            print(
                "note: no GPU found; MirroredStrategy runs on one CPU replica "
                "(--cpu-replicas N splits the CPU into N replicas)",
                file=sys.stderr,
            )
        return tf.distribute.MirroredStrategy(devices)
    if name == "multi_worker":
        from simsiam_tf.rundir import parse_tf_config

        parse_tf_config()  # one line naming what is wrong, before TensorFlow reads it
        return tf.distribute.MultiWorkerMirroredStrategy()
    if name == "tpu":
        try:
            resolver = tf.distribute.cluster_resolver.TPUClusterResolver()
            tf.config.experimental_connect_to_cluster(resolver)
            tf.tpu.experimental.initialize_tpu_system(resolver)
        except (ValueError, RuntimeError, tf.errors.OpError) as e:
            raise UsageError(f"--strategy tpu: no TPU found ({str(e).splitlines()[0][:160]})")
        return tf.distribute.TPUStrategy(resolver)
    raise UsageError(f"--strategy {name!r}: choose default, mirrored, multi_worker or tpu")


def is_chief(strategy: tf.distribute.Strategy) -> bool:
    """Whether this process writes the run's shared files (logs, summary, best checkpoint)."""
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or not getattr(resolver, "task_type", None):
        return True
    cluster = resolver.cluster_spec().as_dict()
    if "chief" in cluster:
        return resolver.task_type == "chief"
    return resolver.task_type == "worker" and resolver.task_id == 0


def num_workers(strategy: tf.distribute.Strategy) -> int:
    """Input pipelines (hosts) of `strategy`: the cluster's workers and chief, else 1."""
    if not isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
        return 1
    cluster = strategy.cluster_resolver.cluster_spec().as_dict()
    return max(1, len(cluster.get("chief", [])) + len(cluster.get("worker", [])))


def worker_id(strategy: tf.distribute.Strategy) -> str:
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or not getattr(resolver, "task_type", None):
        return "0"
    return f"{resolver.task_type}{resolver.task_id}"
