"""SimSiam augmentation, vectorised over the batch, and the evaluation preprocessing.

This is the only module that imports keras-cv.

The recipe is the one in facebookresearch/simsiam `main_simsiam.py` (torchvision):

    RandomResizedCrop(size, scale=(0.2, 1.0))       ratio (3/4, 4/3), 10 attempts
    RandomApply(ColorJitter(0.4, 0.4, 0.4, 0.1), p=0.8)
    RandomGrayscale(p=0.2)
    RandomApply(GaussianBlur(sigma in [0.1, 2.0]), p=0.5)   ImageNet size only
    RandomHorizontalFlip()
    Normalize(ImageNet mean, std)

keras-cv's `RandomCropAndResize` and `RandomApply` process one image at a time. Here
every random parameter is drawn for the whole batch at once and every operation works on
the batch: crops with one `tf.image.crop_and_resize` over per-image boxes, colour jitter
with per-image factors and a per-image random order (as torchvision draws one), and
`p`-gated steps through per-image masks.

Randomness is stateless: each call takes a seed, so a run is reproducible from
`--seed`, also across `--resume`, and parallel `tf.data` maps do not race on a shared
generator.

Differences from torchvision, all below what the training distribution can notice:
- `SimSiamAugment` (the diagnostics probe's views; training's crops are resized in
  `input/decode.py`, as torchvision does) resamples crops bilinearly with corner-aligned
  sampling (`crop_and_resize`), not with half-pixel centres, and without antialiasing,
  which `crop_and_resize` lacks: the probe crops stored images (the evaluation side R,
  S below 96 px), which a crop shrinks by at most R / S, 1.15. Crop boxes themselves
  are integer pixel boxes drawn exactly as torchvision draws them;
- the blur kernel is a Gaussian truncated at 3 sigma of the largest sigma (PIL's
  GaussianBlur approximates a Gaussian with box filters);
- colour ops work in float and never round to 8 bits between them, where torchvision's
  uint8 path truncates and PIL rounds after each op (PIL's hue also shifts by whole
  1/256 turns): up to a few grey levels apart after the whole jitter
  (tests/test_augment.py measures it against torchvision's own outputs).
"""

from __future__ import annotations

import dataclasses

import keras_cv
import tensorflow as tf

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# ITU-R 601-2 luma, as torchvision's rgb_to_grayscale.
_LUMA = (0.299, 0.587, 0.114)


@dataclasses.dataclass(frozen=True)
class AugmentSpec:
    """Parameters of the SimSiam augmentation. Defaults are the paper's."""

    image_size: int = 32
    crop_scale: tuple[float, float] = (0.2, 1.0)
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip_prob: float = 0.5
    # brightness, contrast, saturation, hue: torchvision ColorJitter arguments.
    jitter: tuple[float, float, float, float] = (0.4, 0.4, 0.4, 0.1)
    jitter_prob: float = 0.8
    grayscale_prob: float = 0.2
    blur_prob: float = 0.0
    blur_sigma: tuple[float, float] = (0.1, 2.0)

    @classmethod
    def for_image_size(cls, image_size: int) -> "AugmentSpec":
        """The paper's recipe: Gaussian blur only at ImageNet-like sizes (>= 96 px)."""
        return cls(image_size=image_size, blur_prob=0.5 if image_size >= 96 else 0.0)


# ---------------------------------------------------------------------------
# Evaluation preprocessing: one function for the kNN monitor, the linear probe and the
# export signature, so training-time evaluation and serving cannot drift apart.


def resize_uint8(images: tf.Tensor, image_size: int) -> tf.Tensor:
    """Resize uint8 images [B, H, W, 3] to [B, S, S, 3] uint8 (bilinear, antialiased).

    Images already at the target size are returned unchanged. Below `CENTER_CROP_FROM`
    this is how images are stored for training and evaluated, so stored and served
    images go through the same resize.
    """
    images = tf.convert_to_tensor(images)
    shape = tf.shape(images)

    def resize():
        out = tf.image.resize(images, (image_size, image_size), antialias=True)
        return tf.cast(tf.clip_by_value(tf.round(out), 0.0, 255.0), tf.uint8)

    same = tf.logical_and(tf.equal(shape[1], image_size), tf.equal(shape[2], image_size))
    out = tf.cond(same, lambda: tf.cast(images, tf.uint8), resize)
    return tf.ensure_shape(out, [None, image_size, image_size, 3])


# From this training size up, evaluation follows the official ImageNet protocol
# (resize the shorter side to S * 256 / 224, centre-crop S) instead of squashing the
# image into a square. Small-image presets (32 px CIFAR, digits) keep the square resize.
CENTER_CROP_FROM = 96


def eval_resize_side(image_size: int) -> int:
    """The shorter side evaluation resizes to: S below 96 px, else round(S * 256 / 224)."""
    if image_size < CENTER_CROP_FROM:
        return image_size
    return int(round(image_size * 256 / 224))


def shorter_side_resize_shape(h, w, side: int):
    """(new_h, new_w), int32, of torchvision's `Resize(side)` on an h x w image.

    torchvision's `_compute_resized_output_size`: the shorter side (the width when
    w <= h) becomes `side`, the longer int(side * long / short). side * long is exact
    and the division rounds once; long * (side / short) rounds twice and can land one
    pixel short (147 x 98 at 256: 383, not 384). A shorter side already at `side`
    gives the image's own size. `h` and `w` may be tensors of any equal shape.
    """
    h, w = tf.cast(h, tf.int32), tf.cast(w, tf.int32)
    short = tf.minimum(h, w)
    longer = lambda n: tf.cast(
        tf.cast(n, tf.float64) * float(side) / tf.cast(short, tf.float64), tf.int32
    )
    width_is_short = w <= h
    new_h = tf.where(width_is_short, longer(h), side)
    new_w = tf.where(width_is_short, side, longer(w))
    return new_h, new_w


def resize_shorter_center_crop(images: tf.Tensor, side: int, crop: int) -> tf.Tensor:
    """uint8 [B, H, W, 3] -> [B, crop, crop, 3]: shorter side to `side`, then the centre.

    As torchvision's `Resize(side)` (shorter side, aspect kept, antialiased bilinear;
    the longer side is int(side * long / short)) then `CenterCrop(crop)` (offsets
    int(round((size - crop) / 2))).
    """
    images = tf.convert_to_tensor(images)
    shape = tf.shape(images)
    h, w = shape[1], shape[2]
    new_h, new_w = shorter_side_resize_shape(h, w, side)
    new_h, new_w = tf.maximum(new_h, crop), tf.maximum(new_w, crop)

    def resize():
        out = tf.image.resize(images, tf.stack([new_h, new_w]), antialias=True)
        return tf.cast(tf.clip_by_value(tf.round(out), 0.0, 255.0), tf.uint8)

    same = tf.logical_and(tf.equal(h, new_h), tf.equal(w, new_w))
    resized = tf.cond(same, lambda: tf.cast(images, tf.uint8), resize)
    top = tf.cast(tf.round(tf.cast(new_h - crop, tf.float32) / 2.0), tf.int32)
    left = tf.cast(tf.round(tf.cast(new_w - crop, tf.float32) / 2.0), tf.int32)
    out = resized[:, top : top + crop, left : left + crop]
    return tf.ensure_shape(out, [None, crop, crop, 3])


def eval_resize_uint8(images: tf.Tensor, image_size: int) -> tf.Tensor:
    """The evaluation resize: uint8 [B, H, W, 3] of any size -> uint8 [B, S, S, 3].

    Below 96 px a plain resize to S x S (`resize_uint8`); from 96 px the official
    protocol, shorter side to round(S * 256 / 224) then the centre S x S.
    """
    if image_size < CENTER_CROP_FROM:
        return resize_uint8(images, image_size)
    return resize_shorter_center_crop(images, eval_resize_side(image_size), image_size)


def storage_resize_uint8(images: tf.Tensor, image_size: int) -> tf.Tensor:
    """How the in-memory path stores an image for training at `image_size`.

    Below 96 px the square resize (the training crops are drawn on it, as always).
    From 96 px the centre square at the evaluation side (round(S * 256 / 224)), aspect
    kept, so that `eval_resize_uint8` of the stored image is the evaluation of the
    original; the crops drawn on it miss the edges of the longer side, which is why
    `--input auto` streams such datasets (docs/data.md).
    """
    if image_size < CENTER_CROP_FROM:
        return resize_uint8(images, image_size)
    side = eval_resize_side(image_size)
    return resize_shorter_center_crop(images, side, side)


def normalize(images: tf.Tensor) -> tf.Tensor:
    """Map float images in [0, 1] to the model's input: (x - mean) / std, ImageNet stats."""
    mean = tf.constant(IMAGENET_MEAN, tf.float32)
    std = tf.constant(IMAGENET_STD, tf.float32)
    return (tf.cast(images, tf.float32) - mean) / std


def eval_preprocess(images: tf.Tensor, image_size: int) -> tf.Tensor:
    """uint8 [B, H, W, 3] of any size -> float32 [B, S, S, 3], normalised model input.

    The one evaluation preprocessing: the kNN monitor, the linear probe, `evaluate.py`
    and the exported serving signatures all call it.
    """
    return normalize(tf.cast(eval_resize_uint8(images, image_size), tf.float32) / 255.0)


# ---------------------------------------------------------------------------
# Pure, batched operations. Images are float32 in [0, 1], [B, H, W, 3]; per-image
# parameters are vectors of length B.


def sample_crop_boxes(seed, batch_size, height, width, scale, ratio, attempts=10):
    """Draw torchvision RandomResizedCrop boxes for a batch.

    For each image: up to `attempts` tries of area ~ U(scale) * H * W and
    log(aspect) ~ U(log ratio); the first box that fits is used; if none fits, the
    centre crop of the largest box with aspect clamped to `ratio`.

    Returns:
        int32 [B, 4]: top, left, crop height, crop width, in pixels.
    """
    s_area, s_ratio, s_top, s_left = tf.unstack(
        tf.random.experimental.stateless_split(seed, 4)
    )
    h_f = tf.cast(height, tf.float32)
    w_f = tf.cast(width, tf.float32)
    area = h_f * w_f * tf.random.stateless_uniform(
        [batch_size, attempts], s_area, scale[0], scale[1]
    )
    log_r = tf.random.stateless_uniform(
        [batch_size, attempts],
        s_ratio,
        tf.math.log(float(ratio[0])),
        tf.math.log(float(ratio[1])),
    )
    aspect = tf.exp(log_r)
    # Python's round() in torchvision rounds half to even, as tf.round does.
    w = tf.round(tf.sqrt(area * aspect))
    h = tf.round(tf.sqrt(area / aspect))
    fits = (w > 0) & (w <= w_f) & (h > 0) & (h <= h_f)
    any_fit = tf.reduce_any(fits, axis=1)
    first = tf.argmax(tf.cast(fits, tf.int32), axis=1, output_type=tf.int32)
    w = tf.gather(w, first, batch_dims=1)
    h = tf.gather(h, first, batch_dims=1)

    # Fallback: the whole image, cut to the nearest allowed aspect ratio, centred.
    in_ratio = w_f / h_f
    if_narrow = (w_f, tf.round(w_f / ratio[0]))
    if_wide = (tf.round(h_f * ratio[1]), h_f)
    fb_w, fb_h = tf.cond(
        in_ratio < ratio[0],
        lambda: if_narrow,
        lambda: tf.cond(in_ratio > ratio[1], lambda: if_wide, lambda: (w_f, h_f)),
    )
    w = tf.where(any_fit, w, fb_w)
    h = tf.where(any_fit, h, fb_h)
    # torch.randint(0, H - h + 1): uniform over the valid integer offsets.
    top_u = tf.random.stateless_uniform([batch_size], s_top)
    left_u = tf.random.stateless_uniform([batch_size], s_left)
    top = tf.where(any_fit, tf.floor(top_u * (h_f - h + 1)), tf.floor((h_f - h) / 2))
    left = tf.where(any_fit, tf.floor(left_u * (w_f - w + 1)), tf.floor((w_f - w) / 2))
    return tf.cast(tf.stack([top, left, h, w], axis=1), tf.int32)


def crop_resize_flip(images, boxes, flips, size):
    """Crop pixel `boxes` out of `images`, resize to `size`, mirror where `flips`.

    Args:
        images: [B, H, W, 3], any real or uint8 dtype.
        boxes: int32 [B, 4] (top, left, height, width), from `sample_crop_boxes`.
        flips: bool [B].
    Returns:
        float32 [B, size, size, 3] in the input's value range.
    """
    shape = tf.shape(images)
    h_den = tf.cast(tf.maximum(shape[1] - 1, 1), tf.float32)
    w_den = tf.cast(tf.maximum(shape[2] - 1, 1), tf.float32)
    top, left, h, w = tf.unstack(tf.cast(boxes, tf.float32), axis=1)
    y1, y2 = top / h_den, (top + h - 1) / h_den
    x1, x2 = left / w_den, (left + w - 1) / w_den
    # crop_and_resize mirrors a crop whose x1 > x2: the flip costs nothing.
    x1, x2 = tf.where(flips, x2, x1), tf.where(flips, x1, x2)
    return tf.image.crop_and_resize(
        images,
        tf.stack([y1, x1, y2, x2], axis=1),
        tf.range(shape[0]),
        (size, size),
        method="bilinear",
    )


def _per_image(factor):
    return tf.reshape(factor, [-1, 1, 1, 1])


def grayscale(images):
    """Luma of [B, H, W, 3] float images, [B, H, W, 1]."""
    return tf.reduce_sum(images * tf.constant(_LUMA, images.dtype), -1, keepdims=True)


grayscale_ = grayscale  # for functions whose argument is called `grayscale`


def adjust_brightness(images, factor):
    """torchvision adjust_brightness: x * f, clipped to [0, 1]."""
    return tf.clip_by_value(images * _per_image(factor), 0.0, 1.0)


def adjust_contrast(images, factor):
    """torchvision adjust_contrast: blend with the mean luma of each image."""
    mean = tf.reduce_mean(grayscale(images), axis=[1, 2, 3], keepdims=True)
    f = _per_image(factor)
    return tf.clip_by_value(f * images + (1.0 - f) * mean, 0.0, 1.0)


def adjust_saturation(images, factor):
    """torchvision adjust_saturation: blend with the per-pixel luma."""
    f = _per_image(factor)
    return tf.clip_by_value(f * images + (1.0 - f) * grayscale(images), 0.0, 1.0)


def adjust_hue(images, delta):
    """torchvision adjust_hue: rotate hue by `delta` turns, in HSV."""
    hsv = tf.image.rgb_to_hsv(images)
    h = tf.math.floormod(hsv[..., 0] + tf.reshape(delta, [-1, 1, 1]), 1.0)
    return tf.image.hsv_to_rgb(tf.stack([h, hsv[..., 1], hsv[..., 2]], axis=-1))


_JITTER_OPS = (adjust_brightness, adjust_contrast, adjust_saturation, adjust_hue)


def _jitter_stage(images, factors, op):
    """One stage of `color_jitter`: every op on the whole batch, each image keeps its own."""
    outs = [fn(images, factors[:, k]) for k, fn in enumerate(_JITTER_OPS)]
    op = _per_image(op)
    return tf.where(op == 0, outs[0], tf.where(op == 1, outs[1], tf.where(op == 2, outs[2], outs[3])))


# One XLA cluster per stage: XLA fuses a stage's element-wise ops into one pass over
# memory, 5-10x faster on CPU than TensorFlow's separate kernels (hue above all). The
# stages are separate calls because fusing all four duplicates work exponentially.
_jitter_stage_xla = tf.function(_jitter_stage, jit_compile=True)


def _mix(x, jittered, jitter, gray):
    """The jittered image where `jitter`, then grayscale where `gray` (bool [B])."""
    x = tf.where(_per_image(jitter), jittered, x)
    return tf.where(_per_image(gray), tf.tile(grayscale(x), [1, 1, 1, 3]), x)


# Each of these is one fused pass over the batch instead of three to five.
_scale_xla = tf.function(lambda x: x / 255.0, jit_compile=True)
_mix_xla = tf.function(_mix, jit_compile=True)
_mix_normalize_xla = tf.function(lambda x, j, jm, gm: normalize(_mix(x, j, jm, gm)), jit_compile=True)
_blur_xla = tf.function(lambda x, sigma, radius: gaussian_blur(x, sigma, radius), jit_compile=True)
_select_normalize_xla = tf.function(lambda x, b, bm: normalize(tf.where(_per_image(bm), b, x)), jit_compile=True)


def _to_uint8(x):
    """Whole grey levels, as torchvision holds an augmented image (and `_photometric_image`)."""
    return tf.cast(tf.round(tf.clip_by_value(x, 0.0, 1.0) * 255.0), tf.uint8)


_mix_uint8_xla = tf.function(lambda x, j, jm, gm: _to_uint8(_mix(x, j, jm, gm)), jit_compile=True)
_select_uint8_xla = tf.function(lambda x, b, bm: _to_uint8(tf.where(_per_image(bm), b, x)), jit_compile=True)


def color_jitter(images, factors, order, xla=True):
    """torchvision ColorJitter with per-image factors and a per-image order.

    Args:
        images: float32 [B, H, W, 3] in [0, 1].
        factors: float32 [B, 4]: brightness, contrast, saturation factors and hue delta.
        order: int32 [B, 4]: a permutation of (0, 1, 2, 3) per image, indexing the ops.
        xla: compile each stage with XLA (same result to float32 round-off).

    At each of the four stages every op runs on the whole batch and each image keeps
    the result of its own op: four times the arithmetic of running each op only on its
    images, but with static shapes, which XLA needs.
    """
    stage = _jitter_stage_xla if xla else _jitter_stage
    for k in range(4):
        images = stage(images, factors, order[:, k])
    return images


def gaussian_blur(images, sigma, radius):
    """Separable Gaussian blur with a per-image sigma and reflected borders.

    Args:
        images: float32 [B, H, W, C].
        sigma: float32 [B], in pixels.
        radius: int, the kernel half-width (kernel size 2 * radius + 1).

    Each pass is a sum of 2 * radius + 1 shifted copies weighted per image; compiled
    with XLA (`_blur_xla`) this is one fused loop per direction, 1.7x faster on CPU than
    a depthwise convolution over the batch folded into channels.
    """
    taps = tf.range(-radius, radius + 1, dtype=tf.float32)
    kernel = tf.exp(-0.5 * tf.square(taps[None, :] / sigma[:, None]))
    kernel /= tf.reduce_sum(kernel, axis=1, keepdims=True)  # [B, K]
    height, width = tf.shape(images)[1], tf.shape(images)[2]
    padded = tf.pad(images, [[0, 0], [radius, radius], [0, 0], [0, 0]], mode="REFLECT")
    rows = sum(_per_image(kernel[:, i]) * padded[:, i : i + height] for i in range(2 * radius + 1))
    padded = tf.pad(rows, [[0, 0], [0, 0], [radius, radius], [0, 0]], mode="REFLECT")
    return sum(_per_image(kernel[:, i]) * padded[:, :, i : i + width] for i in range(2 * radius + 1))


# ---------------------------------------------------------------------------
# Random parameters and the photometric half of the recipe (flip, colour jitter,
# grayscale, blur, normalisation), in two equivalent forms: batched, for the in-memory
# path and for accelerators, and per image, for the streaming path's parallel map and
# for CPU replicas. Given the same parameters both give the same view (tested).


def draw_params(seed, batch_size, spec: AugmentSpec, shape=None) -> dict:
    """Every random parameter of one view of `batch_size` images, from a stateless seed.

    Args:
        seed: int64 [2].
        shape: the images' shape [B, H, W, C]; crop boxes are drawn only when given.
    Returns:
        dict of per-image tensors: boxes (int32 [B, 4], with `shape`), flip, jitter,
        grayscale, blur (bool [B]), jitter_factors (float32 [B, 4]: brightness,
        contrast, saturation factors and hue delta), jitter_order (int32 [B, 4], a
        permutation of the four ops), blur_sigma (float32 [B]).
    """
    seeds = tf.unstack(tf.random.experimental.stateless_split(tf.cast(seed, tf.int64), 8))

    def coin(seed, p):
        return tf.random.stateless_uniform([batch_size], seed) < p

    b, c, s, h = spec.jitter
    low = tf.constant([max(0.0, 1 - b), max(0.0, 1 - c), max(0.0, 1 - s), -h])
    high = tf.constant([1 + b, 1 + c, 1 + s, h])
    unit = tf.random.stateless_uniform([batch_size, 4], seeds[2])
    order = tf.argsort(tf.random.stateless_uniform([batch_size, 4], seeds[3]), axis=1)
    params = {
        "flip": coin(seeds[1], spec.flip_prob),
        "jitter_factors": low + unit * (high - low),
        "jitter_order": tf.cast(order, tf.int32),
        "jitter": coin(seeds[4], spec.jitter_prob),
        "grayscale": coin(seeds[5], spec.grayscale_prob),
        "blur": coin(seeds[6], spec.blur_prob),
        "blur_sigma": tf.random.stateless_uniform([batch_size], seeds[7], spec.blur_sigma[0], spec.blur_sigma[1]),
    }
    if shape is not None:
        params["boxes"] = sample_crop_boxes(seeds[0], batch_size, shape[1], shape[2], spec.crop_scale, spec.crop_ratio)
    return params


PHOTOMETRIC_KEYS = ("flip", "jitter_factors", "jitter_order", "jitter", "grayscale", "blur", "blur_sigma")


def blur_radius(spec: AugmentSpec) -> int:
    """The blur kernel's half-width: 3 sigma of the largest sigma."""
    return int(round(3 * spec.blur_sigma[1]))


def _photometric_batch(x, t, spec: AugmentSpec, uint8_out: bool = False):
    """Jitter, grayscale, blur and normalisation of float views in [0, 1] (flip done);
    with `uint8_out`, rounded to whole grey levels instead of normalised."""
    jittered = color_jitter(x, t["jitter_factors"], t["jitter_order"])
    if spec.blur_prob > 0:
        x = _mix_xla(x, jittered, t["jitter"], t["grayscale"])
        blurred = _blur_xla(x, t["blur_sigma"], blur_radius(spec))
        return (_select_uint8_xla if uint8_out else _select_normalize_xla)(x, blurred, t["blur"])
    return (_mix_uint8_xla if uint8_out else _mix_normalize_xla)(x, jittered, t["jitter"], t["grayscale"])


def photometric_batch(views, params: dict, spec: AugmentSpec, uint8_out: bool = False):
    """The photometric half on a batch of crops: uint8 or float [B, S, S, 3] in 0..255
    -> float32 [B, S, S, 3], normalised (or, with `uint8_out`, uint8 before the
    normalisation, as `photometric_image`). Every op runs on the whole batch (static
    shapes, what accelerators and XLA want); an image's skipped steps are masked out.
    """
    views = tf.convert_to_tensor(views)
    flipped = tf.where(tf.reshape(params["flip"], [-1, 1, 1, 1]), tf.reverse(views, [2]), views)
    return _photometric_batch(_scale_xla(tf.cast(flipped, tf.float32)), params, spec, uint8_out)


def _photometric_image(view, flip, jitter_factors, jitter_order, jitter, grayscale, blur, blur_sigma, radius,
                       uint8_out=False):
    x = tf.cast(view, tf.float32) / 255.0
    x = tf.cond(flip, lambda: tf.reverse(x, [1]), lambda: x)

    def jitter_all(x):
        for k in range(4):
            x = tf.switch_case(
                jitter_order[k],
                [lambda op=op, i=i: op(x[None], jitter_factors[None, i])[0] for i, op in enumerate(_JITTER_OPS)],
            )
        return x

    x = tf.cond(jitter, lambda: jitter_all(x), lambda: x)
    x = tf.cond(grayscale, lambda: tf.tile(grayscale_(x), [1, 1, 3]), lambda: x)
    if radius:
        x = tf.cond(blur, lambda: gaussian_blur(x[None], blur_sigma[None], radius)[0], lambda: x)
    if uint8_out:  # rounded to whole grey levels, as torchvision holds an augmented image
        return tf.cast(tf.round(tf.clip_by_value(x, 0.0, 1.0) * 255.0), tf.uint8)
    return normalize(x)


# One XLA program per view: each image runs only the steps it draws (a conditional per
# step), where the batched form computes every jitter op at each of the four stages.
# On CPU this is 3x faster than the batched form at 224 px.
_photometric_image_xla = tf.function(_photometric_image, jit_compile=True)


def photometric_image(view, params: dict, spec: AugmentSpec, uint8_out: bool = False):
    """The photometric half on one crop: uint8 [S, S, 3] -> float32 [S, S, 3], normalised.

    `params` holds one image's parameters (scalars and vectors, as `draw_params(seed,
    1, spec)` row 0). Same result as `photometric_batch` on that image. With
    `uint8_out`, the augmented image before normalisation, rounded to uint8 (what the
    tf.data service sends: a quarter of the bytes; `SimSiam.train_step` normalises it).
    """
    radius = blur_radius(spec) if spec.blur_prob > 0 else 0
    return _photometric_image_xla(view, *(params[k] for k in PHOTOMETRIC_KEYS), radius, uint8_out)


def image_params(seed, spec: AugmentSpec) -> dict:
    """One image's photometric parameters (row 0 of `draw_params(seed, 1, spec)`)."""
    return {k: v[0] for k, v in draw_params(seed, 1, spec).items()}


# ---------------------------------------------------------------------------
# The keras-cv layer.


class SimSiamAugment(keras_cv.layers.VectorizedBaseImageAugmentationLayer):
    """One SimSiam view of a batch: uint8 [B, H, W, 3] -> float32 [B, S, S, 3], normalised.

    Call it twice with different seeds on the same batch to get the two views:

        augment = SimSiamAugment(AugmentSpec(image_size=32))
        seed1, seed2 = tf.unstack(tf.random.experimental.stateless_split([0, step], 2))
        x1, x2 = augment(images, seed=seed1), augment(images, seed=seed2)

    `seed` is a shape-[2] integer tensor; equal seeds give equal views.
    """

    def __init__(self, spec: AugmentSpec, **kwargs):
        super().__init__(**kwargs)
        self.spec = spec
        self._call_seed = None

    def call(self, images, seed, offset=0, total=None):
        """Augment `images`; with `total`, they are rows offset..offset+B of a batch of `total`.

        The random parameters are drawn for the whole batch of `total` images and the
        rows of this slice are used, so a worker that augments only its share of a
        global batch gets exactly the views a single process would have made.
        """
        # keras-cv hands get_random_transformation_batch only the images, so this
        # call's seed and slice ride on the layer while the call is traced.
        self._call_seed = tf.cast(seed, tf.int64)
        self._call_slice = (offset, total)
        try:
            return super().call(images)
        finally:
            self._call_seed = None
            self._call_slice = (0, None)

    def get_random_transformation_batch(self, batch_size, images=None, **kwargs):
        offset, total = getattr(self, "_call_slice", (0, None))
        if total is None:
            return draw_params(self._call_seed, batch_size, self.spec, tf.shape(images))
        drawn = draw_params(self._call_seed, total, self.spec, tf.shape(images))
        return {k: v[offset : offset + batch_size] for k, v in drawn.items()}

    def augment_images(self, images, transformations, **kwargs):
        t = transformations
        x = _scale_xla(crop_resize_flip(images, t["boxes"], t["flip"], self.spec.image_size))
        return _photometric_batch(x, t, self.spec)

    def compute_output_shape(self, input_shape):
        return (input_shape[0], self.spec.image_size, self.spec.image_size, 3)

    def get_config(self):
        config = super().get_config()
        config["spec"] = dataclasses.asdict(self.spec)
        return config

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        spec = {k: tuple(v) if isinstance(v, list) else v for k, v in config.pop("spec").items()}
        return cls(AugmentSpec(**spec), **config)


class SimSiamCrop(SimSiamAugment):
    """Only the crop of `SimSiamAugment`: uint8 [B, H, W, 3] -> uint8 crops [B, S, S, 3].

    The boxes are those `SimSiamAugment` draws for the same seed; flip and the colour
    steps are left to `ViewAugment` (what `--augment-on device` runs in `train_step`).
    """

    def augment_images(self, images, transformations, **kwargs):
        boxes = transformations["boxes"]
        crops = crop_resize_flip(images, boxes, tf.zeros_like(transformations["flip"]), self.spec.image_size)
        return tf.cast(tf.clip_by_value(tf.round(crops), 0.0, 255.0), tf.uint8)


class ViewAugment(keras_cv.layers.VectorizedBaseImageAugmentationLayer):
    """The rest of a view once its crop is made: uint8 crops [B, S, S, 3] -> float32
    [B, S, S, 3], flipped, colour-jittered, grayscaled, blurred and normalised as
    `SimSiamAugment` does after cropping, from the same parameter distribution.

    This is what `--augment-on device` runs inside `train_step`, on each replica's
    device, while tf.data only decodes and crops. `per_image` picks the execution:
    one conditional XLA program per image (fast on CPU, where skipping the steps an
    image does not draw matters) or the batched form (accelerators). None chooses
    per image when the machine has no GPU or TPU. Both give the same views.
    """

    def __init__(self, spec: AugmentSpec, per_image: bool | None = None, **kwargs):
        super().__init__(**kwargs)
        self.spec = spec
        if per_image is None:
            per_image = not (tf.config.list_physical_devices("GPU") or tf.config.list_physical_devices("TPU"))
        self.per_image = per_image
        self._call_seed = None

    def call(self, images, seed):
        self._call_seed = tf.cast(seed, tf.int64)
        try:
            return super().call(images)
        finally:
            self._call_seed = None

    def get_random_transformation_batch(self, batch_size, images=None, **kwargs):
        return draw_params(self._call_seed, batch_size, self.spec)

    def augment_images(self, images, transformations, **kwargs):
        if not self.per_image:
            return photometric_batch(images, transformations, self.spec)
        radius = blur_radius(self.spec) if self.spec.blur_prob > 0 else 0
        size = self.spec.image_size
        return tf.map_fn(
            lambda args: _photometric_image_xla(*args, radius),
            (images, *(transformations[k] for k in PHOTOMETRIC_KEYS)),
            fn_output_signature=tf.TensorSpec([size, size, 3], tf.float32),
            parallel_iterations=16,
        )

    def compute_output_shape(self, input_shape):
        return (input_shape[0], self.spec.image_size, self.spec.image_size, 3)

    def get_config(self):
        config = super().get_config()
        config["spec"] = dataclasses.asdict(self.spec)
        config["per_image"] = self.per_image
        return config

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        spec = {k: tuple(v) if isinstance(v, list) else v for k, v in config.pop("spec").items()}
        return cls(AugmentSpec(**spec), **config)


def two_views(augment: SimSiamAugment, images: tf.Tensor, seed: tf.Tensor, offset=0, total=None):
    """Both SimSiam views of one batch of images (or of rows offset.. of a batch of `total`)."""
    seed1, seed2 = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
    return (
        augment(images, seed=seed1, offset=offset, total=total),
        augment(images, seed=seed2, offset=offset, total=total),
    )


def naive_keras_cv_augment(spec: AugmentSpec, seed: int = 0):
    """The straightforward keras-cv composition of the recipe, for benchmarks only.

    `RandomCropAndResize` and `RandomApply` process one image at a time, and keras-cv's
    colour jitter parameterises brightness additively; this is the baseline the
    vectorised layer is measured against, not a faithful copy of the recipe.
    """
    layers = keras_cv.layers
    return keras_cv.layers.Augmenter(
        [
            layers.RandomCropAndResize(
                (spec.image_size, spec.image_size),
                crop_area_factor=spec.crop_scale,
                aspect_ratio_factor=spec.crop_ratio,
                seed=seed,
            ),
            layers.RandomFlip("horizontal", seed=seed),
            layers.RandomApply(
                layers.RandomColorJitter(
                    value_range=(0, 255),
                    brightness_factor=spec.jitter[0],
                    contrast_factor=spec.jitter[1],
                    saturation_factor=(0.5 - spec.jitter[2] / 2, 0.5 + spec.jitter[2] / 2),
                    hue_factor=spec.jitter[3],
                    seed=seed,
                ),
                rate=spec.jitter_prob,
                seed=seed,
            ),
            layers.RandomApply(
                layers.Grayscale(output_channels=3), rate=spec.grayscale_prob, seed=seed
            ),
        ]
    )
