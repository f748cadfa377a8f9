"""The batch format every training input produces, and how a worker's batches become
the strategy's dataset.

A training batch is one tensor, **uint8 [B, S, S, 6]**: the first view of each image in
channels 0-2, the second in 3-5, in pixel values 0-255, not normalised. With
`--augment-on host` the views are fully augmented; with `device` they are only the
crops, and `train_step` augments them on each replica (`augment.ViewAugment`). Which of
the two is the run's setting, not something read off the batch.

Why one uint8 tensor: a quarter of float32's bytes through the input pipeline, the
tf.data service's wire and the host-to-device copy; normalisation is one fused op on
the device. Under MultiWorkerMirroredStrategy the same batch travels as int32 (Keras's
fit() reduces a peeked batch with `strategy.reduce`, whose collectives take no uint8);
`unpack` reads both.
"""

from __future__ import annotations

import tensorflow as tf

CHANNELS = 6


def pack(views: tf.Tensor) -> tf.Tensor:
    """uint8 [..., 2, S, S, 3] views (as `decode.image_views` makes, batched) -> the
    batch format, uint8 [..., S, S, 6]."""
    return tf.concat([views[..., 0, :, :, :], views[..., 1, :, :, :]], axis=-1)


def unpack(batch: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    """A batch (uint8, or int32 under MultiWorkerMirroredStrategy) -> (x1, x2), uint8
    [B, S, S, 3] each."""
    batch = tf.cast(batch, tf.uint8)
    return batch[..., :3], batch[..., 3:]


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
