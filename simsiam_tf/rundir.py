"""The run directory: what a run writes where, and the checks made before writing.

    config.json                      the resolved TrainConfig
    summary.json                     rewritten after every epoch
    tb/                              TensorBoard events
    checkpoints/last/                Keras BackupAndRestore: latest.weights.h5 (model and
                                     optimizer) and training_metadata.json (epoch)
    checkpoints/best/                model.weights.h5 and info.json: best kNN top-1

This module does not import TensorFlow, so bad command lines fail fast.
"""

from __future__ import annotations

import json
import os
import re

from simsiam_tf.config import TrainConfig, UsageError, load_config, validate

LAST_DIR = os.path.join("checkpoints", "last")
BEST_DIR = os.path.join("checkpoints", "best")
WEIGHTS_FILE = "model.weights.h5"
RUNTIME_KEYS = ("data_service", "data_service_grace", "fit_memory")
# What `--resume` may change, recorded in config.json's `resume_changes`: the learning
# rate (the advice after a divergence), the global batch and the micro-batch (the
# advice after running out of memory), for which the cosine schedule continues at the
# same epoch with the new values; and XLA, which changes how the step is compiled, not
# what it computes (the checkpoint is the same either way; with --augment-on device,
# XLA draws the views' random parameters other than TensorFlow's kernels from the same
# seeds, so the views from the change on are other, equally distributed, draws); and
# the tf.data service's wire format (a network that changed), jpeg being lossy.
RESUMABLE_KEYS = {"base_lr": "--lr", "batch_size": "--batch-size", "micro_batch": "--micro-batch", "xla": "--xla",
                  "data_service_wire": "--data-service-wire"}
MULTI_WORKER_DOC = "see docs/multi_worker.md#tf_config"


def check_logdir(logdir: str, resume: bool) -> None:
    """Check the run directory before any work: free for a new run, or resumable.

    Nothing is created here, so a rejected command leaves nothing behind.
    """
    if resume:
        if not os.path.isfile(os.path.join(logdir, "config.json")):
            raise UsageError(
                f"--resume: {logdir!r} has no config.json; pass the directory of a run "
                "started by train.py (e.g. --resume runs/20261128-034500)"
            )
    elif os.path.isdir(logdir) and os.listdir(logdir):
        raise UsageError(
            f"--logdir {logdir!r} already holds files; pass --resume to continue that run "
            "or choose a new --logdir"
        )
    existing = os.path.abspath(logdir)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing) or not os.access(existing, os.W_OK | os.X_OK):
        raise UsageError(f"--logdir {logdir!r} cannot be written ({existing!r} is not a writable directory)")


def completed_epochs(backup_dir: str) -> int:
    """Epochs finished according to a BackupAndRestore directory (`LAST_DIR` of a run,
    or a worker's own copy); 0 when it holds none or cannot be read."""
    try:
        with open(os.path.join(backup_dir, "training_metadata.json")) as f:
            return int(json.load(f)["epoch"])
    except (OSError, ValueError, KeyError, TypeError):
        return 0


def resolve_resume(logdir: str, explicit: dict, announce=print) -> TrainConfig:
    """The config of the run in `logdir`; explicitly given flags must agree with it,
    except those of RESUMABLE_KEYS, whose change is recorded and announced."""
    check_logdir(logdir, resume=True)
    config = load_config(os.path.join(logdir, "config.json"))
    # Where the input comes from may change between launches (a dispatcher restarted on
    # another host); what is trained may not.
    runtime = {k: explicit.pop(k) for k in RUNTIME_KEYS if k in explicit}
    saved = config.to_dict()
    changed = {k: explicit.pop(k) for k in RESUMABLE_KEYS if k in explicit and saved[k] != explicit[k]}
    clashes = [f"{k}={v!r} (the run has {saved[k]!r})" for k, v in explicit.items() if saved.get(k) != v]
    if clashes:
        raise UsageError(
            "--resume keeps the run's configuration, but these flags differ: "
            + "; ".join(clashes)
            + ". Drop them, or start a new run (only "
            + ", ".join(list(RESUMABLE_KEYS.values())[:-1]) + " and " + list(RESUMABLE_KEYS.values())[-1]
            + " may change on --resume)"
        )
    config = config.replace(**runtime)
    if not changed:
        return config
    start = completed_epochs(os.path.join(logdir, LAST_DIR)) + 1
    record = {"from_epoch": start, **{k: {"from": saved[k], "to": v} for k, v in changed.items()}}
    config = config.replace(**changed, resume_changes=(*config.resume_changes, record))
    validate(config)
    shown = lambda value: f"{value:g}" if isinstance(value, (int, float)) else str(value)
    said = ", ".join(f"{RESUMABLE_KEYS[k]} {shown(saved[k])} -> {shown(v)}" for k, v in changed.items())
    schedule = (
        f" (initial lr {config.lr:g}; the cosine schedule continues at epoch {start})"
        if {"base_lr", "batch_size"} & set(changed) else ""
    )
    announce(
        f"note: from epoch {start} on, {said}{schedule}; config.json records the change in resume_changes",
        flush=True,
    )
    return config


def continue_command(logdir: str, **flags) -> str:
    """The command line that continues the run in `logdir`, with `flags` (--lr ...)."""
    import shlex

    words = ["python", "train.py", "--resume", logdir]
    for key, value in flags.items():
        words += ["--" + key.replace("_", "-"), f"{value:g}" if isinstance(value, float) else str(value)]
    return shlex.join(words)


_ADDRESS = re.compile(r"(\[[0-9A-Fa-f:.]+\]|[^\s:/\[\]]+):(\d{1,5})")
_EXAMPLE = '{"cluster": {"worker": ["host1:12345", "host2:12345"]}, "task": {"type": "worker", "index": 0}}'


def parse_tf_config(raw: str | None = None) -> dict:
    """TF_CONFIG (from the environment unless given), checked for what
    MultiWorkerMirroredStrategy needs: a cluster of `chief` (at most one) and `worker`
    lists of host:port, and this process's task among them.

    Raises:
        UsageError: unset, not JSON, or not that structure; the message points to
            docs/multi_worker.md.
    """
    raw = os.environ.get("TF_CONFIG") if raw is None else raw

    def bad(problem: str) -> UsageError:
        return UsageError(f"TF_CONFIG {problem}; expected e.g. {_EXAMPLE} ({MULTI_WORKER_DOC})")

    if not raw:
        raise UsageError(f"--strategy multi_worker needs the TF_CONFIG environment variable, e.g. {_EXAMPLE} ({MULTI_WORKER_DOC})")
    try:
        tf_config = json.loads(raw)
    except json.JSONDecodeError as e:
        raise bad(f"is not valid JSON ({e})")
    if not isinstance(tf_config, dict):
        raise bad(f"must be a JSON object, got {type(tf_config).__name__}")
    cluster, task = tf_config.get("cluster"), tf_config.get("task")
    if not isinstance(cluster, dict) or not cluster:
        raise bad('has no "cluster" object listing the workers')
    unknown = sorted(set(cluster) - {"chief", "worker"})
    if unknown:
        raise bad(f'cluster has job(s) {", ".join(map(repr, unknown))}: MultiWorkerMirroredStrategy uses only "chief" and "worker"')
    for job, addresses in cluster.items():
        if not isinstance(addresses, list) or not addresses:
            raise bad(f'cluster "{job}" must be a non-empty list of "host:port" strings')
        for address in addresses:
            match = _ADDRESS.fullmatch(address) if isinstance(address, str) else None
            if not match or not 0 < int(match.group(2)) < 65536:
                raise bad(f'cluster "{job}" holds {address!r}, not "host:port" with a port in 1-65535')
    if len(cluster.get("chief", [])) > 1:
        raise bad(f'cluster "chief" lists {len(cluster["chief"])} addresses; there is at most one chief')
    if not isinstance(task, dict):
        raise bad('has no "task" object saying which of the cluster\'s tasks this process is')
    kind, index = task.get("type"), task.get("index")
    if kind not in cluster:
        raise bad(f'task "type" is {kind!r}, not one of the cluster\'s jobs ({", ".join(cluster)})')
    if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < len(cluster[kind]):
        raise bad(f'task "index" is {index!r}; cluster "{kind}" has {len(cluster[kind])} address(es), so 0-{len(cluster[kind]) - 1}')
    return tf_config


def tf_config_is_chief() -> bool:
    """Whether TF_CONFIG makes this process the chief: the one that writes the run.

    The chief is the task of type "chief", or worker 0 when the cluster has no chief.

    Raises:
        UsageError: TF_CONFIG unset or invalid (`parse_tf_config`).
    """
    tf_config = parse_tf_config()
    task = tf_config["task"]
    if "chief" in tf_config["cluster"]:
        return task["type"] == "chief"
    return task["index"] == 0
