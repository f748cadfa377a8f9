"""The fixed probe set and the per-epoch representation diagnostics.

A probe set is a fixed subset of the training images (independent of `--seed`), each
seen through the same V augmented views at every evaluation: the views come from the
training augmentation with stateless seeds derived from (seed, view, batch), so
differences between epochs are differences of the network, not of the sample. The
network runs in inference mode (BatchNorm moving statistics), like the kNN monitor.

`DiagnosticsCallback` computes `metrics.all_metrics` on the probe set every
`config.diag_every` epochs (and after the last one), logs the scalars to TensorBoard
under `diagnostics/*`, and appends one JSON object per evaluation to
`RUN/diagnostics.jsonl` (see `read_records`).
"""

from __future__ import annotations

import json
import math
import os
import time

import keras
import numpy as np
import tensorflow as tf

from simsiam_tf import augment as aug
from simsiam_tf.input.catalog import subset
from simsiam_tf.diagnostics import metrics

RECORDS_FILE = "diagnostics.jsonl"
# Scalars logged to TensorBoard as diagnostics/<key>.
SCALARS = (
    "z_std",
    "z_std_reference",
    "effective_rank",
    "between_rank",
    "between_rank_split",
    "shard_ratio",
    "within_trace",
    "within_log_volume",
    "within_log_volume_gap",
    "predictor_cosine",
    "predictor_identity_cosine",
    "bandwidth",
    "alignment",
    "uniformity",
    "seconds",
)


class ProbeSet:
    """Fixed images, each seen through the same `num_views` augmented views every time.

    Args:
        images: uint8 [N, S, S, 3], the probe images (see `probe_images`).
        num_views: V >= 2 views per image.
        image_size: the model's input size.
        seed: base of the views' stateless seeds; equal seeds give equal views.
        batch_size: images per forward pass.
    """

    def __init__(self, images: np.ndarray, num_views: int, image_size: int, seed: int = 0, batch_size: int = 256):
        if num_views < 2:
            raise ValueError(f"a probe set needs at least 2 views per image, got {num_views}")
        self.images = images
        self.num_views = num_views
        self.image_size = image_size
        self.seed = seed
        self.batch_size = batch_size
        self._augment = aug.SimSiamAugment(aug.AugmentSpec.for_image_size(image_size))
        self._forward = {}

    def _forward_fn(self, model):
        """One traced function per model: uint8 images and a seed -> (z, p), float32."""
        if id(model) not in self._forward:
            predictor = getattr(model, "predictor", None)

            @tf.function(
                input_signature=[
                    tf.TensorSpec([None, None, None, 3], tf.uint8),
                    tf.TensorSpec([2], tf.int64),
                ]
            )
            def forward(images, seed):
                views = self._augment(images, seed=seed)
                z = model.projector(model.backbone(views, training=False), training=False)
                if predictor is None:  # SimCLR: no predictor; p stands in as z, then dropped
                    return tf.cast(z, tf.float32), tf.cast(z, tf.float32)
                return tf.cast(z, tf.float32), tf.cast(predictor(z, training=False), tf.float32)

            self._forward[id(model)] = forward
        return self._forward[id(model)]

    def embed(self, model) -> tuple[np.ndarray, np.ndarray]:
        """Projections z and predictions p of every view: float32 [N, V, D] each.

        `model` needs `.backbone` and `.projector`; p is None for a model without
        `.predictor` (SimCLR).
        """
        forward = self._forward_fn(model)
        zs, ps = [], []
        for view in range(self.num_views):
            z_view, p_view = [], []
            for batch, start in enumerate(range(0, len(self.images), self.batch_size)):
                seed = tf.constant([self.seed, view * 1_000_000 + batch], tf.int64)
                z, p = forward(tf.constant(self.images[start : start + self.batch_size]), seed)
                z_view.append(z.numpy())
                p_view.append(p.numpy())
            zs.append(np.concatenate(z_view))
            ps.append(np.concatenate(p_view))
        has_predictor = getattr(model, "predictor", None) is not None
        return np.stack(zs, axis=1), np.stack(ps, axis=1) if has_predictor else None

    def evaluate(self, model) -> dict:
        """`metrics.all_metrics` of the model on this probe set, plus `seconds` taken."""
        started = time.time()
        z, p = self.embed(model)
        result = metrics.all_metrics(z, p)
        result["seconds"] = time.time() - started
        return result


def tensorboard_layout():
    """A TensorBoard custom-scalars layout that overlays related curves in one chart.

    z_std on the probe set, in the training batches and the 1/sqrt(d) reference;
    the effective rank of f̄ beside its noise-corrected version; the predictor's cosine
    to ĥ* beside the identity predictor's; the within-image volume (log-volume and its
    gap to mixed groups); alignment and uniformity. Shown under TensorBoard's "Custom
    Scalars" tab.
    """
    from tensorboard.plugins.custom_scalar import layout_pb2
    from tensorboard.plugins.custom_scalar import summary as custom_scalar

    def chart(title, *tags):
        return layout_pb2.Chart(title=title, multiline=layout_pb2.MultilineChartContent(tag=list(tags)))

    category = layout_pb2.Category(
        title="Representation (SimSiam or SimCLR)",
        chart=[
            chart("z_std against 1/sqrt(d)", r"^diagnostics/z_std$", r"^diagnostics/z_std_reference$", r"^epoch/z_std$"),
            chart("effective rank of f̄ and noise-corrected", r"^diagnostics/effective_rank$", r"^diagnostics/between_rank$"),
            chart(
                "shard ratio and predictor optimality",
                r"^diagnostics/shard_ratio$", r"^diagnostics/predictor_cosine$", r"^diagnostics/predictor_identity_cosine$",
            ),
            chart(
                "within-image volume: log-volume and its gap to mixed groups",
                r"^diagnostics/within_log_volume$", r"^diagnostics/within_log_volume_gap$",
            ),
            chart("alignment and uniformity", r"^diagnostics/alignment$", r"^diagnostics/uniformity$"),
        ],
    )
    return custom_scalar.pb(layout_pb2.Layout(category=[category]))


def probe_images(images: np.ndarray, num_images: int) -> np.ndarray:
    """The probe subset of `images`: a fixed random `num_images` of them (all if fewer)."""
    return images[subset(len(images), num_images)]


def _json_ready(record: dict) -> dict:
    """NaN and infinities become null (strict JSON); floats keep 6 significant digits."""

    def clean(v):
        if isinstance(v, float):
            return None if not math.isfinite(v) else float(f"{v:.6g}")
        if isinstance(v, list):
            return [clean(x) for x in v]
        return v

    return {k: clean(v) for k, v in record.items()}


def read_records(run_dir: str) -> list[dict]:
    """The diagnostics records of a run, in order; [] if it has none.

    A last line cut short by a crash is skipped.
    """
    path = os.path.join(run_dir, RECORDS_FILE)
    if not os.path.exists(path):
        return []
    records = []
    with open(path) as f:
        for line in f:
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return records


class DiagnosticsCallback(keras.callbacks.Callback):
    """Representation diagnostics on a fixed probe set every `config.diag_every` epochs.

    Each evaluation appends to RUN/diagnostics.jsonl one object with `epoch`, `step`,
    every key of `metrics.all_metrics` (including the singular-value spectrum of the
    mean representations), `seconds` (this evaluation), and `wall_seconds` and
    `diag_seconds_total` (since this process started training), so the share of time
    spent on diagnostics is `diag_seconds_total / wall_seconds`. TensorBoard gets the
    scalars in `SCALARS` as diagnostics/<key> at the global step of the epoch's end.

    On resume (`initial_epoch` > 0), records after `initial_epoch` are dropped first:
    the run continues from its last complete checkpoint.
    """

    def __init__(
        self,
        logdir: str,
        config,
        images: np.ndarray,
        steps_per_epoch: int,
        initial_epoch: int = 0,
        is_chief: bool = True,
    ):
        super().__init__()
        self.logdir = logdir
        self.config = config
        self.every = config.diag_every
        self.steps_per_epoch = steps_per_epoch
        self.initial_epoch = initial_epoch
        self.is_chief = is_chief
        self.probe = ProbeSet(
            probe_images(images, config.diag_images), config.diag_views, config.image_size, config.seed
        )
        self.path = os.path.join(logdir, RECORDS_FILE)
        self.writer = None

    def on_train_begin(self, logs=None):
        self._started = time.time()
        self._diag_total = 0.0
        if not self.is_chief:
            return
        self.writer = tf.summary.create_file_writer(os.path.join(self.logdir, "tb"))
        with self.writer.as_default():
            tf.summary.experimental.write_raw_pb(tensorboard_layout().SerializeToString(), step=0)
        kept = [r for r in read_records(self.logdir) if r.get("epoch", 0) <= self.initial_epoch]
        if kept or os.path.exists(self.path):
            tmp = self.path + ".tmp"
            with open(tmp, "w") as f:
                f.writelines(json.dumps(r) + "\n" for r in kept)
            os.replace(tmp, self.path)

    def on_epoch_end(self, epoch, logs=None):
        done = epoch + 1
        if not self.is_chief or not (done % self.every == 0 or done == self.config.epochs):
            return
        if getattr(self.model, "diverged", None):
            return  # NaN weights: nothing to measure, and the run stops here
        result = self.probe.evaluate(self.model)
        self._diag_total += result["seconds"]
        step = done * self.steps_per_epoch
        record = {
            "epoch": done,
            "step": step,
            **result,
            "wall_seconds": time.time() - self._started,
            "diag_seconds_total": self._diag_total,
        }
        with open(self.path, "a") as f:
            f.write(json.dumps(_json_ready(record)) + "\n")
        with self.writer.as_default():
            for key in SCALARS:
                if record[key] is not None:  # the predictor's, for a model without one
                    tf.summary.scalar(f"diagnostics/{key}", float(record[key]), step=step)
        self.writer.flush()
        print(
            f"\nepoch {done} diagnostics: z_std {record['z_std']:.4f} (1/sqrt(d) "
            f"{record['z_std_reference']:.4f}), effective rank {record['effective_rank']:.1f}, "
            f"shard ratio {record['shard_ratio']:.3f}, within-image log-volume "
            f"{record['within_log_volume']:.2f} (gap {record['within_log_volume_gap']:+.2f}), "
            + (
                "no predictor (SimCLR)"
                if record["predictor_cosine"] is None
                else f"predictor cos {record['predictor_cosine']:.3f} (identity {record['predictor_identity_cosine']:.3f})"
            )
            + f"; {record['seconds']:.1f} s",
            flush=True,
        )

    def on_train_end(self, logs=None):
        if self.writer is not None:
            self.writer.flush()
