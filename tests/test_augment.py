"""The vectorised SimSiam augmentation against the torchvision recipe it implements."""

import dataclasses
import math
import os

import numpy as np
import pytest
import tensorflow as tf
from scipy import ndimage, stats

from simsiam_tf import augment as aug
from simsiam_tf.input import batches, catalog, sources
from simsiam_tf.input.memory import MemoryInput


def _images(n=16, size=32, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def _torchvision_crop(rng, height, width, scale=(0.2, 1.0), ratio=(3 / 4, 4 / 3)):
    """torchvision.transforms.RandomResizedCrop.get_params, transcribed with numpy."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return rng.integers(0, height - h + 1), rng.integers(0, width - w + 1), h, w
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = height, int(round(height * max(ratio)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


@pytest.mark.parametrize("height,width", [(32, 32), (96, 96), (40, 90)])
def test_crop_boxes_have_torchvisions_distribution(height, width):
    n = 20000
    boxes = aug.sample_crop_boxes(
        tf.constant([7, 11], tf.int64), n, height, width, (0.2, 1.0), (3 / 4, 4 / 3)
    ).numpy()
    rng = np.random.default_rng(0)
    ref = np.array([_torchvision_crop(rng, height, width) for _ in range(n)])
    for boxes_ in (boxes, ref):
        top, left, h, w = boxes_.T
        assert (top >= 0).all() and (left >= 0).all()
        assert (top + h <= height).all() and (left + w <= width).all()
    area = lambda b: b[:, 2] * b[:, 3] / (height * width)
    log_aspect = lambda b: np.log(b[:, 3] / b[:, 2])
    assert stats.ks_2samp(area(boxes), area(ref)).pvalue > 1e-3
    assert stats.ks_2samp(log_aspect(boxes), log_aspect(ref)).pvalue > 1e-3
    # Position: the crop centre is uniform over the valid offsets in both.
    centre = lambda b: (b[:, 0] + b[:, 2] / 2) / height
    assert stats.ks_2samp(centre(boxes), centre(ref)).pvalue > 1e-3
    assert area(boxes).min() >= 0.15 and area(boxes).max() <= 1.0


def _whole_image(spec):
    """`spec` with crops that are always the whole (square) image: every pixel of a view
    is then known, and flip, colour and blur can be read off the output."""
    return dataclasses.replace(spec, crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0))


def _step_images(n, size, edge, dark=90, bright=150):
    """Grey images: columns < `edge` at `dark`, the rest at `bright`, left/right asymmetric.

    Jitter maps a grey image to grey through one affine map per image (brightness and
    contrast; saturation and hue leave grey alone), and these levels never clip under
    factors in [0.6, 1.4]; grayscale leaves grey alone; blur is linear.
    """
    images = np.full((n, size, size, 3), bright, np.uint8)
    images[:, :, :edge] = dark
    return images


def _read_step_views(views, size, edge):
    """Flip, untouched levels and blur sigma of views of `_step_images`, from pixels only.

    Along a row, the differences of a blurred step are the blur kernel's taps times the
    step height (times the jitter's affine slope): k[0] at the edge, k[+-1] beside it. A
    sampled Gaussian has k[1] / k[0] = exp(-1 / (2 sigma^2)), whatever its truncation and
    normalisation, so sigma = 1 / sqrt(2 ln(k[0] / k[1])); no blur gives k[1] = 0, sigma 0.

    Returns:
        flipped: bool [B], the edge is at `size - edge` (mirrored), not at `edge`;
        levels: float [B, 2], the [0, 1] values at the far left and far right columns,
            which a blur of radius <= 6 does not reach;
        sigma: float [B].
    """
    rgb = views * np.array(aug.IMAGENET_STD) + np.array(aug.IMAGENET_MEAN)
    row = rgb[:, size // 2, :, 0].astype(np.float64)
    steps = np.abs(np.diff(row, axis=1))  # steps[:, c - 1] = |row[c] - row[c - 1]|
    at = np.argmax(steps, axis=1) + 1
    assert np.isin(at, [edge, size - edge]).all()  # the edge stays where a crop of the whole image puts it
    b = np.arange(len(row))
    k0 = steps[b, at - 1]
    k1 = 0.5 * (steps[b, at] + steps[b, at - 2])
    with np.errstate(divide="ignore"):
        sigma = np.where(k1 > 0, 1.0 / np.sqrt(2.0 * np.log(k0 / np.maximum(k1, 1e-300))), 0.0)
    levels = np.stack([rgb[:, :, :4].mean(axis=(1, 2, 3)), rgb[:, :, -4:].mean(axis=(1, 2, 3))], axis=1)
    return at == size - edge, levels, sigma


def test_application_probabilities():
    """The drawn parameters, then the same rates measured on the layer's output pixels."""
    spec = aug.AugmentSpec(image_size=32, blur_prob=0.5)
    layer = aug.SimSiamAugment(spec)
    layer._call_seed = tf.constant([1, 2], tf.int64)
    t = layer.get_random_transformation_batch(40000, images=tf.zeros([1, 32, 32, 3]))
    assert np.mean(t["flip"].numpy()) == pytest.approx(0.5, abs=0.01)
    assert np.mean(t["jitter"].numpy()) == pytest.approx(0.8, abs=0.01)
    assert np.mean(t["grayscale"].numpy()) == pytest.approx(0.2, abs=0.01)
    assert np.mean(t["blur"].numpy()) == pytest.approx(0.5, abs=0.01)
    f = t["jitter_factors"].numpy()
    for col, (lo, hi) in enumerate([(0.6, 1.4), (0.6, 1.4), (0.6, 1.4), (-0.1, 0.1)]):
        assert f[:, col].min() >= lo and f[:, col].max() <= hi
        assert f[:, col].mean() == pytest.approx((lo + hi) / 2, abs=0.01)
    order = t["jitter_order"].numpy()
    assert (np.sort(order, axis=1) == np.arange(4)).all()  # a permutation per image
    # Every op appears first about a quarter of the time: the order is uniform.
    assert np.bincount(order[:, 0], minlength=4) / len(order) == pytest.approx([0.25] * 4, abs=0.01)
    sigma = t["blur_sigma"].numpy()
    assert sigma.min() >= 0.1 and sigma.max() <= 2.0

    # On pixels: crops of the whole image, so only flip, colour and blur change it. One
    # batch (one compilation): n grey step images, then n colour images. n = 2000: a
    # rate's binomial std is at most 0.011; the tolerances are 3.1 to 3.4 of it.
    n, size, edge = 2000, 32, 12
    layer = aug.SimSiamAugment(_whole_image(spec))
    colour = np.broadcast_to(np.array([200, 40, 90], np.uint8), (n, size, size, 3))
    images = np.concatenate([_step_images(n, size, edge), colour])
    views = layer(tf.constant(images), seed=tf.constant([3, 4], tf.int64)).numpy()
    flipped, levels, blur_sigma = _read_step_views(views[:n], size, edge)
    assert flipped.mean() == pytest.approx(0.5, abs=0.035)
    # Unjittered, the far columns keep their exact levels (dark and bright, swapped by
    # a flip); brightness and contrast factors move them (f = 1 exactly has probability 0).
    untouched = np.where(flipped[:, None], [150 / 255, 90 / 255], [90 / 255, 150 / 255])
    jittered = np.abs(levels - untouched).max(axis=1) > 1e-4
    assert jittered.mean() == pytest.approx(0.8, abs=0.03)
    # Blur with sigma above 0.25 is measurable (k[1] / k[0] > 3e-4); sigma ~ U(0.1, 2.0)
    # exceeds it with probability 1.75 / 1.9.
    assert (blur_sigma > 0.25).mean() == pytest.approx(0.5 * 1.75 / 1.9, abs=0.035)
    assert blur_sigma.max() <= 2.0 + 1e-3
    # Grayscale on the colour image: equal channels. Jitter keeps colour (saturation >= 0.6).
    rgb = views[n:] * np.array(aug.IMAGENET_STD) + np.array(aug.IMAGENET_MEAN)
    spread = np.abs(rgb - rgb.mean(axis=-1, keepdims=True)).max(axis=(1, 2, 3))
    assert (spread < 1e-4).mean() == pytest.approx(0.2, abs=0.03)


@pytest.mark.parametrize("size", [96, 95])
def test_blur_from_96_px_on_the_layers_outputs(size):
    """From 96 px the layer blurs half of the views with sigma ~ U(0.1, 2.0), as the
    paper's ImageNet recipe; below 96 px it never blurs. Measured on the output pixels
    of the real spec (`AugmentSpec.for_image_size`), crops of the whole image, jitter,
    grayscale and flip on (they cannot fake or hide a blur: see `_read_step_views`)."""
    n, edge = 600 if size == 96 else 200, size * 3 // 8
    layer = aug.SimSiamAugment(_whole_image(aug.AugmentSpec.for_image_size(size)))
    views = layer(tf.constant(_step_images(n, size, edge)), seed=tf.constant([8, 9], tf.int64)).numpy()
    _, _, sigma = _read_step_views(views, size, edge)
    if size < 96:
        assert (sigma == 0).all()  # not one view blurred
        return
    # Measurable sigma (> 0.25, see test_application_probabilities) in 0.5 * 1.75 / 1.9
    # of the views (binomial std 0.02 at n = 600), spread uniformly up to 2.0.
    blurred = sigma[sigma > 0.25]
    assert len(blurred) / n == pytest.approx(0.5 * 1.75 / 1.9, abs=0.06)
    assert blurred.max() <= 2.0 + 1e-3 and blurred.max() > 1.9
    assert stats.kstest(blurred, stats.uniform(0.25, 2.0 - 0.25).cdf).pvalue > 1e-3


# -- the colour ops against torchvision's own ------------------------------------------
#
# tests/data/torchvision_colour_reference.npz holds torchvision's outputs on seeded
# synthetic images; regenerate it with a Python that has torchvision (torch is not a
# dependency of this project):
#
#     /work/torchvenv/bin/python tests/data/make_torchvision_colour_reference.py
#
# Paths: torchvision.transforms.functional on float32 tensors in [0, 1] ("float"), on
# uint8 tensors ("uint8") and on PIL images ("pil", what the official SimSiam code runs).
# Our ops work on float32 in [0, 1] and never round to 8 bits, so the float path must
# agree to round-off and the 8-bit paths to their roundings, bounded per op below.
#
# One real difference, below round-off of 8-bit images: torchvision's tensor grayscale
# weighs red 0.2989, where ours, PIL's "L" and ITU-R 601-2 use 0.299. The luma differs
# by at most 1e-4 (of 1), and contrast and saturation mix it in with weight |1 - f|.

_REFERENCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "torchvision_colour_reference.npz")
_OPS = {
    "brightness": aug.adjust_brightness,
    "contrast": aug.adjust_contrast,
    "saturation": aug.adjust_saturation,
    "hue": aug.adjust_hue,
}
_LUMA_RED_DIFFERENCE = 0.2990 - 0.2989


@pytest.fixture(scope="module")
def torchvision_reference():
    with np.load(_REFERENCE) as data:
        return {k: data[k] for k in data.files}


def _ours(ref, op, factors=None):
    """Our op on the reference images, float [0, 1] (grayscale: [N, H, W])."""
    x = tf.constant(ref["images"].astype(np.float32) / 255.0)
    if op == "grayscale":
        return aug.grayscale(x).numpy()[..., 0]
    if op == "jitter":
        return aug.color_jitter(x, tf.constant(factors), tf.constant(ref["jitter_order"])).numpy()
    return _OPS[op](x, tf.constant(ref["factors"][:, list(_OPS).index(op)])).numpy()


def _per_image(bound):
    return np.asarray(bound, np.float64).reshape(-1, 1, 1, 1)


def test_colour_ops_match_torchvision_on_float_images(torchvision_reference):
    ref = torchvision_reference
    for op in _OPS:
        ours, theirs = _ours(ref, op), ref[f"float_{op}"]
        if op in ("contrast", "saturation"):
            # The luma difference, mixed in with weight |1 - f|, plus float32 round-off.
            col = list(_OPS).index(op)
            bound = _LUMA_RED_DIFFERENCE * np.abs(1.0 - ref["factors"][:, col]) + 2e-6
        else:
            # brightness: the same product and clip; hue: two RGB <-> HSV conversions
            # written differently (measured 1e-6).
            bound = np.full(len(ours), 1e-6 if op == "brightness" else 1e-5)
        assert (np.abs(ours - theirs) <= _per_image(bound)).all(), (op, np.abs(ours - theirs).max())
    gray = _ours(ref, "grayscale")
    np.testing.assert_allclose(gray, ref["float_grayscale"], atol=_LUMA_RED_DIFFERENCE + 1e-6, rtol=0)


def test_colour_ops_match_torchvision_on_8_bit_images(torchvision_reference):
    """In grey levels, d = torchvision's uint8 output - 255 * ours on the same images."""
    ref = torchvision_reference
    eps = 1e-3  # float32 round-off of 255 * ours
    luma = 255 * _LUMA_RED_DIFFERENCE  # the luma difference in grey levels, 0.0255
    for path in ("uint8", "pil"):
        for op in (*_OPS, "grayscale"):
            d = ref[f"{path}_{op}"].astype(np.float64) - 255.0 * _ours(ref, op)
            if op in ("contrast", "saturation"):
                off = np.abs(1.0 - ref["factors"][:, list(_OPS).index(op)])
                # Both round the grey they blend with (uint8: truncated luma, < 1 + luma
                # levels; PIL: a rounded "L", and for contrast its mean rounded again,
                # <= 1 level) and weigh that error by |1 - f|; then truncate (< 1 level).
                bound = _per_image(1.0 + (1.0 + luma) * off + eps)
                assert (np.abs(d) <= bound).all(), (path, op, np.abs(d).max())
            elif op == "brightness":  # f * x, truncated (torch's .to(uint8), PIL's blend)
                assert d.min() > -1.0 - eps and d.max() <= eps, (path, op, d.min(), d.max())
            elif op == "grayscale":
                if path == "uint8":  # truncated, red weighed 0.2989
                    assert d.min() > -1.0 - luma - eps and d.max() <= eps, (path, op, d.min(), d.max())
                else:  # PIL's "L": ITU-R 601-2 in fixed point, rounded
                    assert np.abs(d).max() <= 0.5 + eps, (path, op, np.abs(d).max())
            elif path == "uint8":  # hue: back to uint8 as floor(255.999 * x)
                assert np.abs(d).max() <= 1.0 + eps, (path, op, np.abs(d).max())
    # PIL's hue: torchvision shifts PIL's 8-bit hue channel by int(255 * delta) of 256
    # steps a turn, and PIL stores H, S and V in 8 bits (its RGB -> HSV -> RGB round trip
    # alone moves random pixels by up to 6 levels). Ours with that shift: within 8
    # levels (measured 7.4), 1 on average (measured 0.52). A wrong sign or unit of the
    # hue shift is off by tens of levels.
    pil_delta = np.trunc(255.0 * ref["factors"][:, 3].astype(np.float64)) / 256.0
    x = tf.constant(ref["images"].astype(np.float32) / 255.0)
    d = ref["pil_hue"] - 255.0 * aug.adjust_hue(x, tf.constant(pil_delta, tf.float32)).numpy()
    assert np.abs(d).max() <= 8.0 and np.abs(d).mean() <= 1.0, (np.abs(d).max(), np.abs(d).mean())


def test_color_jitter_matches_torchvisions_colorjitter(torchvision_reference):
    """ColorJitter(0.4, 0.4, 0.4, 0.1) with the factors and op order (fn_idx) its
    get_params drew, replayed through `color_jitter` with the same order per image."""
    ref = torchvision_reference
    factors = ref["jitter_factors"]
    assert len({tuple(o) for o in ref["jitter_order"]}) > 6  # many orders, one per image
    for xla in (True, False):
        x = tf.constant(ref["images"].astype(np.float32) / 255.0)
        ours = aug.color_jitter(x, tf.constant(factors), tf.constant(ref["jitter_order"]), xla=xla).numpy()
        # Float: the luma difference (<= 4e-5 in each of contrast and saturation)
        # carried through the later ops (measured 6.7e-5). A wrong order or a swapped
        # op is off by 0.08 or more.
        np.testing.assert_allclose(ours, ref["float_jitter"], atol=1.5e-4, rtol=0)
    # 8 bits: torchvision rounds after each of the four ops (up to ~1.4 levels each,
    # as single ops above) and later ops scale an earlier difference by up to 1.4-1.8;
    # measured max 4.0 and mean 1.2 levels (uint8), 8.7 and 1.2 (PIL, whose hue shift is
    # quantised as in the single-op test). A wrong order or a swapped op gives 20-94.
    d = ref["uint8_jitter"] - 255.0 * ours
    assert np.abs(d).max() <= 5.0 and np.abs(d).mean() <= 1.5, (np.abs(d).max(), np.abs(d).mean())
    pil_factors = factors.copy()
    pil_factors[:, 3] = np.trunc(255.0 * factors[:, 3].astype(np.float64)) / 256.0
    d = ref["pil_jitter"] - 255.0 * _ours(ref, "jitter", pil_factors)
    assert np.abs(d).max() <= 10.0 and np.abs(d).mean() <= 1.5, (np.abs(d).max(), np.abs(d).mean())


def test_color_jitter_applies_each_images_own_order():
    rng = np.random.default_rng(6)
    x = rng.uniform(0, 1, (8, 6, 6, 3)).astype(np.float32)
    factors = np.stack(
        [rng.uniform(0.6, 1.4, 8), rng.uniform(0.6, 1.4, 8), rng.uniform(0.6, 1.4, 8), rng.uniform(-0.1, 0.1, 8)], 1
    ).astype(np.float32)
    order = np.stack([rng.permutation(4) for _ in range(8)]).astype(np.int32)
    out = aug.color_jitter(tf.constant(x), tf.constant(factors), tf.constant(order)).numpy()
    for i in range(8):
        y = x[i : i + 1]
        for op_id in order[i]:
            y = aug._JITTER_OPS[op_id](y, factors[i : i + 1, op_id]).numpy()
        np.testing.assert_allclose(out[i], y[0], atol=1e-6)


def test_gaussian_blur_matches_scipy_per_image():
    rng = np.random.default_rng(7)
    x = rng.uniform(0, 1, (3, 20, 20, 3)).astype(np.float32)
    sigma = np.array([0.5, 1.0, 2.0], np.float32)
    out = aug.gaussian_blur(tf.constant(x), tf.constant(sigma), radius=6).numpy()
    for i in range(3):
        expected = ndimage.gaussian_filter(
            x[i], sigma=(sigma[i], sigma[i], 0), mode="mirror", truncate=6 / sigma[i]
        )
        np.testing.assert_allclose(out[i], expected, atol=1e-5)


def test_flip_and_crop_of_the_whole_image():
    x = tf.constant(_images(2, 8), tf.float32)
    boxes = tf.constant([[0, 0, 8, 8], [0, 0, 8, 8]], tf.int32)
    out = aug.crop_resize_flip(x, boxes, tf.constant([False, True]), 8).numpy()
    np.testing.assert_allclose(out[0], x[0], atol=1e-4)
    np.testing.assert_allclose(out[1], x[1, :, ::-1], atol=1e-4)


def test_view_shape_dtype_and_range_eager_and_in_tf_data():
    spec = aug.AugmentSpec(image_size=24)
    layer = aug.SimSiamAugment(spec)
    images = _images(8, 32)
    seed = tf.constant([5, 9], tf.int64)
    eager = layer(tf.constant(images), seed=seed).numpy()
    ds = tf.data.Dataset.from_tensors(images).map(lambda x: layer(x, seed=seed))
    graph = next(iter(ds)).numpy()
    assert eager.shape == (8, 24, 24, 3) and eager.dtype == np.float32
    np.testing.assert_allclose(eager, graph, atol=1e-5)  # the same op, eagerly and in tf.data
    lo = (0 - np.array(aug.IMAGENET_MEAN)) / np.array(aug.IMAGENET_STD)
    hi = (1 - np.array(aug.IMAGENET_MEAN)) / np.array(aug.IMAGENET_STD)
    assert (eager >= lo - 1e-5).all() and (eager <= hi + 1e-5).all()


def test_seeds_reproduce_and_differ():
    layer = aug.SimSiamAugment(aug.AugmentSpec(image_size=32))
    images = tf.constant(_images(8))
    a = layer(images, seed=tf.constant([1, 1], tf.int64)).numpy()
    b = layer(images, seed=tf.constant([1, 1], tf.int64)).numpy()
    c = layer(images, seed=tf.constant([1, 2], tf.int64)).numpy()
    np.testing.assert_array_equal(a, b)
    assert np.abs(a - c).mean() > 0.1


def test_both_views_come_from_the_same_image():
    # Solid-colour images with colour changes switched off: a view keeps its image's
    # colour, through the training input's own pipeline (crops, flips, uint8 batches).
    spec = aug.AugmentSpec(image_size=16, jitter_prob=0.0, grayscale_prob=0.0)
    colours = np.random.default_rng(8).integers(0, 256, (64, 3), dtype=np.uint8)
    images = np.broadcast_to(colours[:, None, None, :], (64, 16, 16, 3)).copy()
    source = sources.ArraySource("colours", {"train": (images, None)})
    memory = MemoryInput(source, catalog.decide_splits(source.stored), 16)
    seen = 0
    for batch in memory.worker_batches(16, 0, 1, spec, seed=3, epochs=2):
        x1, x2 = (x.numpy().astype(float).mean(axis=(1, 2)) for x in batches.unpack(batch))
        np.testing.assert_allclose(x1, x2, atol=1e-6)
        # ...and that colour is one of the dataset's images.
        dist = np.abs(x1[:, None, :] - colours[None].astype(float)).sum(-1).min(1)
        assert (dist < 1.5).all()
        seen += len(x1)
    assert seen == 2 * 64  # every image once per epoch


def test_layer_config_round_trip():
    layer = aug.SimSiamAugment(aug.AugmentSpec(image_size=96, blur_prob=0.5))
    clone = aug.SimSiamAugment.from_config(layer.get_config())
    assert clone.spec == layer.spec
    images = tf.constant(_images(4, 96))
    seed = tf.constant([2, 3], tf.int64)
    np.testing.assert_array_equal(layer(images, seed=seed).numpy(), clone(images, seed=seed).numpy())


def test_blur_only_at_imagenet_size():
    assert aug.AugmentSpec.for_image_size(32).blur_prob == 0.0
    assert aug.AugmentSpec.for_image_size(224).blur_prob == 0.5


def test_eval_preprocess_resizes_any_size_and_matches_stored_images():
    images = _images(3, 50)
    out = aug.eval_preprocess(images, 32).numpy()
    assert out.shape == (3, 32, 32, 3)
    stored = aug.resize_uint8(images, 32).numpy()
    np.testing.assert_allclose(aug.eval_preprocess(stored, 32).numpy(), out, atol=1e-6)


def _torchvision_resize_shape(h, w, side):
    """torchvision.transforms.functional._compute_resized_output_size(
    [h, w], [side]), written out: the shorter side (the width when w <= h) becomes
    `side`, the longer int(side * long / short)."""
    short, long = (w, h) if w <= h else (h, w)
    new_short, new_long = side, int(side * long / short)
    return (new_long, new_short) if w <= h else (new_short, new_long)


def test_the_evaluation_resize_has_torchvisions_sizes():
    assert aug.shorter_side_resize_shape(147, 98, 256) == (384, 256)  # long * (side / short) gave 383
    # The project's sides: the preset sizes' evaluation sides and the stored squares.
    sides = sorted({aug.eval_resize_side(s) for s in (32, 64, 96, 112, 128, 160, 192, 224, 256, 288)} | {256})
    h, w = np.meshgrid(np.arange(8, 400), np.arange(8, 400), indexing="ij")
    for side in sides:
        new_h, new_w = (t.numpy() for t in aug.shorter_side_resize_shape(tf.constant(h.ravel()), tf.constant(w.ravel()), side))
        expected = np.array([_torchvision_resize_shape(a, b, side) for a, b in zip(h.ravel(), w.ravel())])
        wrong = (new_h != expected[:, 0]) | (new_w != expected[:, 1])
        assert not wrong.any(), (side, h.ravel()[wrong][:5], w.ravel()[wrong][:5])
    # A shorter side already at the target is left alone, as torchvision returns the image:
    # the centre crop is then a slice of the original pixels.
    image = _images(1, 300)[:, :, :256]  # 300 x 256
    out = aug.resize_shorter_center_crop(image, 256, 224).numpy()
    np.testing.assert_array_equal(out, image[:, 38:262, 16:240])


# ---------------------------------------------------------------------------
# The two placements of the photometric steps: tf.data on the host (batched for the
# in-memory path, per image for the streaming path) and train_step on the device
# (`ViewAugment`, batched or per image). Same parameters, same views; and the same
# application rates measured on the output pixels, whichever runs.


def _placements(spec):
    """name -> fn(uint8 crops [B, S, S, 3], seed) -> views, for every placement."""

    def stream_host(images, seed):
        seeds = tf.random.experimental.stateless_split(seed, len(images))
        return tf.stack([aug.photometric_image(images[i], aug.image_params(seeds[i], spec), spec) for i in range(len(images))])

    return {
        "device, batched": lambda x, s: aug.ViewAugment(spec, per_image=False)(x, seed=s),
        "device, per image": lambda x, s: aug.ViewAugment(spec, per_image=True)(x, seed=s),
        "stream host, per image": stream_host,
    }


@pytest.mark.parametrize("size", [32, 96])
def test_per_image_and_batched_photometric_give_the_same_views(size):
    spec = aug.AugmentSpec.for_image_size(size)
    images = tf.constant(_images(12, size, seed=4))
    params = aug.draw_params(tf.constant([5, 6], tf.int64), 12, spec)
    batched = aug.photometric_batch(images, params, spec).numpy()
    for i in range(12):
        one = aug.photometric_image(images[i], {k: v[i] for k, v in params.items()}, spec).numpy()
        np.testing.assert_allclose(one, batched[i], atol=1e-5)
    layer = aug.ViewAugment(spec, per_image=True)(images, seed=tf.constant([5, 6], tf.int64)).numpy()
    np.testing.assert_allclose(layer, batched, atol=1e-5)


def test_every_placement_applies_flip_jitter_and_grayscale_at_the_papers_rates():
    """Measured on output pixels. A grey image, dark left half and bright right half:
    it is flipped iff its left is brighter; jitter changes its grey levels, nothing else
    does (saturation and hue leave grey alone, grayscale keeps grey); a colour image
    shows grayscale as equal channels."""
    n, size = 2000, 16
    spec = aug.AugmentSpec(image_size=size)
    grey = np.full((n, size, size, 3), 200, np.uint8)
    grey[:, :, : size // 2] = 50
    colour = np.broadcast_to(np.array([200, 40, 90], np.uint8), (n, size, size, 3)).copy()
    rates = {}
    for name, fn in _placements(spec).items():
        x = fn(tf.constant(grey), tf.constant([1, 7], tf.int64)).numpy() * aug.IMAGENET_STD + aug.IMAGENET_MEAN
        left, right = x[:, :, : size // 2].mean(axis=(1, 2, 3)), x[:, :, size // 2 :].mean(axis=(1, 2, 3))
        values = np.sort(np.round([left, right], 4).T, axis=1)
        jittered = np.abs(values - np.array([50, 200]) / 255).max(axis=1) > 1e-3
        c = fn(tf.constant(colour), tf.constant([2, 7], tf.int64)).numpy() * aug.IMAGENET_STD + aug.IMAGENET_MEAN
        gray = np.abs(c[..., 0] - c[..., 1]).max(axis=(1, 2)) < 1e-4
        rates[name] = (np.mean(left > right), np.mean(jittered), np.mean(gray))
        for measured, p in zip(rates[name], (0.5, 0.8, 0.2)):
            assert measured == pytest.approx(p, abs=0.035), (name, rates[name])
    # The keras-cv layer (the diagnostics probe's views), on the same measures.
    layer = aug.SimSiamAugment(aug.AugmentSpec(image_size=size, crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0)))
    x = layer(tf.constant(grey), seed=tf.constant([3, 7], tf.int64)).numpy() * aug.IMAGENET_STD + aug.IMAGENET_MEAN
    assert np.mean(x[:, :, : size // 2].mean(axis=(1, 2, 3)) > x[:, :, size // 2 :].mean(axis=(1, 2, 3))) == pytest.approx(0.5, abs=0.035)


def test_device_augmentation_draws_other_views_on_each_replica(mirrored):
    """Under MirroredStrategy both replicas get the same crops here; their views differ,
    because the seed folds in the replica id."""
    from simsiam_tf.config import make_config
    from simsiam_tf.model import build_simsiam

    config = make_config("digits", augment_on="device", width=4, proj_dim=16, pred_dim=8)
    with mirrored.scope():
        model = build_simsiam(config, sync_bn=True)
        model.compile(optimizer="sgd")
        model.optimizer.build(model.trainable_variables)
    crops = tf.constant(_images(4, 32))

    @tf.function
    def views():
        return mirrored.run(lambda: model.augment_views(crops, crops))

    x1, x2 = views()
    a, b = [v.numpy() for v in mirrored.experimental_local_results(x1)]
    assert a.shape == (4, 32, 32, 3) and np.abs(a - b).mean() > 0.05
    assert np.abs(a - mirrored.experimental_local_results(x2)[0].numpy()).mean() > 0.05  # and per view


def test_crops_come_from_the_boxes_position_on_asymmetric_images():
    # Boxes away from the corners, on images taller than wide, with random pixels: a
    # swapped x/y or an off-by-one in the corners picks other pixels and fails. Crops of
    # exactly `size` pixels (and of 2 * size - 1, every other pixel) are sampled without
    # interpolation, so they equal plain slices.
    rng = np.random.default_rng(7)
    size = 6
    images = rng.integers(0, 256, (4, 23, 17, 3)).astype(np.float32)
    boxes = np.array([[3, 9, size, size], [15, 2, size, size], [1, 5, 2 * size - 1, 2 * size - 1], [9, 0, size, size]])
    flips = np.array([False, False, False, True])
    out = aug.crop_resize_flip(tf.constant(images), tf.constant(boxes, tf.int32), tf.constant(flips), size).numpy()
    np.testing.assert_array_equal(out[0], images[0, 3:9, 9:15])
    np.testing.assert_array_equal(out[1], images[1, 15:21, 2:8])
    np.testing.assert_array_equal(out[2], images[2, 1:12:2, 5:16:2])
    np.testing.assert_array_equal(out[3], images[3, 9:15, 0:6][:, ::-1])  # mirrored left-right
