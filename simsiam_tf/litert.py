"""Export the encoder to LiteRT (.tflite), for devices that run no TensorFlow.

Layout written (its own base path, beside the SavedModel's, never inside it):

    EXPORT_DIR/N/model.tflite, simsiam_export.json

The contract of model.tflite (one signature, `serving_default`):

- input `images`: uint8 [N, S, S, 3], RGB, S the training size (`image_size` in
  simsiam_export.json). The images are already decoded and resized exactly as the
  SavedModel's `serving_default` does it: `prepare_image` below does that with
  NumPy, simplejpeg (JPEG) and Pillow (PNG), pixel for pixel.
- inside: x / 255, then (x - ImageNet mean) / ImageNet std (`augment.normalize`),
  then the encoder, in float32. The same steps `augment.eval_preprocess` takes
  after its resize.
- output `embedding`: float32 [N, D], the backbone features (or the projection),
  l2-normalised when exported with `normalize`.

Why pixels, not bytes: LiteRT's builtin ops cannot decode JPEG or PNG (that needs
the Flex delegate, i.e. TensorFlow's kernels on the device), and the antialiased
resize (`ScaleAndTranslate`) has no builtin either. A device decodes with its own
image library and calls `prepare_image`'s steps.

Why a separate base path: TF Serving and `serving/local_server.py` treat every
integer directory of their base path as a SavedModel version. A version holding
only model.tflite would be a failed load there, so a LiteRT export refuses a
directory that holds SavedModel versions.

The model always computes in float32: a bfloat16- or float16-trained run's weights
are float32 variables, copied into a float32 network (LiteRT's CPU kernels have no
bfloat16). Such a run's SavedModel computes in its training precision, so its
embeddings differ from the .tflite's by that rounding; the 1e-4 parity
(tests/test_litert.py) is for float32 runs.

`quantize="dynamic"` is LiteRT's dynamic-range quantisation
(`tf.lite.Optimize.DEFAULT` without a representative dataset): weights stored as
int8, activations quantised on the fly; about 4x smaller.

This module imports TensorFlow only inside the functions that convert, so
`prepare_image` and `LiteRTEncoder` run with NumPy, simplejpeg, Pillow and
ai-edge-litert alone.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import tempfile

import numpy as np

MODEL_FILE = "model.tflite"
METADATA_FILE = "simsiam_export.json"
QUANTIZE = ("none", "dynamic")
SIGNATURE = "serving_default"
INSTALL = "pip install ai-edge-litert==2.3.0"
INSTALL_JPEG = "pip install simplejpeg==1.9.0"

# augment.CENTER_CROP_FROM and augment.eval_resize_side, without importing TensorFlow
# (tests/test_litert.py checks that the pixels match the SavedModel's path).
_CENTER_CROP_FROM = 96


def _eval_resize_side(image_size: int) -> int:
    return image_size if image_size < _CENTER_CROP_FROM else int(round(image_size * 256 / 224))


# ---------------------------------------------------------------------------
# The device side: NumPy, simplejpeg, Pillow and ai-edge-litert.


def decode(data: bytes) -> np.ndarray:
    """JPEG or PNG bytes -> uint8 [H, W, 3] RGB, equal to `tf.io.decode_image(channels=3)`.

    JPEG: TensorFlow decodes with libjpeg-turbo's fast integer DCT (JDCT_IFAST) and
    fancy upsampling. Pillow always uses the accurate DCT, a few levels off in most
    pixels (up to 4 measured) and 0.04 off in the embedding, so JPEG goes through
    simplejpeg (libjpeg-turbo, `fastdct=True`). PNG: Pillow; alpha is dropped and grey
    repeated, as TensorFlow does. EXIF orientation is ignored, as TensorFlow ignores it.
    """
    if data[:3] == b"\xff\xd8\xff":
        try:
            import simplejpeg
        except ImportError:
            raise ImportError(f"simplejpeg is not installed; install it with `{INSTALL_JPEG}`") from None
        return simplejpeg.decode_jpeg(data, colorspace="RGB", fastdct=True, fastupsample=False)
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        if im.format != "PNG":
            raise ValueError(f"expected JPEG or PNG bytes, got {im.format}; convert the image to PNG first")
        if im.mode in ("I;16", "I;16B", "I", "F"):
            raise ValueError(f"16-bit PNG (mode {im.mode}) is not supported here; save it as 8-bit PNG first")
        return np.asarray(im.convert("RGB"), dtype=np.uint8)


def _spans(out_size: int, in_size: int):
    """Start and weights of each output pixel of TensorFlow's antialiased bilinear resize.

    float32 step for step as `ComputeSpansCore` in TensorFlow's
    kernels/image/scale_and_translate_op.cc (triangle kernel, antialias, no
    translation), with the scale `tf.image.resize` passes (out / in in float32).
    """
    f = np.float32
    scale = f(out_size) / f(in_size)
    inv_scale = f(1.0 / np.float64(scale))
    kernel_scale = max(inv_scale, f(1.0))
    one_over_kernel_scale = f(f(1.0) / kernel_scale)
    span_size = min(2 * int(np.ceil(kernel_scale)) + 1, in_size)
    starts = np.zeros(out_size, np.int64)
    weights = np.zeros((out_size, span_size), np.float32)
    for x in range(out_size):
        sample = f(f(x + 0.5) * inv_scale) + f(-0.0)
        if sample < 0 or sample > in_size:
            continue
        start = int(np.ceil(f(f(sample - kernel_scale) - f(0.5))))
        end = int(np.floor(f(f(sample + kernel_scale) - f(0.5))))
        start = min(max(start, 0), in_size - 1)
        end = min(max(end, 0), in_size - 1) + 1
        ws = []
        total = f(0.0)
        for source in range(start, end):
            pos = f(f(f(source) + f(0.5)) - sample)
            d = abs(f(pos * one_over_kernel_scale))
            w = f(1.0) - d if d < 1.0 else f(0.0)
            total = f(total + w)
            ws.append(f(w))
        if abs(total) >= 1000.0 * np.finfo(np.float32).tiny:
            inv = f(f(1.0) / total)
            weights[x, : len(ws)] = [f(w * inv) for w in ws]
        starts[x] = start
    return starts, weights


def _gather(image: np.ndarray, starts, weights, axis: int) -> np.ndarray:
    """Weighted sums along `axis` (0 rows, 1 columns), accumulated in float32 in
    TensorFlow's order (`GatherRows`, `GatherColumns`: one span pixel after another)."""
    x = np.moveaxis(image.astype(np.float32), axis, 0)
    out = np.zeros((len(starts),) + x.shape[1:], np.float32)
    span = weights.shape[1]
    for i, (s, w) in enumerate(zip(starts, weights)):
        real = min(s + span, x.shape[0]) - s
        acc = np.zeros(x.shape[1:], np.float32)
        for j in range(real):
            acc = acc + w[j] * x[s + j]
        out[i] = acc
    return np.moveaxis(out, 0, axis)


def resize(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """uint8 [H, W, 3] -> uint8 [height, width, 3], as augment.py's resizes do it:
    `tf.image.resize(..., antialias=True)` (bilinear), rounded half to even, clipped.
    An image already at that size is returned unchanged."""
    if image.shape[:2] == (height, width):
        return image
    rows = _gather(image, *_spans(height, image.shape[0]), axis=0)
    out = _gather(rows, *_spans(width, image.shape[1]), axis=1)
    return np.clip(np.round(out), 0, 255).astype(np.uint8)


def prepare_pixels(image: np.ndarray, image_size: int) -> np.ndarray:
    """uint8 [H, W, 3] -> uint8 [S, S, 3]: the SavedModel's resize of a decoded image.

    Below 96 px: squash to S x S (`augment.resize_uint8`). From 96 px: shorter side to
    round(S * 256 / 224), aspect kept (the longer side int(side * long / short)),
    then the centre S x S (`augment.storage_resize_uint8`, then
    `augment.eval_resize_uint8`).
    """
    if image_size < _CENTER_CROP_FROM:
        return resize(image, image_size, image_size)
    side = _eval_resize_side(image_size)
    h, w = image.shape[:2]
    short = min(h, w)
    new_h, new_w = (h * side // short, side) if w <= h else (side, w * side // short)
    new_h, new_w = max(new_h, side), max(new_w, side)
    out = resize(image, new_h, new_w)
    for crop in (side, image_size):  # the stored square, then the evaluation crop
        h, w = out.shape[:2]
        top = int(np.round(np.float32(h - crop) / np.float32(2.0)))
        left = int(np.round(np.float32(w - crop) / np.float32(2.0)))
        out = out[top : top + crop, left : left + crop]
    return out


def prepare_image(path_or_bytes, image_size: int) -> np.ndarray:
    """A JPEG or PNG file (path or bytes) -> the uint8 [S, S, 3] model.tflite takes."""
    if isinstance(path_or_bytes, (bytes, bytearray)):
        data = bytes(path_or_bytes)
    else:
        with open(path_or_bytes, "rb") as f:
            data = f.read()
    return prepare_pixels(decode(data), image_size)


def _interpreter_class():
    try:
        from ai_edge_litert.interpreter import Interpreter
    except ImportError:
        raise ImportError(f"ai-edge-litert is not installed; install it with `{INSTALL}`") from None
    return Interpreter


class LiteRTEncoder:
    """model.tflite through ai-edge-litert: uint8 [N, S, S, 3] -> float32 [N, D]."""

    def __init__(self, model_path: str, num_threads: int | None = None):
        self.interpreter = _interpreter_class()(model_path=model_path, num_threads=num_threads)
        self.runner = self.interpreter.get_signature_runner(SIGNATURE)
        (self.input_name,) = self.runner.get_input_details()
        self.image_size = int(self.runner.get_input_details()[self.input_name]["shape"][1])

    def __call__(self, images: np.ndarray) -> np.ndarray:
        images = np.ascontiguousarray(images, dtype=np.uint8)
        if images.ndim != 4 or images.shape[1:] != (self.image_size, self.image_size, 3):
            raise ValueError(
                f"expected uint8 [N, {self.image_size}, {self.image_size}, 3], got {list(images.shape)}; "
                f"prepare each image with simsiam_tf.litert.prepare_image(path, {self.image_size})"
            )
        return self.runner(**{self.input_name: images})["embedding"]


# ---------------------------------------------------------------------------
# The conversion side: TensorFlow.


def pixels_function(model, config, output: str = "features", normalize: bool = False):
    """The traced function converted: uint8 [None, S, S, 3] -> {"embedding": float32 [None, D]}.
    `model` computes in float32 (`export.float32_twin`)."""
    import tensorflow as tf

    from simsiam_tf import augment as aug
    from simsiam_tf.export import encoder_fn

    encode = encoder_fn(model, output, normalize)
    size = config.image_size

    @tf.function(input_signature=[tf.TensorSpec([None, size, size, 3], tf.uint8, name="images")])
    def serve(images):
        # eval_preprocess after its resize: the images arrive at S x S.
        return {"embedding": encode(aug.normalize(tf.cast(images, tf.float32) / 255.0))}

    return serve


def convert(model, config, output: str = "features", normalize: bool = False, quantize: str = "none"):
    """(the .tflite flatbuffer, the embedding dimension); builtin ops only (no Flex,
    so no TensorFlow on the device)."""
    import tensorflow as tf

    from simsiam_tf.config import UsageError

    if quantize not in QUANTIZE:
        raise UsageError(f"--quantize {quantize!r}: choose none or dynamic")
    from simsiam_tf.export import float32_twin

    model = float32_twin(model, config)
    serve = pixels_function(model, config, output, normalize)
    dim = int(serve.get_concrete_function().structured_outputs["embedding"].shape[-1])
    # Through a SavedModel, because its converter freezes the variables into constants;
    # from_concrete_functions keeps Keras 3's variables as READ_VARIABLE ops that
    # nothing initialises on the device (every output NaN).
    import keras

    archive = keras.export.ExportArchive()
    archive.track(model.backbone)
    archive.track(model.projector)
    archive.add_endpoint(SIGNATURE, serve)
    with tempfile.TemporaryDirectory(prefix="simsiam-litert-") as saved:
        archive.write_out(saved, verbose=False)
        converter = tf.lite.TFLiteConverter.from_saved_model(saved, signature_keys=[SIGNATURE])
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
        if quantize == "dynamic":
            converter.optimizations = [tf.lite.Optimize.DEFAULT]
        return converter.convert(), dim


def _saved_model_versions(export_dir: str) -> list[str]:
    if not os.path.isdir(export_dir):
        return []
    return sorted(
        d for d in os.listdir(export_dir)
        if d.isascii() and d.isdigit() and os.path.exists(os.path.join(export_dir, d, "saved_model.pb"))
    )


def export_litert(
    model,
    config,
    export_dir: str,
    version: int | None = None,
    output: str = "features",
    source: str | None = None,
    normalize: bool = False,
    quantize: str = "none",
) -> str:
    """Write EXPORT_DIR/N/model.tflite (and simsiam_export.json) atomically; return the
    path of model.tflite. Versions as `export.export_saved_model` numbers them."""
    from simsiam_tf import export
    from simsiam_tf.config import UsageError

    if version is not None and version < 1:
        raise UsageError(f"--version must be a positive integer, got {version}")
    held = _saved_model_versions(export_dir)
    if held:
        raise UsageError(
            f"--export-dir {export_dir!r} holds SavedModel versions ({', '.join(held)}) that TF Serving loads; "
            f"a LiteRT version there would be a failed load: pass another --export-dir, e.g. {export_dir.rstrip(os.sep)}-litert"
        )
    export._check_writable(export_dir)
    version = version or export.next_version(export_dir)
    final = os.path.join(export_dir, str(version))
    if os.path.exists(final):
        raise UsageError(f"{final} already exists; choose another --version or leave it out for the next one")

    flatbuffer, dim = convert(model, config, output, normalize, quantize)
    tmp = tempfile.mkdtemp(prefix=f".tmp-{version}-", dir=export_dir)
    try:
        with open(os.path.join(tmp, MODEL_FILE), "wb") as f:
            f.write(flatbuffer)
        metadata = {
            "format": "litert",
            "quantize": quantize,
            "input": {"name": "images", "dtype": "uint8", "shape": [-1, config.image_size, config.image_size, 3],
                      "prepare": f"simsiam_tf.litert.prepare_image(path, {config.image_size})"},
            "output": output,
            "normalized": bool(normalize),
            "embedding_dim": dim,
            "image_size": config.image_size,
            "precision": config.precision,
            "serving_precision": "float32",
            "backbone": config.backbone,
            "dataset": config.dataset,
            "source_checkpoint": source,
            "source_selection": export.checkpoint_selection(source) if source and os.path.exists(source) else None,
            "bytes": len(flatbuffer),
        }
        with open(os.path.join(tmp, METADATA_FILE), "w") as f:
            json.dump(metadata, f, indent=2)
        export.publish_permissions(tmp)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return os.path.join(final, MODEL_FILE)

