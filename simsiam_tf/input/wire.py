"""What the tf.data service sends from its workers to a trainer: the wire format.

A batch leaves a worker in the batch format (`batches`: uint8 [B, 2, S, S, 3]) and
must reach the trainer's `train_step` in it. Between the two it crosses the network,
whose bandwidth is a budget of its own (docs/multi_worker.md measures it):

- `uint8`: the batch format as it is, uncompressed: 2 x S x S x 3 bytes per pair
  (301 KB at 224 px). Costs no CPU on either side.
- `snappy`: the same bytes, compressed by the service itself
  (`register_dataset(compression="AUTO")`, which is snappy: the worker compresses,
  the trainer's reader decompresses).
- `jpeg`: each view encoded as a JPEG at JPEG_QUALITY on the worker and decoded on
  the trainer (`unpack`), after which the batch is in the batch format again. Lossy:
  a view differs from the uint8 one by the JPEG error (tests/test_wire.py bounds it).

The format is the trainer's choice (`--data-service-wire`, its choices
`config.WIRES`): it is part of the pipeline the trainer registers, so the workers need
no flag.
"""

from __future__ import annotations

import tensorflow as tf

JPEG_QUALITY = 90  # libjpeg's scale, 4:2:0 chroma


def compression(wire: str):
    """The `compression` argument of `register_dataset` for `wire`."""
    return "AUTO" if wire == "snappy" else None


def pack(views: tf.Tensor, wire: str) -> tf.Tensor:
    """A batch in the batch format (uint8 [B, 2, S, S, 3]) as it is sent: unchanged, or
    with `jpeg` a string tensor [B, 2] of encoded views. Runs on the service worker."""
    if wire != "jpeg":
        return views
    shape = tf.shape(views)
    flat = tf.reshape(views, tf.concat([[-1], shape[2:]], 0))
    encoded = tf.map_fn(
        lambda view: tf.io.encode_jpeg(view, quality=JPEG_QUALITY),
        flat,
        fn_output_signature=tf.TensorSpec([], tf.string),
    )
    return tf.reshape(encoded, shape[:2])


def unpack(sent: tf.Tensor, wire: str, image_size: int) -> tf.Tensor:
    """What `pack` sent, back in the batch format. Runs in the trainer's reader."""
    if wire != "jpeg":
        return sent
    shape = tf.shape(sent)
    decoded = tf.map_fn(
        lambda data: tf.ensure_shape(tf.io.decode_jpeg(data, channels=3), [image_size, image_size, 3]),
        tf.reshape(sent, [-1]),
        fn_output_signature=tf.TensorSpec([image_size, image_size, 3], tf.uint8),
    )
    return tf.reshape(decoded, tf.concat([shape, [image_size, image_size, 3]], 0))
