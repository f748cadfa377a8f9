"""RandomResizedCrop at full resolution: crops sampled on the original image, decoded at
the crop.

The official recipe (facebookresearch/simsiam `main_simsiam.py`, torchvision) crops the
original image and then resizes the crop to the training size. The in-memory path keeps
every image at the training size and crops that (exact for 32 px CIFAR, whose
originals are 32 px). The streaming path does what the recipe says: the crop box is
drawn on each image's own height and width (`augment.sample_crop_boxes`, torchvision's
sampler), and only the box is decoded:

- JPEG: `tf.io.extract_jpeg_shape` reads the size from the header, then
  `tf.io.decode_and_crop_jpeg` decodes the box alone. When a crop is at least twice the
  training size on its shorter side, libjpeg decodes it at 1/2, 1/4 or 1/8 scale for
  almost nothing (`ratio`), so a crop is never shrunk by more than 2x afterwards.
- PNG, GIF, BMP: decoded whole, then cropped.

Each crop is then resized to S x S (bilinear, half-pixel centres). Both views of an
image come from one call, with boxes drawn independently.
"""

from __future__ import annotations

import tensorflow as tf

from simsiam_tf import augment as aug

# Larger images are refused (an error, which the streaming pipeline counts as a skipped
# file) rather than risk running out of memory on a decompression bomb.
MAX_PIXELS = 250_000_000
_RATIOS = (1, 2, 4, 8)


def _resize(crop: tf.Tensor, size: int) -> tf.Tensor:
    out = tf.image.resize(crop, (size, size), method="bilinear")
    return tf.cast(tf.clip_by_value(tf.round(out), 0.0, 255.0), tf.uint8)


def _check_size(height, width):
    tf.debugging.assert_less_equal(
        tf.cast(height, tf.int64) * tf.cast(width, tf.int64),
        tf.constant(MAX_PIXELS, tf.int64),
        message="image too large",
    )


def jpeg_ratio(box: tf.Tensor, size: int) -> tf.Tensor:
    """Index into (1, 2, 4, 8) of the largest scale whose decoded crop keeps >= `size`
    pixels on its shorter side."""
    shorter = tf.minimum(box[2], box[3])
    return (
        tf.cast(shorter >= 2 * size, tf.int32)
        + tf.cast(shorter >= 4 * size, tf.int32)
        + tf.cast(shorter >= 8 * size, tf.int32)
    )


def _decode_jpeg_box(raw: tf.Tensor, box: tf.Tensor, height, width, size: int) -> tf.Tensor:
    """One crop [top, left, h, w] of a JPEG, decoded at the right scale, resized to size."""

    def at(r):
        def decode():
            if r == 1:
                window = box
            else:
                # libjpeg's scaled image is ceil(H / r) x ceil(W / r); the window is
                # given in its coordinates.
                top, left = box[0] // r, box[1] // r
                h = tf.minimum(tf.maximum((box[2] + r - 1) // r, 1), (height + r - 1) // r - top)
                w = tf.minimum(tf.maximum((box[3] + r - 1) // r, 1), (width + r - 1) // r - left)
                window = tf.stack([top, left, h, w])
            crop = tf.io.decode_and_crop_jpeg(raw, window, channels=3, ratio=r)
            return _resize(crop, size)

        return decode

    return tf.switch_case(jpeg_ratio(box, size), [at(r) for r in _RATIOS])


def decode_crops(raw: tf.Tensor, seed: tf.Tensor, spec: aug.AugmentSpec, views: int = 2) -> tf.Tensor:
    """`views` random resized crops of one encoded image.

    Args:
        raw: tf.string scalar, JPEG/PNG/GIF/BMP bytes.
        seed: int64 [2], the stateless seed of the crop boxes.
        spec: the augmentation spec (image_size, crop_scale, crop_ratio).
    Returns:
        uint8 [views, S, S, 3].
    Raises (as a tf.errors.OpError when run): undecodable or too large images.
    """
    size = spec.image_size

    def boxes(height, width):
        return aug.sample_crop_boxes(seed, views, height, width, spec.crop_scale, spec.crop_ratio)

    def jpeg():
        shape = tf.io.extract_jpeg_shape(raw)
        _check_size(shape[0], shape[1])
        b = boxes(shape[0], shape[1])
        return tf.stack([_decode_jpeg_box(raw, b[v], shape[0], shape[1], size) for v in range(views)])

    def other():
        image = tf.io.decode_image(raw, channels=3, dtype=tf.uint8, expand_animations=False)
        image = tf.ensure_shape(image, [None, None, 3])
        shape = tf.shape(image)
        _check_size(shape[0], shape[1])
        b = boxes(shape[0], shape[1])
        return tf.stack(
            [_resize(image[b[v, 0] : b[v, 0] + b[v, 2], b[v, 1] : b[v, 1] + b[v, 3]], size) for v in range(views)]
        )

    out = tf.cond(tf.io.is_jpeg(raw), jpeg, other)
    return tf.ensure_shape(out, [views, size, size, 3])


def crop_boxes(raw: tf.Tensor, seed: tf.Tensor, spec: aug.AugmentSpec, views: int = 2) -> tf.Tensor:
    """The boxes `decode_crops` uses for `raw` and `seed`: int32 [views, 4] (top, left,
    height, width) in the original image's pixels. For tests and inspection."""

    def shape():
        return tf.cond(
            tf.io.is_jpeg(raw),
            lambda: tf.io.extract_jpeg_shape(raw)[:2],
            lambda: tf.shape(tf.io.decode_image(raw, channels=3, expand_animations=False))[:2],
        )

    hw = shape()
    return aug.sample_crop_boxes(seed, views, hw[0], hw[1], spec.crop_scale, spec.crop_ratio)
