"""The training crops' resize against torchvision's arithmetic.

torchvision's RandomResizedCrop on tensors with antialias=True (and PIL's bilinear
resize, what the official SimSiam code runs) is separable: each output pixel i of a
side resized from n to m pixels is a normalised triangle-weighted mean of the input
pixels near its centre, the triangle widened by the shrink factor n / m when m < n.
`_torchvision_aa_weights` writes out PyTorch's `_compute_weights_aa` (the weights its
`_upsample_bilinear2d_aa` uses) in numpy; torch is not a dependency of this project.
"""

import numpy as np
import pytest
import tensorflow as tf

from simsiam_tf import augment as aug
from simsiam_tf.input import decode


def _torchvision_aa_weights(n: int, m: int) -> np.ndarray:
    """float64 [m, n]: row i holds the weights of output pixel i (align_corners=False)."""
    scale = n / m
    support = scale if scale >= 1.0 else 1.0  # interp_size / 2 = 1 for bilinear, times the shrink
    invscale = 1.0 / scale if scale >= 1.0 else 1.0
    weights = np.zeros((m, n))
    for i in range(m):
        center = scale * (i + 0.5)
        xmin = max(int(center - support + 0.5), 0)
        xsize = min(int(center + support + 0.5), n) - xmin
        j = np.arange(xsize)
        w = np.maximum(0.0, 1.0 - np.abs((j + xmin - center + 0.5) * invscale))
        weights[i, xmin : xmin + xsize] = w / w.sum() if w.sum() else w
    return weights


def _torchvision_resized_crop(image: np.ndarray, box, size: int) -> np.ndarray:
    """torchvision.transforms.functional.resized_crop(image, *box, [size, size],
    antialias=True) on float pixels: float64 [size, size, 3]."""
    top, left, h, w = box
    crop = image[top : top + h, left : left + w].astype(np.float64)
    rows, cols = _torchvision_aa_weights(h, size), _torchvision_aa_weights(w, size)
    rows_done = np.einsum("ih,hwc->iwc", rows, crop)  # one side, then the other: separable
    return np.einsum("iwc,jw->ijc", rows_done, cols)


@pytest.mark.parametrize("height,width,size", [(400, 300, 32), (300, 500, 96), (40, 30, 64)])
def test_crops_are_torchvisions_antialiased_resized_crops(height, width, size):
    """Random pixels, PNG (decoded whole, then cropped: the path without a scaled
    decode). Shrinks of up to ~10x at 32 px, ~4x at 96 px, and an enlargement at 64 px.
    Without antialiasing a 10x shrink samples 2 of every 10 pixels, and its crops are
    tens of grey levels from torchvision's."""
    image = np.random.default_rng(height).integers(0, 256, (height, width, 3), np.uint8)
    raw = tf.io.encode_png(image)
    spec = aug.AugmentSpec(image_size=size)
    shrinks = []
    for s in range(8):
        seed = tf.constant([s, 3], tf.int64)
        crops = decode.decode_crops(raw, seed, spec).numpy()
        in_memory = decode.crops_of_image(tf.constant(image), seed, spec).numpy()
        np.testing.assert_array_equal(in_memory, crops)  # the in-memory input's crops are the stream's
        for view, box in enumerate(decode.crop_boxes(raw, seed, spec).numpy()):
            reference = _torchvision_resized_crop(image, box, size)
            # Ours is rounded to whole grey levels; torchvision's float path is not.
            assert np.abs(crops[view] - reference).max() <= 1.0, (s, view, box)
            shrinks.append(min(box[2], box[3]) / size)
    if size == 32:
        assert max(shrinks) > 7  # the case the antialiasing is for was drawn


def test_jpeg_crops_shrunk_less_than_2x_after_the_scaled_decode_are_antialiased():
    """A JPEG box less than twice the training size is decoded at full scale and then
    resized as a PNG crop is: the same weights, on the decoded pixels of the box."""
    image = np.random.default_rng(5).integers(0, 256, (120, 160, 3), np.uint8)
    raw = tf.io.encode_jpeg(image, quality=95)
    decoded = tf.io.decode_jpeg(raw, channels=3).numpy()
    spec = aug.AugmentSpec(image_size=64)
    for s in range(6):
        seed = tf.constant([s, 4], tf.int64)
        crops = decode.decode_crops(raw, seed, spec).numpy()
        for view, box in enumerate(decode.crop_boxes(raw, seed, spec).numpy()):
            assert min(box[2], box[3]) < 2 * 64  # ratio 1: no scaled decode
            reference = _torchvision_resized_crop(decoded, box, 64)
            # libjpeg's decode of a box may differ from the whole decode by a few levels at
            # the box's edges (chroma upsampling); the mean stays within a fraction.
            assert np.abs(crops[view] - reference).mean() < 0.5, (s, view, box)
