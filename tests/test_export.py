"""Export: round trip, signatures, parity with the in-process encoder, atomic versions."""

import io
import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from simsiam_tf import augment as aug
from simsiam_tf import export, training
from simsiam_tf.diagnostics.embed import FeatureExtractor
from simsiam_tf.config import UsageError, make_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOL = 1e-5  # float32 round-off between the reloaded graph and the in-process model


def _tiny(**kw):
    base = dict(width=8, proj_dim=64, pred_dim=16, batch_size=32, epochs=1, train_limit=64, knn_every=1, knn_k=20)
    base.update(kw)
    return make_config("digits", **base)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("run") / "run")
    training.run(_tiny(), path, verbose=0)
    return path


def _images(n=5, size=32, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def _png(image):
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


def test_round_trip_signatures_and_parity(run_dir, tmp_path):
    config, model, source = export.load_run(run_dir)
    assert source.endswith(os.path.join("best", "model.weights.h5"))
    path = export.export_saved_model(model, config, str(tmp_path / "simsiam"))
    assert path == str(tmp_path / "simsiam" / "1")
    assert {"saved_model.pb", "variables"} <= set(os.listdir(path))

    loaded = tf.saved_model.load(path)
    assert {"serving_default", "serving_pixels"} <= set(loaded.signatures)
    sig = loaded.signatures["serving_default"]
    (name, spec), = sig.structured_input_signature[1].items()
    assert name == "image_bytes" and spec.dtype == tf.string and spec.shape.as_list() == [None]
    out = sig.structured_outputs["embedding"]
    assert out.dtype == tf.float32 and out.shape.as_list() == [None, 64]  # resnet18 width 8 -> 64 features
    pix = loaded.signatures["serving_pixels"].structured_input_signature[1]["images"]
    assert pix.dtype == tf.uint8 and pix.shape.as_list() == [None, None, None, 3]

    images = _images()
    expected = FeatureExtractor(model.backbone, config.image_size)(images)
    by_pixels = loaded.signatures["serving_pixels"](images=tf.constant(images))["embedding"].numpy()
    by_bytes = sig(image_bytes=tf.constant([_png(im) for im in images]))["embedding"].numpy()
    np.testing.assert_allclose(by_pixels, expected, atol=TOL)
    np.testing.assert_allclose(by_bytes, expected, atol=TOL)
    assert np.abs(expected).max() > 0


def test_any_size_jpeg_is_resized_like_training(run_dir, tmp_path):
    config, model, _ = export.load_run(run_dir)
    path = export.export_saved_model(model, config, str(tmp_path / "m"))
    sig = tf.saved_model.load(path).signatures["serving_default"]
    big = np.random.default_rng(1).integers(0, 256, (90, 140, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(big).save(buf, format="JPEG", quality=90)
    got = sig(image_bytes=tf.constant([buf.getvalue(), _png(big)]))["embedding"].numpy()
    decoded = tf.io.decode_jpeg(buf.getvalue(), channels=3)[None]
    expected = FeatureExtractor(model.backbone, config.image_size)(aug.resize_uint8(decoded, 32).numpy())
    np.testing.assert_allclose(got[:1], expected, atol=TOL)
    assert got.shape == (2, 64)


def _op_types(saved_model_dir):
    from tensorflow.core.protobuf import saved_model_pb2

    sm = saved_model_pb2.SavedModel()
    with open(os.path.join(saved_model_dir, "saved_model.pb"), "rb") as f:
        sm.ParseFromString(f.read())
    graph = sm.meta_graphs[0].graph_def
    ops = {n.op for n in graph.node}
    for fn in graph.library.function:
        ops |= {n.op for n in fn.node_def}
    return ops


def test_no_python_only_ops_and_saved_model_cli_reads_it(run_dir, tmp_path):
    config, model, _ = export.load_run(run_dir)
    path = export.export_saved_model(model, config, str(tmp_path / "m"))
    ops = _op_types(path)
    assert "DecodeImage" in ops or "DecodePng" in ops  # the check sees inside functions
    assert not ops & {"PyFunc", "EagerPyFunc", "PyFuncStateless"}
    # The saved_model_cli script as a module of this interpreter: the script itself is on
    # PATH only in an activated environment.
    cli = subprocess.run(
        [sys.executable, "-m", "tensorflow.python.tools.saved_model_cli", "show", "--all", "--dir", path],
        capture_output=True, text=True, timeout=120,
        env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"),
    )
    assert cli.returncode == 0, cli.stderr[-1000:]
    assert "signature_def['serving_default']" in cli.stdout and "inputs['image_bytes']" in cli.stdout
    assert "outputs['embedding']" in cli.stdout and "DT_STRING" in cli.stdout


def _jpeg(image):
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def test_tf_serving_loads_it_with_the_tf1_session_loader(run_dir, tmp_path):
    # tensorflow_model_server loads a SavedModel with the TF1 session loader (tag
    # "serve") and runs a signature by name; this does the same in this TensorFlow.
    config, model, _ = export.load_run(run_dir)
    path = export.export_saved_model(model, config, str(tmp_path / "m"))
    images = _images(3, size=40)
    encoded = [_jpeg(images[0]), _png(images[1]), _jpeg(images[2])]
    with tf.Graph().as_default(), tf.compat.v1.Session() as session:
        meta = tf.compat.v1.saved_model.loader.load(session, ["serve"], path)
        signature = meta.signature_def["serving_default"]
        feed = {signature.inputs["image_bytes"].name: encoded}
        tf1 = session.run(signature.outputs["embedding"].name, feed)
    tf2 = tf.saved_model.load(path).signatures["serving_default"](image_bytes=tf.constant(encoded))["embedding"]
    assert tf1.shape == (3, 64)
    np.testing.assert_allclose(tf1, tf2.numpy(), rtol=1e-5, atol=1e-5)


def test_no_function_requires_xla(run_dir, tmp_path):
    # A default tensorflow_model_server build cannot run XLA-compiled functions.
    from tensorflow.core.protobuf import saved_model_pb2

    config, model, _ = export.load_run(run_dir)
    path = export.export_saved_model(model, config, str(tmp_path / "m"))
    sm = saved_model_pb2.SavedModel()
    with open(os.path.join(path, "saved_model.pb"), "rb") as f:
        sm.ParseFromString(f.read())
    graph = sm.meta_graphs[0].graph_def
    marked = [fn.signature.name for fn in graph.library.function if fn.attr["_XlaMustCompile"].b]
    marked += [n.name for fn in graph.library.function for n in fn.node_def if n.attr["_XlaMustCompile"].b]
    marked += [n.name for n in graph.node if n.attr["_XlaMustCompile"].b]
    assert len(graph.library.function) > 0  # the check reads real functions
    assert marked == []


def test_published_versions_are_readable_by_other_users(run_dir, tmp_path):
    config, model, _ = export.load_run(run_dir)
    path = export.export_saved_model(model, config, str(tmp_path / "m"))
    modes = {}
    for root, dirs, files in os.walk(path):
        modes[root] = os.stat(root).st_mode & 0o777
        for f in files:
            modes[os.path.join(root, f)] = os.stat(os.path.join(root, f)).st_mode & 0o777
    assert modes[path] == 0o755
    assert {m for p, m in modes.items() if os.path.isdir(p)} == {0o755}
    assert {m for p, m in modes.items() if not os.path.isdir(p)} == {0o644}
    assert any(p.endswith("saved_model.pb") for p in modes)


def test_versions_increment_and_are_never_overwritten(run_dir, tmp_path):
    config, model, _ = export.load_run(run_dir)
    base = str(tmp_path / "m")
    assert export.export_saved_model(model, config, base).endswith("1")
    assert export.export_saved_model(model, config, base).endswith("2")
    assert export.export_saved_model(model, config, base, version=7).endswith("7")
    assert export.next_version(base) == 8
    with pytest.raises(UsageError, match="already exists"):
        export.export_saved_model(model, config, base, version=2)


def test_a_failed_export_leaves_no_version_behind(run_dir, tmp_path, monkeypatch):
    config, model, _ = export.load_run(run_dir)
    base = tmp_path / "m"

    def broken(self, filepath, options=None, verbose=True):
        os.makedirs(os.path.join(filepath, "variables"))
        (open(os.path.join(filepath, "saved_model.pb"), "wb")).write(b"half")
        raise OSError("disk full")

    monkeypatch.setattr(type(__import__("keras").export.ExportArchive()), "write_out", broken)
    with pytest.raises(OSError, match="disk full"):
        export.export_saved_model(model, config, str(base))
    assert os.listdir(base) == []  # neither "1" nor the temporary directory


def test_projection_output_and_bfloat16_stays_float32(tmp_path):
    run = str(tmp_path / "bf16")
    training.run(_tiny(precision="bfloat16"), run, verbose=0)
    config, model, _ = export.load_run(run)
    path = export.export_saved_model(model, config, str(tmp_path / "m"), output="projection")
    sig = tf.saved_model.load(path).signatures["serving_pixels"]
    out = sig(images=tf.constant(_images(3)))["embedding"]
    assert out.dtype == tf.float32 and out.shape == (3, 64)  # proj_dim
    z = model.projector(model.backbone(aug.eval_preprocess(_images(3), 32), training=False), training=False)
    np.testing.assert_allclose(out.numpy(), z.numpy(), atol=1e-5)


def test_export_cli(run_dir, tmp_path):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    ok = subprocess.run(
        [sys.executable, os.path.join(REPO, "export.py"), "--run", run_dir, "--export-dir", str(tmp_path / "e")],
        capture_output=True, text=True, timeout=300, env=env,
    )
    assert ok.returncode == 0, ok.stderr[-2000:]
    assert "serving_default(image_bytes: string[-1]) -> embedding: float32[-1, 64]" in ok.stdout
    assert "serving_pixels(images: uint8[-1, -1, -1, 3])" in ok.stdout
    bad = subprocess.run(
        [sys.executable, os.path.join(REPO, "export.py"), "--run", str(tmp_path / "nope")],
        capture_output=True, text=True, timeout=300, env=env,
    )
    assert bad.returncode == 2
    assert [l for l in bad.stderr.splitlines() if "error:" in l] == [
        f"export.py: error: --run {str(tmp_path / 'nope')!r} is not a directory"
    ]


def test_check_compat_refuses_a_directory_without_an_export(tmp_path):
    # The check itself builds a virtual environment from the package registry, so it is
    # run by hand (serving/README.md records its result); its bad input is tested here.
    result = subprocess.run([sys.executable, os.path.join(REPO, "serving", "check_compat.py"), "--saved-model",
                             str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "holds no saved_model.pb" in result.stderr and "Traceback" not in result.stderr


def test_normalized_export_serves_unit_vectors_and_records_it(run_dir, tmp_path):
    import json

    from simsiam_tf.diagnostics.metrics import l2_normalize

    config, model, _ = export.load_run(run_dir)
    plain = export.export_saved_model(model, config, str(tmp_path / "m"))
    unit = export.export_saved_model(model, config, str(tmp_path / "m"), normalize=True)
    for path, normalized in ((plain, False), (unit, True)):
        with open(os.path.join(path, export.METADATA_FILE)) as f:
            assert json.load(f)["normalized"] is normalized
    images = _images()
    sig = tf.saved_model.load(unit).signatures["serving_default"]
    got = sig(image_bytes=tf.constant([_png(im) for im in images]))["embedding"].numpy()
    features = FeatureExtractor(model.backbone, config.image_size)(images)
    assert got.shape == features.shape and got.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=TOL)
    np.testing.assert_allclose(got, l2_normalize(features), atol=TOL)


def test_an_unwritable_export_dir_is_one_line_and_writes_nothing(run_dir, tmp_path):
    # Tests may run as root, whom permissions do not stop: a path below a file cannot
    # be created by anyone.
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    config, model, _ = export.load_run(run_dir)
    with pytest.raises(UsageError, match=r"cannot write to --export-dir '.*a-file/models' \(Not a directory\)"):
        export.export_saved_model(model, config, str(blocker / "models"))
    assert os.listdir(tmp_path) == ["a-file"]
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    bad = subprocess.run(
        [sys.executable, os.path.join(REPO, "export.py"), "--run", run_dir, "--export-dir", str(blocker / "models")],
        capture_output=True, text=True, timeout=300, env=env,
    )
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert [l for l in bad.stderr.splitlines() if "error:" in l] == [
        f"export.py: error: cannot write to --export-dir {str(blocker / 'models')!r} (Not a directory); "
        "pass an --export-dir you can write to, or fix its permissions"
    ]
