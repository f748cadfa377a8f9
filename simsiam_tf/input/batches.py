"""The batch format every training input produces, and how a worker's batches become
the strategy's dataset.

A training batch is one tensor, **uint8 [B, 2, S, S, 3]**: the two views of each image,
`batch[:, 0]` and `batch[:, 1]`, in pixel values 0-255, not normalised. With
`--augment-on host` the views are fully augmented; with `device` they are only the
crops, and `train_step` augments them on each replica (`augment.ViewAugment`). Which of
the two is the run's setting, not something read off the batch.

Why this tensor: uint8 is a quarter of float32's bytes through the input pipeline, the
tf.data service's wire and the host-to-device copy, and normalisation is one fused op on
the device; and the views an image's map makes ([2, S, S, 3]) batch into it without a
copy (stacking them on the channel axis instead cost a fifth of the streamed rate at
224 px). Under MultiWorkerMirroredStrategy the same batch travels as int32 (Keras's
fit() reduces a peeked batch with `strategy.reduce`, whose collectives take no uint8);
`unpack` reads both.
"""

from __future__ import annotations

import tensorflow as tf


def pack(views: tf.Tensor) -> tf.Tensor:
    """A batch of views, uint8 [B, 2, S, S, 3] (what a batch of `decode.view_stage`'s
    views is), as the batch format: the same tensor, its shape checked."""
    return tf.ensure_shape(views, [None, 2, None, None, 3])


def unpack(batch: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    """A batch (uint8, or int32 under MultiWorkerMirroredStrategy) -> (x1, x2), uint8
    [B, S, S, 3] each."""
    batch = tf.cast(batch, tf.uint8)
    return batch[:, 0], batch[:, 1]


def distribute(strategy: tf.distribute.Strategy, global_batch: int, make) -> tf.data.Dataset:
    """The input for `strategy`, from `make(worker, workers, local_batch)`, a function
    returning one worker's dataset of batches of `local_batch` (its share of each
    global batch).

    Single-worker strategies get `make(0, 1, global_batch)` (Keras splits each global
    batch over the local replicas). Under MultiWorkerMirroredStrategy each worker builds
    only its own share, so no worker reads, decodes or augments another's images.
    """
    if not isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
        return make(0, 1, global_batch)

    def worker_dataset(ctx: tf.distribute.InputContext):
        local = global_batch // ctx.num_input_pipelines
        ds = make(ctx.input_pipeline_id, ctx.num_input_pipelines, local)
        per_replica = ctx.get_per_replica_batch_size(global_batch)
        if per_replica != local:  # several replicas per worker
            ds = ds.unbatch().batch(per_replica, drop_remainder=True)
        return ds.map(lambda batch: tf.cast(batch, tf.int32))

    return strategy.distribute_datasets_from_function(worker_dataset)
