"""Images to model inputs: the one decode stage of every path.

- `decode_image`: encoded bytes -> the whole image (JPEG at a reduced scale when much
  larger than needed), for evaluation and for the in-memory store.
- `eval_form`: encoded bytes -> the uint8 [R, R, 3] that `augment.eval_preprocess`
  takes (and the in-memory path stores).
- `crop_views`: the two RandomResizedCrops of an image as the official recipe makes
  them (facebookresearch/simsiam, torchvision): boxes drawn on the image's own height
  and width (`augment.sample_crop_boxes`), each crop resized to S x S. From encoded
  bytes, a JPEG is decoded only inside each box (`tf.io.decode_and_crop_jpeg`, at 1/2,
  1/4 or 1/8 scale when the box is that much larger than S); other formats, and images
  already in memory, are cropped from the whole image with the same resize (bilinear,
  antialiased when it shrinks, as torchvision's).
- `view_stage`: both views of an image from its seed (`order.image_seed`): the crops,
  then, with augment_on="host", flip, colour jitter, grayscale and blur, per image or on
  the batch by size; `image_views` for one image.
- `decoded`: the tf.data stage that maps a function over records in chunks, dropping
  a record that cannot be read or decoded without stopping the run.

Views leave here as uint8 (the batch format, `batches`).
"""

from __future__ import annotations

import tensorflow as tf

from simsiam_tf import augment as aug

# Larger images are refused (an error, which `decoded` counts as a skipped file)
# rather than risk running out of memory on a decompression bomb.
MAX_PIXELS = 250_000_000
_RATIOS = (1, 2, 4, 8)
# Records per decoding dataset, and chunks decoded at once: 32 x 4 keeps ~128 images in
# flight (as fast as 64 x 4, 0.3 GB less at 224 px: docs/data.md).
DECODE_CHUNK, DECODE_CYCLE = 32, 4


def _check_size(height, width):
    tf.debugging.assert_less_equal(
        tf.cast(height, tf.int64) * tf.cast(width, tf.int64),
        tf.constant(MAX_PIXELS, tf.int64),
        message="image too large",
    )


def _decode_any(raw: tf.Tensor) -> tf.Tensor:
    image = tf.io.decode_image(raw, channels=3, dtype=tf.uint8, expand_animations=False)
    return tf.ensure_shape(image, [None, None, 3])


def decode_image(raw: tf.Tensor, image_size: int) -> tf.Tensor:
    """JPEG/PNG/GIF/BMP bytes -> uint8 [H, W, 3]; large JPEGs are decoded at 1/2-1/8 scale.

    libjpeg can decode at a reduced scale for almost nothing, so a 10,000 px photo never
    takes 300 MB as full-size pixels when 32 px are wanted.
    """

    def jpeg():
        hw = tf.io.extract_jpeg_shape(raw)
        fold = tf.minimum(hw[0], hw[1]) // aug.eval_resize_side(image_size)
        branch = tf.cast(fold >= 2, tf.int32) + tf.cast(fold >= 4, tf.int32) + tf.cast(fold >= 8, tf.int32)
        return tf.switch_case(
            branch, [lambda r=r: tf.io.decode_jpeg(raw, channels=3, ratio=r) for r in _RATIOS]
        )

    image = tf.cond(tf.io.is_jpeg(raw), jpeg, lambda: _decode_any(raw))
    _check_size(tf.shape(image)[0], tf.shape(image)[1])
    return image


def eval_form(raw: tf.Tensor, image_size: int) -> tf.Tensor:
    """Encoded image -> uint8 [R, R, 3] (`augment.storage_resize_uint8`): what the
    in-memory path stores and `augment.eval_preprocess` takes."""
    return aug.storage_resize_uint8(decode_image(raw, image_size)[None], image_size)[0]


def _resize(crop: tf.Tensor, size: int) -> tf.Tensor:
    """A crop [h, w, 3] -> uint8 [size, size, 3], as torchvision's RandomResizedCrop.

    Bilinear with antialiasing (PIL's and torchvision's `antialias=True`) where a side
    shrinks: a crop shrunk k-fold averages over k pixels instead of sampling 2 of them,
    so a PNG crop shrunk 10x does not alias. An enlarged crop gets plain bilinear, the
    same weights without the antialiasing op's round-off (the 32 px views stay those of
    tests/data/memory_path_32px.json).
    """
    shape = tf.shape(crop)
    shrinks = tf.logical_or(shape[0] > size, shape[1] > size)
    out = tf.cond(
        shrinks,
        lambda: tf.image.resize(crop, (size, size), method="bilinear", antialias=True),
        lambda: tf.image.resize(crop, (size, size), method="bilinear"),
    )
    return tf.cast(tf.clip_by_value(tf.round(out), 0.0, 255.0), tf.uint8)


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
            return _resize(tf.io.decode_and_crop_jpeg(raw, window, channels=3, ratio=r), size)

        return decode

    return tf.switch_case(jpeg_ratio(box, size), [at(r) for r in _RATIOS])


def _boxes(seed, height, width, spec: aug.AugmentSpec, views: int):
    return aug.sample_crop_boxes(seed, views, height, width, spec.crop_scale, spec.crop_ratio)


def crops_of_image(image: tf.Tensor, seed: tf.Tensor, spec: aug.AugmentSpec, views: int = 2) -> tf.Tensor:
    """`views` random resized crops of a decoded uint8 [H, W, 3] image: uint8 [views, S, S, 3]."""
    shape = tf.shape(image)
    b = _boxes(seed, shape[0], shape[1], spec, views)
    size = spec.image_size
    out = tf.stack([_resize(image[b[v, 0] : b[v, 0] + b[v, 2], b[v, 1] : b[v, 1] + b[v, 3]], size) for v in range(views)])
    return tf.ensure_shape(out, [views, size, size, 3])


def decode_crops(raw: tf.Tensor, seed: tf.Tensor, spec: aug.AugmentSpec, views: int = 2) -> tf.Tensor:
    """`views` random resized crops of one encoded image.

    Args:
        raw: tf.string scalar, JPEG/PNG/GIF/BMP bytes.
        seed: int64 [2], the stateless seed of the crop boxes.
        spec: the augmentation spec (image_size, crop_scale, crop_ratio).
    Returns:
        uint8 [views, S, S, 3]; the same crops as `crops_of_image` of the decoded image.
    Raises (as a tf.errors.OpError when run): undecodable or too large images.
    """
    size = spec.image_size

    def jpeg():
        shape = tf.io.extract_jpeg_shape(raw)
        _check_size(shape[0], shape[1])
        b = _boxes(seed, shape[0], shape[1], spec, views)
        return tf.stack([_decode_jpeg_box(raw, b[v], shape[0], shape[1], size) for v in range(views)])

    def other():
        image = _decode_any(raw)
        _check_size(tf.shape(image)[0], tf.shape(image)[1])
        return crops_of_image(image, seed, spec, views)

    out = tf.cond(tf.io.is_jpeg(raw), jpeg, other)
    return tf.ensure_shape(out, [views, size, size, 3])


def crop_boxes(raw: tf.Tensor, seed: tf.Tensor, spec: aug.AugmentSpec, views: int = 2) -> tf.Tensor:
    """The boxes `decode_crops` uses for `raw` and `seed`: int32 [views, 4] (top, left,
    height, width) in the original image's pixels. For tests and inspection."""
    hw = tf.cond(
        tf.io.is_jpeg(raw),
        lambda: tf.io.extract_jpeg_shape(raw)[:2],
        lambda: tf.shape(_decode_any(raw))[:2],
    )
    return _boxes(seed, hw[0], hw[1], spec, views)


# From this training size up the colour steps run per image, each view one XLA program
# with a conditional per step, so an image pays only for the steps it draws (3x faster
# than the batched form at 224 px on a CPU); below it they run on the batch, where the
# per-image program's fixed cost would dominate (4x slower at 32 px). The two forms
# give the same views to float round-off (tests/test_augment.py).
PER_IMAGE_COLOUR_FROM = 96


def view_stage(spec: aug.AugmentSpec, augment_on: str):
    """(per_image, per_batch): the two halves of making views, the same on every path.

    `per_image(image_or_raw, seed)` runs in each image's map: `image_or_raw` is encoded
    bytes (tf.string, decoded only at the crops) or a decoded uint8 [H, W, 3] image, and
    every random choice comes from `seed` (`order.image_seed`). `per_batch` turns a
    batch of what it returned into uint8 views [B, 2, S, S, 3]: with augment_on="device",
    the crops (for `augment.ViewAugment` in `train_step`); with "host", fully augmented
    and rounded to whole grey levels (as torchvision holds an augmented image), not yet
    normalised.
    """
    per_image_colour = spec.image_size >= PER_IMAGE_COLOUR_FROM

    def per_image(image_or_raw, seed):
        crop_seed, seed1, seed2 = tf.unstack(tf.random.experimental.stateless_split(seed, 3))
        if image_or_raw.dtype == tf.string:
            crops = decode_crops(image_or_raw, crop_seed, spec)
        else:
            crops = crops_of_image(image_or_raw, crop_seed, spec)
        if augment_on == "device":
            return crops
        params = aug.image_params(seed1, spec), aug.image_params(seed2, spec)
        if per_image_colour:
            return tf.stack([aug.photometric_image(crops[v], params[v], spec, uint8_out=True) for v in (0, 1)])
        return {"crops": crops, "params": params}

    def per_batch(parts):
        if not isinstance(parts, dict):  # already views
            return parts
        crops = parts["crops"]
        return tf.stack(
            [aug.photometric_batch(crops[:, v], parts["params"][v], spec, uint8_out=True) for v in (0, 1)], axis=1
        )

    return per_image, per_batch


def image_views(image_or_raw: tf.Tensor, seed: tf.Tensor, spec: aug.AugmentSpec, augment_on: str) -> tf.Tensor:
    """The two views of one image as every input makes them (`view_stage`): uint8
    [2, S, S, 3]."""
    per_image, per_batch = view_stage(spec, augment_on)
    parts = tf.nest.map_structure(lambda t: t[None], per_image(image_or_raw, seed))
    return per_batch(parts)[0]


def decoded(records: tf.data.Dataset, fn, deterministic: bool = True) -> tf.data.Dataset:
    """`records.map(fn)`, in parallel, leaving out every record `fn` fails on.

    `fn` takes a record's components and returns what replaces it; a record that cannot
    be read or decoded (an OpError in `fn`) is dropped, while an error in producing the
    records themselves (a truncated TFRecord shard) still stops the run. Records go
    through in chunks of DECODE_CHUNK, each a dataset of its own with `ignore_errors`:
    a dataset per record would halve the rate.
    """

    def chunk(*components):
        return tf.data.Dataset.from_tensor_slices(components).map(
            fn, num_parallel_calls=tf.data.AUTOTUNE, deterministic=deterministic
        ).ignore_errors()

    return records.batch(DECODE_CHUNK).interleave(
        chunk, cycle_length=DECODE_CYCLE, block_length=DECODE_CHUNK,
        num_parallel_calls=DECODE_CYCLE, deterministic=deterministic,
    )
