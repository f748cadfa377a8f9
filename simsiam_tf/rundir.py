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

from simsiam_tf.config import TrainConfig, UsageError, load_config

LAST_DIR = os.path.join("checkpoints", "last")
BEST_DIR = os.path.join("checkpoints", "best")
WEIGHTS_FILE = "model.weights.h5"
RUNTIME_KEYS = ("data_service", "data_service_grace")


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


def resolve_resume(logdir: str, explicit: dict) -> TrainConfig:
    """The config of the run in `logdir`; explicitly given flags must agree with it."""
    check_logdir(logdir, resume=True)
    config = load_config(os.path.join(logdir, "config.json"))
    # Where the input comes from may change between launches (a dispatcher restarted on
    # another host); what is trained may not.
    runtime = {k: explicit.pop(k) for k in RUNTIME_KEYS if k in explicit}
    saved = config.to_dict()
    clashes = [f"{k}={v!r} (the run has {saved[k]!r})" for k, v in explicit.items() if saved.get(k) != v]
    if clashes:
        raise UsageError(
            "--resume keeps the run's configuration, but these flags differ: "
            + "; ".join(clashes)
            + ". Drop them, or start a new run"
        )
    return config.replace(**runtime)


def tf_config_is_chief() -> bool:
    """Whether TF_CONFIG (if any) makes this process the chief: the one that writes the run.

    The chief is the task of type "chief", or worker 0 when the cluster has no chief.
    Without TF_CONFIG there is one process, and it is the chief.
    """
    try:
        tf_config = json.loads(os.environ.get("TF_CONFIG") or "{}")
    except json.JSONDecodeError:
        return True  # make_strategy reports the bad TF_CONFIG
    task = tf_config.get("task", {})
    if "chief" in tf_config.get("cluster", {}):
        return task.get("type") == "chief"
    return task.get("type", "worker") == "worker" and int(task.get("index", 0)) == 0

