"""The probe set, the diagnostics callback, the projector files and the linear probe."""

import json
import os
import re

import numpy as np
import pytest
import tensorflow as tf

from simsiam_tf import training
from simsiam_tf.diagnostics.embed import FeatureExtractor
from simsiam_tf.config import make_config
from simsiam_tf.diagnostics import linear_probe, probe, projector
from simsiam_tf.model import build_simsiam


def _tiny(**kw):
    base = dict(
        width=8, proj_dim=64, pred_dim=16, batch_size=32, epochs=3, train_limit=64, knn_every=3, knn_k=20,
        diag_every=2, diag_images=32, diag_views=4, projector_images=100,
    )
    base.update(kw)
    return make_config("digits", **base)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("diag") / "run")
    training.run(_tiny(), path, verbose=0)
    return path


def _images(n, size=32, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


# -- the probe set ---------------------------------------------------------------------


def test_probe_views_are_fixed_and_distinct():
    model = build_simsiam(_tiny())
    images = _images(10)
    probe_set = probe.ProbeSet(images, num_views=3, image_size=32, seed=4, batch_size=4)
    z, p = probe_set.embed(model)
    assert z.shape == (10, 3, 64) and p.shape == (10, 3, 64) and z.dtype == np.float32
    again, _ = probe.ProbeSet(images, num_views=3, image_size=32, seed=4, batch_size=4).embed(model)
    np.testing.assert_array_equal(z, again)  # same seed: the very same views, every epoch
    other, _ = probe.ProbeSet(images, num_views=3, image_size=32, seed=5, batch_size=4).embed(model)
    assert not np.allclose(z, other)
    assert not np.allclose(z[:, 0], z[:, 1])  # the views of an image differ
    # Batches get their own seeds: no two images share a view because of batching.
    assert not np.allclose(z[0, 0], z[4, 0])


def test_probe_outputs_are_the_model_in_inference_mode():
    model = build_simsiam(_tiny())
    images = _images(6)
    probe_set = probe.ProbeSet(images, num_views=2, image_size=32, seed=0)
    z, p = probe_set.embed(model)
    view = probe_set._augment(tf.constant(images), seed=tf.constant([0, 1_000_000], tf.int64))
    out = model(view, training=False)
    np.testing.assert_allclose(z[:, 1], out["z"].numpy(), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(p[:, 1], out["p"].numpy(), rtol=1e-4, atol=1e-5)


def test_probe_images_are_a_fixed_subset():
    images = _images(50)
    a = probe.probe_images(images, 20)
    np.testing.assert_array_equal(a, probe.probe_images(images, 20))
    assert len(a) == 20 and len(probe.probe_images(images, 500)) == 50


# -- the callback in a training run -----------------------------------------------------


def test_records_every_n_epochs_and_after_the_last(run_dir):
    from simsiam_tf.input import split_images

    records = probe.read_records(run_dir)
    assert [r["epoch"] for r in records] == [2, 3]
    # Full batches of the images it trains on: the 64, less the validation split held out.
    config = _tiny()
    steps = len(split_images(train_limit=64, val_fraction=config.val_fraction)[0]) // 32
    assert [r["step"] for r in records] == [2 * steps, 3 * steps]
    for r in records:
        assert set(probe.SCALARS) <= set(r)
        assert r["z_std_reference"] == pytest.approx(1 / np.sqrt(64), rel=1e-5)
        assert len(r["singular_values"]) == 32  # f̄ is [32 images, 64 dims]
        assert 1.0 <= r["effective_rank"] <= 32
        assert 0.0 <= r["shard_ratio"] <= 1.0
        assert 0 < r["diag_seconds_total"] < r["wall_seconds"]
    # effective_rank is the summary of the stored spectrum.
    s = np.asarray(records[-1]["singular_values"])
    q = s / s.sum()
    assert records[-1]["effective_rank"] == pytest.approx(np.exp(-np.sum(q * np.log(q))), rel=1e-4)


def test_recorded_diagnostics_are_those_of_the_final_model(run_dir):
    from simsiam_tf.input import split_images
    from simsiam_tf.export import load_run

    config, model, _ = load_run(run_dir, "last")
    # The training split the run trained on, its validation images held out.
    images, _ = split_images(train_limit=config.train_limit, val_fraction=config.val_fraction)
    probe_set = probe.ProbeSet(probe.probe_images(images, config.diag_images), config.diag_views, 32, config.seed)
    z, p = probe_set.embed(model)
    assert z.shape == (config.diag_images, config.diag_views, config.proj_dim)
    last = probe.read_records(run_dir)[-1]
    # Recomputed from the definitions (simsiam_tf/diagnostics/metrics.py docstrings),
    # written afresh here so that a bug in metrics.py cannot agree with itself.
    z = z.astype(np.float64)
    unit = z / np.linalg.norm(z, axis=-1, keepdims=True)  # z̃: each view's direction
    samples = unit.reshape(-1, unit.shape[-1])  # all N * V views
    # z_std: population std of each channel over all views, averaged over channels.
    spread = np.sqrt(((samples - samples.mean(axis=0)) ** 2).mean(axis=0))
    assert last["z_std"] == pytest.approx(spread.mean(), rel=1e-3)
    # effective rank of f̄ (mean direction of each image's views, not renormalised):
    # exp of the entropy of its singular values, normalised to sum to one.
    fbar = unit.mean(axis=1)
    s = np.linalg.svd(fbar, compute_uv=False)
    q = s[s > 0] / s.sum()
    assert last["effective_rank"] == pytest.approx(np.exp(-(q * np.log(q)).sum()), rel=1e-3)
    # shard ratio: mean squared distance of a view to its image's mean direction, over
    # the mean squared distance of a view to the mean of all views.
    within = ((unit - fbar[:, None, :]) ** 2).sum(-1).mean()
    total = ((samples - samples.mean(axis=0)) ** 2).sum(-1).mean()
    assert last["shard_ratio"] == pytest.approx(within / total, rel=1e-3)
    # within-image volume: each image's D x D view covariance (population), its
    # V - 1 largest eigenvalues (V views span V - 1 dimensions), mean log.
    v = unit.shape[1]
    covariances = [np.cov(views, rowvar=False, bias=True) for views in unit]
    assert last["within_trace"] == pytest.approx(np.mean([np.trace(c) for c in covariances]), rel=1e-3)
    top = [np.linalg.eigvalsh(c)[-(v - 1):] for c in covariances]
    assert last["within_log_volume"] == pytest.approx(np.mean(np.log(top)), rel=1e-3, abs=1e-3)


def test_tensorboard_has_the_diagnostics_scalars(run_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(os.path.join(run_dir, "tb"), size_guidance={"tensors": 0})
    acc.Reload()
    records = probe.read_records(run_dir)
    for key in probe.SCALARS:
        events = acc.Tensors(f"diagnostics/{key}")
        assert [e.step for e in events] == [r["step"] for r in records], key
        logged = [float(tf.make_ndarray(e.tensor_proto)) for e in events]
        assert logged == pytest.approx([r[key] for r in records], rel=1e-4), key


def test_tensorboard_custom_scalars_overlay_z_std_and_its_reference(run_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.custom_scalar import layout_pb2, metadata

    acc = EventAccumulator(os.path.join(run_dir, "tb"), size_guidance={"tensors": 0})
    acc.Reload()
    (event,) = acc.Tensors(metadata.CONFIG_SUMMARY_TAG)
    layout = layout_pb2.Layout.FromString(tf.make_ndarray(event.tensor_proto).item())
    charts = {c.title: list(c.multiline.tag) for cat in layout.category for c in cat.chart}
    tags = set(acc.Tags()["tensors"])
    # Every pattern of every chart matches a tag the run logged.
    for title, patterns in charts.items():
        for pattern in patterns:
            assert any(re.search(pattern, tag) for tag in tags), (title, pattern)
    shown = {tag for tag in tags for pattern in charts["z_std against 1/sqrt(d)"] if re.search(pattern, tag)}
    assert shown == {"diagnostics/z_std", "diagnostics/z_std_reference", "epoch/z_std"}


def test_resume_drops_records_after_the_checkpoint(tmp_path):
    logdir = tmp_path / "run"
    logdir.mkdir()
    lines = [{"epoch": e, "z_std": 0.1} for e in (1, 2, 3)]
    (logdir / probe.RECORDS_FILE).write_text("".join(json.dumps(r) + "\n" for r in lines) + '{"epoch": 4, "z_')
    callback = probe.DiagnosticsCallback(str(logdir), _tiny(), _images(8), steps_per_epoch=2, initial_epoch=2)
    callback.on_train_begin()
    assert [r["epoch"] for r in probe.read_records(str(logdir))] == [1, 2]


def test_diagnostics_off_writes_no_records(tmp_path):
    logdir = str(tmp_path / "run")
    training.run(_tiny(epochs=1, diag_every=0, projector_images=0, knn_every=0), logdir, verbose=0)
    assert not os.path.exists(os.path.join(logdir, probe.RECORDS_FILE))
    assert not os.path.exists(os.path.join(logdir, "tb", "projector_config.pbtxt"))


# -- projector files ---------------------------------------------------------------------


def _projector_app(logdir):
    from tensorboard.backend.event_processing import data_provider, plugin_event_multiplexer
    from tensorboard.plugins import base_plugin
    from tensorboard.plugins.projector.projector_plugin import ProjectorPlugin
    from werkzeug import test as wtest
    from werkzeug import wrappers

    multiplexer = plugin_event_multiplexer.EventMultiplexer()
    multiplexer.AddRunsFromDirectory(logdir)
    multiplexer.Reload()
    context = base_plugin.TBContext(
        logdir=logdir, multiplexer=multiplexer, data_provider=data_provider.MultiplexerDataProvider(multiplexer, logdir)
    )
    plugin = ProjectorPlugin(context)
    apps = plugin.get_plugin_apps()

    def get(route, **params):
        client = wtest.Client(apps[route], wrappers.Response)
        return client.get(route, query_string=params)

    return get


def test_tensorboard_projector_reads_the_test_split_embeddings(run_dir):
    from PIL import Image

    from simsiam_tf.input import split_images
    from simsiam_tf.input.catalog import subset
    from simsiam_tf.export import load_run

    get = _projector_app(run_dir)  # what `tensorboard --logdir RUN` serves
    runs = json.loads(get("/runs").data)
    assert runs == ["tb"]
    tensor = np.frombuffer(get("/tensor", run="tb", name=projector.TENSOR_NAME).data, np.float32)
    test_images, test_labels = split_images(split="test")
    _, model, _ = load_run(run_dir, "last")
    keep = subset(len(test_images), 100)
    expected = FeatureExtractor(model.backbone, 32)(test_images[keep])
    np.testing.assert_allclose(tensor.reshape(expected.shape), expected, rtol=1e-5, atol=1e-6)

    metadata = get("/metadata", run="tb", name=projector.TENSOR_NAME).data.decode().splitlines()
    assert metadata[0] == "label\tclass" and len(metadata) == 101
    assert metadata[1:] == [f"{y}\t{y}" for y in test_labels[keep]]  # digit class names are the digits

    sprite = get("/sprite_image", run="tb", name=projector.TENSOR_NAME)
    assert sprite.status_code == 200
    image = Image.open(os.path.join(run_dir, "tb", "sprite.png"))
    assert image.size == (10 * 32, 10 * 32)  # 100 thumbnails of 32 px in a 10 x 10 grid
    np.testing.assert_array_equal(np.asarray(image)[32:64, :32], test_images[keep][10])


def test_sprite_thumbnails_shrink_to_the_projector_limit(monkeypatch):
    monkeypatch.setattr(projector, "SPRITE_MAX_PIXELS", 64)
    sprite, thumb = projector.sprite_image(_images(10))
    assert thumb == 16 and sprite.shape == (64, 64, 3)  # 4 x 4 grid of 16-px thumbnails


# -- linear probe ------------------------------------------------------------------------


def test_linear_probe_separable_classes_and_chance():
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(4, 20)) * 5
    y_train, y_test = rng.integers(0, 4, 400), rng.integers(0, 4, 200)
    x_train = centres[y_train] + rng.normal(size=(400, 20))
    x_test = centres[y_test] + rng.normal(size=(200, 20))
    result = linear_probe.linear_probe(x_train, y_train, x_test, y_test)
    assert result["top1"] == 1.0
    assert result["train_images"] == 400 and result["validation_images"] == 80
    assert set(result["validation_top1"]) == {f"{c:g}" for c in linear_probe.C_GRID}
    assert result["validation_top1"][f"{result['C']:g}"] == max(result["validation_top1"].values())

    noise = linear_probe.linear_probe(rng.normal(size=(400, 20)), y_train, rng.normal(size=(200, 20)), y_test)
    assert noise["top1"] < 0.4  # 4 classes: chance is 0.25


def test_linear_probe_chooses_c_on_held_out_data_and_refits_on_all(monkeypatch):
    # A stand-in classifier that is perfect for C in {0.01, 0.1} and always says 0
    # otherwise: validation picks the tie's smaller C, which is then refitted on the
    # whole training split and scored once on the test split.
    calls = []

    class Stub:
        def __init__(self, c):
            self.c = c

        def predict(self, x):
            good = self.c in (0.01, 0.1)
            return (x[:, 0] > 0).astype(int) if good else np.zeros(len(x), int)

    def fake_fit(features, labels, c, max_iter):
        calls.append((len(features), c))
        return Stub(c)

    monkeypatch.setattr(linear_probe, "_fit", fake_fit)
    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, 500)
    x = np.stack([y + 0.0, rng.normal(size=500)], axis=1)  # feature 0 is the label
    result = linear_probe.linear_probe(x[:400], y[:400], x[400:], y[400:])
    assert result["C"] == 0.01
    assert result["validation_top1"]["0.01"] == result["validation_top1"]["0.1"] == 1.0
    assert result["validation_top1"]["1"] == pytest.approx(1 - y[:400].mean(), abs=0.1)
    assert calls[:-1] == [(320, c) for c in linear_probe.C_GRID]  # 80% of 400 to fit
    assert calls[-1] == (400, 0.01)
    assert result["top1"] == 1.0
