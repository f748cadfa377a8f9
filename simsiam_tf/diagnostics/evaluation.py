"""Evaluate an encoder on a labelled dataset: weighted kNN and a linear probe.

Two sources of the encoder, so that users can evaluate exactly what they serve:

- a run directory: the model rebuilt from config.json and its checkpoint (chosen by kNN
  on the validation split, or the last), features = backbone(eval_preprocess(images));
- an exported SavedModel version: its `serving_pixels` signature, which does its own
  preprocessing in the graph (the function TF Serving runs).

Both embed the dataset's uint8 images, then score kNN (k = 200, T = 0.1: the training
monitor's protocol, bank = train split, queries = test split) and `linear_probe`.
"""

from __future__ import annotations

import json
import os
import time
from typing import Callable

import numpy as np

from simsiam_tf.config import UsageError
from simsiam_tf.diagnostics import knn
from simsiam_tf.diagnostics.linear_probe import linear_probe

Embed = Callable[[np.ndarray], np.ndarray]
# What a run recorded about its data and its kNN monitor, which evaluation reuses: the
# same dataset, training subset, validation split held out, input, bank, k and T.
RUN_DATA_KEYS = ("dataset", "data_dir", "train_limit", "val_fraction", "input", "knn_train_limit", "knn_k",
                 "knn_temperature")
# What exports of older versions, which do not record them, are scored with.
OLD_EXPORT_DEFAULTS = (None, None, 0, 0.0, "auto", 0, 200, 0.1)


def run_encoder(run_dir: str, which: str = "best") -> tuple[Embed, dict]:
    """The backbone of a run as an embedding function, and a description of it."""
    from simsiam_tf.diagnostics.embed import FeatureExtractor
    from simsiam_tf.export import INIT, checkpoint_selection, load_run

    config, model, path = load_run(run_dir, which)
    extract = FeatureExtractor(model.backbone, config.image_size)
    info = {
        "kind": "run",
        "path": run_dir,
        "checkpoint": path,
        "selection": f"initial weights (seed {config.seed})" if path == INIT else checkpoint_selection(path),
        "image_size": config.image_size,
        **{key: getattr(config, key) for key in RUN_DATA_KEYS},
    }
    return extract, info


def calibrate_initial(embed, data, config) -> None:
    """Give a run's initial weights (`run_encoder(..., "init")`) BatchNorm statistics from
    its kNN bank, as the training monitor does before its "before training" kNN
    (`callbacks.KnnMonitor`), so that figure is reproduced."""
    from simsiam_tf.diagnostics.embed import calibrate_batchnorm

    calibrate_batchnorm(embed.backbone, data.eval_split("train", config.knn_train_limit), config.image_size)


def resolve_saved_model(path: str) -> str:
    """EXPORT_DIR/N as given, or the highest version N when given the base EXPORT_DIR."""
    if not os.path.isdir(path):
        raise UsageError(f"--saved-model {path!r} is not a directory")
    if os.path.exists(os.path.join(path, "saved_model.pb")):
        return path
    versions = [int(d) for d in os.listdir(path) if d.isdigit() and os.path.exists(os.path.join(path, d, "saved_model.pb"))]
    if not versions:
        raise UsageError(
            f"--saved-model {path!r} holds no saved_model.pb and no version directories; "
            "pass an export written by export.py, e.g. exports/simsiam/1"
        )
    return os.path.join(path, str(max(versions)))


def saved_model_encoder(path: str, batch_size: int = 256) -> tuple[Embed, dict]:
    """An exported SavedModel's `serving_pixels` signature as an embedding function."""
    import tensorflow as tf

    from simsiam_tf.export import METADATA_FILE

    path = resolve_saved_model(path)
    loaded = tf.saved_model.load(path)
    if "serving_pixels" not in loaded.signatures:
        raise UsageError(
            f"{path!r} has no serving_pixels signature (it has {', '.join(sorted(loaded.signatures)) or 'none'}); "
            "export it with this project's export.py"
        )
    serve = loaded.signatures["serving_pixels"]
    metadata = {}
    meta_path = os.path.join(path, METADATA_FILE)
    if os.path.exists(meta_path):
        with open(meta_path) as f:
            metadata = json.load(f)

    def embed(images: np.ndarray) -> np.ndarray:
        out = [
            serve(images=tf.constant(images[i : i + batch_size]))["embedding"].numpy()
            for i in range(0, len(images), batch_size)
        ]
        return np.concatenate(out)

    info = {
        "kind": "saved_model",
        "path": path,
        "output": metadata.get("output"),
        "source_checkpoint": metadata.get("source_checkpoint"),
        "source_selection": metadata.get("source_selection"),
        # Exports of older versions lack the later keys: the whole split then, as they did.
        **{key: metadata.get(key, default) for key, default in zip(RUN_DATA_KEYS, OLD_EXPORT_DEFAULTS)},
        # Images are loaded at the training size; the signature resizes any other size.
        "image_size": metadata.get("image_size", 32),
    }
    return embed, info


def _embed_split(embed: Embed, split) -> tuple[np.ndarray, np.ndarray]:
    features, labels = [], []
    for images, batch_labels in split.batches(256):
        features.append(embed(images))
        labels.append(batch_labels)
    return np.concatenate(features), np.concatenate(labels)


def evaluate(embed: Embed, data, k: int = 200, temperature: float = 0.1, bank_limit: int = 0) -> dict:
    """kNN and linear-probe top-1 of `embed` on the train and test splits of `data`, a
    training input (`input.contract.TrainingInput`), embedded batch by batch.

    The linear probe trains on the whole train split; the kNN bank is the train split
    too, or with `bank_limit` the fixed subset of it the training monitor uses
    (`--knn-bank-size`), so that a run's recorded kNN is reproduced exactly.

    Raises:
        UsageError: the dataset lacks labelled train and test splits.
    """
    from simsiam_tf.input import contract

    if not contract.can_monitor_knn(data):
        raise UsageError(
            f"{data.name} has no labelled test split; evaluation needs labelled train and test "
            "splits (for a folder: PATH/train/<class>/* and PATH/test/<class>/*)"
        )
    started = time.time()
    train_split, test_split = data.eval_split("train"), data.eval_split("test")
    train, train_labels = _embed_split(embed, train_split)
    test, test_labels = _embed_split(embed, test_split)
    bank, bank_labels = (train, train_labels) if not bank_limit else _embed_split(embed, data.eval_split("train", bank_limit))
    embed_seconds = time.time() - started
    num_classes = int(max(train_labels.max(), test_labels.max()) + 1)
    knn_top1 = knn.knn_accuracy(bank, bank_labels, test, test_labels, num_classes, k, temperature)
    probe_started = time.time()
    probe = linear_probe(train, train_labels, test, test_labels)
    return {
        "dataset": data.name,
        "train_images": int(len(train)),
        "test_images": int(len(test)),
        "input": data.kind,
        "undecodable": {"train": train_split.skipped, "test": test_split.skipped},
        "embedding_dim": int(train.shape[1]),
        "knn": {"top1": knn_top1, "k": k, "temperature": temperature, "bank_images": int(len(bank))},
        "linear_probe": probe,
        "embed_seconds": round(embed_seconds, 2),
        "linear_probe_seconds": round(time.time() - probe_started, 2),
    }
