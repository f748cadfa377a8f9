"""The vectorised SimSiam augmentation against the torchvision recipe it implements."""

import colorsys
import math

import numpy as np
import pytest
import tensorflow as tf
from scipy import ndimage, stats

from simsiam_tf import augment as aug
from simsiam_tf import data as data_lib


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


def test_application_probabilities():
    layer = aug.SimSiamAugment(aug.AugmentSpec(image_size=32, blur_prob=0.5))
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


def test_applied_fractions_in_the_output():
    """Measured on outputs, not parameters: grayscale views have equal channels."""
    spec = aug.AugmentSpec(image_size=32)
    layer = aug.SimSiamAugment(spec)
    views = layer(tf.constant(_images(4000)), seed=tf.constant([3, 4], tf.int64)).numpy()
    rgb = views * np.array(aug.IMAGENET_STD) + np.array(aug.IMAGENET_MEAN)
    gray = np.all(np.abs(rgb[..., 0] - rgb[..., 1]) < 1e-4, axis=(1, 2))
    assert gray.mean() == pytest.approx(0.2, abs=0.02)


def _np_gray(x):
    return x @ np.array([0.299, 0.587, 0.114])


def test_colour_ops_match_torchvision_formulas():
    rng = np.random.default_rng(5)
    x = rng.uniform(0, 1, (6, 8, 8, 3)).astype(np.float32)
    f = rng.uniform(0.6, 1.4, 6).astype(np.float32)
    bx = f[:, None, None, None]
    np.testing.assert_allclose(aug.adjust_brightness(x, f), np.clip(x * bx, 0, 1), atol=1e-6)
    mean = _np_gray(x).mean(axis=(1, 2))[:, None, None, None]
    np.testing.assert_allclose(aug.adjust_contrast(x, f), np.clip(bx * x + (1 - bx) * mean, 0, 1), atol=1e-5)
    g = _np_gray(x)[..., None]
    np.testing.assert_allclose(aug.adjust_saturation(x, f), np.clip(bx * x + (1 - bx) * g, 0, 1), atol=1e-5)
    delta = rng.uniform(-0.1, 0.1, 6).astype(np.float32)
    expected = np.empty_like(x)
    for i in range(6):
        for idx in np.ndindex(8, 8):
            h, s, v = colorsys.rgb_to_hsv(*x[i][idx])
            expected[i][idx] = colorsys.hsv_to_rgb((h + delta[i]) % 1.0, s, v)
    np.testing.assert_allclose(aug.adjust_hue(x, delta), expected, atol=1e-5)


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
    # Solid-colour images with colour changes switched off: a view keeps its image's colour.
    spec = aug.AugmentSpec(image_size=16, jitter_prob=0.0, grayscale_prob=0.0)
    layer = aug.SimSiamAugment(spec)
    colours = np.random.default_rng(8).integers(0, 256, (64, 3), dtype=np.uint8)
    images = np.broadcast_to(colours[:, None, None, :], (64, 16, 16, 3)).copy()
    ds = data_lib.pair_dataset(images, 16, layer, seed=3, epochs=2)
    seen = 0
    for x1, x2 in ds:
        c1 = x1.numpy().mean(axis=(1, 2))
        c2 = x2.numpy().mean(axis=(1, 2))
        np.testing.assert_allclose(c1, c2, atol=1e-4)
        # ...and that colour is one of the dataset's images.
        rgb = np.round((c1 * aug.IMAGENET_STD + aug.IMAGENET_MEAN) * 255)
        dist = np.abs(rgb[:, None, :] - colours[None].astype(float)).sum(-1).min(1)
        assert (dist < 1.5).all()
        seen += len(c1)
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
    # The memory path's layer, for comparison on the same measures.
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
