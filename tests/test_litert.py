"""LiteRT export: ai-edge-litert's embeddings against the SavedModel's, on JPEG and PNG files."""

import io
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from simsiam_tf import augment as aug
from simsiam_tf import export, litert, training
from simsiam_tf.config import UsageError, make_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The bound. Measured on this test's run: max |difference| 4.8e-7 over the 8
# files (2-core AMD EPYC, AVX512-BF16, 2026-12-06).
FLOAT_TOL = 1e-4
# Dynamic-range quantisation against float32, cosine per image. Measured on this test's
# run: lowest 0.99996 over the 8 files (2-core AMD EPYC, AVX512-BF16, 2026-12-06); the
# bound leaves room for other CPUs' kernels and for retrained weights.
DYNAMIC_COSINE = 0.999

try:
    import ai_edge_litert.interpreter  # noqa: F401
    import simplejpeg  # noqa: F401
except ImportError:
    if os.environ.get("CI"):
        raise  # CI installs requirements.txt: a missing runtime is a failure there
    pytest.skip(f"ai-edge-litert or simplejpeg is not installed; install them with `{litert.INSTALL} "
                f"{litert.INSTALL_JPEG.split()[-1]}`", allow_module_level=True)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    # Width 16: its 3x3 convolutions have 2,304 weights, above the 1,024 from which the
    # converter quantises a tensor, so --quantize dynamic has something to do.
    path = str(tmp_path_factory.mktemp("run") / "run")
    config = make_config("digits", width=16, proj_dim=64, pred_dim=16, batch_size=32, epochs=1, train_limit=64,
                         knn_every=1, knn_k=20)
    training.run(config, path, verbose=0)
    return path


@pytest.fixture(scope="module")
def exports(run_dir, tmp_path_factory):
    """The run exported three ways: SavedModel, LiteRT float32, LiteRT dynamic-range."""
    base = tmp_path_factory.mktemp("exports")
    config, model, source = export.load_run(run_dir)
    saved = export.export_saved_model(model, config, str(base / "simsiam"), source=source)
    dynamic = litert.export_litert(model, config, str(base / "lite"), version=2, source=source, quantize="dynamic")
    # float32 through the command line, as a user runs it
    cli = subprocess.run(
        [sys.executable, os.path.join(REPO, "export.py"), "--run", run_dir, "--format", "litert",
         "--export-dir", str(base / "lite"), "--version", "1"],
        capture_output=True, text=True, timeout=300, env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"),
    )
    assert cli.returncode == 0, cli.stderr[-2000:]
    float32 = str(base / "lite" / "1" / litert.MODEL_FILE)
    assert f"to {float32} (" in cli.stdout
    assert "Input: images uint8[-1, 32, 32, 3]" in cli.stdout and "embedding float32[-1, 128]" in cli.stdout
    return saved, float32, dynamic


def _smooth(h, w, seed):
    """A photo-like image: coarse random colours, upsampled (JPEG of pure noise is atypical)."""
    coarse = np.random.default_rng(seed).integers(0, 256, (4, 6, 3), dtype=np.uint8)
    return np.asarray(Image.fromarray(coarse).resize((w, h), Image.BICUBIC), dtype=np.uint8)


def _encode(image, fmt):
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format=fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return buf.getvalue()


def _files(tmp_path):
    """JPEG and PNG files at the training size and larger, non-square (resized)."""
    paths = []
    for i, (h, w) in enumerate([(32, 32), (90, 140), (200, 150), (31, 64)]):
        for fmt, ext in (("JPEG", "jpg"), ("PNG", "png")):
            path = tmp_path / f"{i}.{ext}"
            path.write_bytes(_encode(_smooth(h, w, i), fmt))
            paths.append(str(path))
    return paths


@pytest.mark.parametrize("image_size", [32, 112])
def test_prepare_image_gives_the_saved_model_pixels(tmp_path, image_size):
    # JPEG decoded as TensorFlow does (fast integer DCT); Pillow's accurate DCT would be
    # off by up to 4 levels here.
    # 32: the square resize; 112: shorter side to 128, the centre 128 square, the
    # centre 112 (the path of sizes from 96 px). Pixel for pixel, not approximately.
    for path in _files(tmp_path) + [_rgba_png(tmp_path), _grey_png(tmp_path), _grey_jpeg(tmp_path)]:
        data = open(path, "rb").read()
        graph = aug.eval_resize_uint8(export.decode_images(tf.constant([data]), image_size), image_size)[0].numpy()
        mine = litert.prepare_image(path, image_size)
        assert mine.dtype == np.uint8 and mine.shape == (image_size, image_size, 3)
        np.testing.assert_array_equal(mine, graph, err_msg=path)


def _rgba_png(tmp_path):
    image = np.dstack([_smooth(40, 50, 7), np.full((40, 50), 77, np.uint8)])
    path = tmp_path / "alpha.png"
    path.write_bytes(_encode(image, "PNG"))
    return str(path)


def _grey_png(tmp_path):
    path = tmp_path / "grey.png"
    path.write_bytes(_encode(_smooth(40, 50, 8)[..., 0], "PNG"))
    return str(path)


def _grey_jpeg(tmp_path):
    path = tmp_path / "grey.jpg"
    path.write_bytes(_encode(_smooth(40, 50, 9)[..., 0], "JPEG"))
    return str(path)


def test_float32_litert_matches_the_saved_model_on_jpeg_and_png(exports, tmp_path):
    saved, float32, _ = exports
    paths = _files(tmp_path)
    served = tf.saved_model.load(saved).signatures["serving_default"]
    expected = served(image_bytes=tf.constant([open(p, "rb").read() for p in paths]))["embedding"].numpy()
    encoder = litert.LiteRTEncoder(float32)
    got = encoder(np.stack([litert.prepare_image(p, encoder.image_size) for p in paths]))
    assert got.shape == expected.shape == (len(paths), 128) and got.dtype == np.float32
    assert np.abs(expected).max() > 0.01  # features that can disagree
    assert np.abs(got - expected).max() <= FLOAT_TOL
    # one image at a time gives the same as the batch (the batch dimension is dynamic)
    np.testing.assert_allclose(encoder(litert.prepare_image(paths[1], 32)[None])[0], got[1], atol=FLOAT_TOL)


def test_dynamic_range_is_smaller_and_close_in_cosine(exports, tmp_path):
    _, float32, dynamic = exports
    assert os.path.getsize(dynamic) < 0.5 * os.path.getsize(float32)
    with open(os.path.join(os.path.dirname(dynamic), litert.METADATA_FILE)) as f:
        meta = json.load(f)
    assert meta["quantize"] == "dynamic" and meta["embedding_dim"] == 128 and meta["bytes"] == os.path.getsize(dynamic)
    images = np.stack([litert.prepare_image(p, 32) for p in _files(tmp_path)])
    a = litert.LiteRTEncoder(float32)(images)
    b = litert.LiteRTEncoder(dynamic)(images)
    cosine = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    assert cosine.min() >= DYNAMIC_COSINE, cosine
    assert np.abs(a - b).max() > 0  # the weights were quantised


def test_the_model_holds_builtin_ops_only(exports):
    _, float32, dynamic = exports
    from ai_edge_litert.interpreter import Interpreter

    for path in (float32, dynamic):
        interpreter = Interpreter(model_path=path)
        ops = {op["op_name"] for op in interpreter._get_ops_details()}
        assert "CONV_2D" in ops and not {o for o in ops if o.startswith("Flex") or o in ("CUSTOM", "READ_VARIABLE")}


def test_a_wrong_input_is_one_line_naming_prepare_image(exports):
    _, float32, _ = exports
    with pytest.raises(ValueError, match=r"expected uint8 \[N, 32, 32, 3\], got \[1, 40, 40, 3\]; prepare .*prepare_image"):
        litert.LiteRTEncoder(float32)(np.zeros((1, 40, 40, 3), np.uint8))


def test_litert_refuses_a_saved_model_base_path(exports, run_dir):
    saved, _, _ = exports
    config, model, _ = export.load_run(run_dir)
    base = os.path.dirname(saved)
    with pytest.raises(UsageError, match=r"holds SavedModel versions \(1\) that TF Serving loads; .*pass another --export-dir"):
        litert.export_litert(model, config, base)
    assert sorted(os.listdir(base)) == ["1"]


def test_quantize_without_litert_is_refused_before_tensorflow(run_dir):
    bad = subprocess.run([sys.executable, os.path.join(REPO, "export.py"), "--run", run_dir, "--quantize", "dynamic"],
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2
    assert bad.stderr.strip() == ("export.py: error: --quantize applies to --format litert only; add --format litert "
                                  "or leave --quantize out (see --help)")
