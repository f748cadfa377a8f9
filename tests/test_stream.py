"""The streamed input (simsiam_tf.input.stream): exactly once per epoch, seeded order,
disjoint worker shares, resume, bad files, the three sources, and the crops at full
resolution."""

import json
import math
import os
import re

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image
from scipy import stats

import tfds_tiny
from simsiam_tf import augment as aug
from simsiam_tf import input as input_lib
from simsiam_tf import training
from simsiam_tf.config import UsageError, make_config
from simsiam_tf.input import batches, catalog, decode, records


def _open(dataset, size=16, kind="stream", data_dir=None, **overrides):
    overrides.setdefault("val_fraction", 0.0)
    config = make_config("digits", dataset=dataset, image_size=size, data_dir=data_dir, input=kind, **overrides)
    return input_lib.open_input(config)[0]

# Colour and flip steps off: a view of a solid-colour image keeps the image's colour,
# so every view says which image it came from.
PLAIN = aug.AugmentSpec(image_size=16, jitter_prob=0.0, grayscale_prob=0.0)


def _colours(n, seed=0):
    """n distinct RGB colours, far enough apart to tell apart after JPEG."""
    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(*[np.arange(20, 236, 24)] * 3, indexing="ij"), -1).reshape(-1, 3)
    return grid[rng.permutation(len(grid))[:n]].astype(np.uint8)


def _solid_folder(root, n, shape=(20, 28), bad=0):
    """root/train/<c0|c1>/NNN.png solid images of distinct colours (PNG: exact colours),
    plus `bad` undecodable files; returns the colours in file order."""
    colours = _colours(n)
    for i, c in enumerate(colours):
        d = root / "train" / f"c{i % 2}"
        d.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", shape[::-1], tuple(int(v) for v in c)).save(d / f"{i:03d}.png")
    for j in range(bad):
        (root / "train" / "c0" / f"bad{j}.png").write_bytes(b"\x89PNG not an image")
    return colours


def _which(views, colours):
    """Index of the colour of each view (uint8 [B, S, S, 3])."""
    rgb = views.astype(float).mean(axis=(1, 2))
    dist = np.abs(rgb[:, None, :] - colours[None].astype(float)).sum(-1)
    assert (dist.min(1) < 3).all(), "a view is not the colour of any image"
    return dist.argmin(1)


def _seen(ds, colours, count):
    out = []
    for batch in ds.take(count):
        x1, x2 = batches.unpack(batch)
        a, b = _which(x1.numpy(), colours), _which(x2.numpy(), colours)
        np.testing.assert_array_equal(a, b)  # both views from one image
        out.append(a)
    return np.concatenate(out)


def test_every_image_exactly_once_per_epoch_in_a_seeded_order(tmp_path):
    colours = _solid_folder(tmp_path, 50)
    inp = _open(f"folder:{tmp_path}")
    assert inp.steps_per_epoch(8) == 6  # 50 // 8; 2 images are the dropped remainder
    ds = inp.worker_batches(8, PLAIN, seed=3, epochs=3)
    seen = _seen(ds, colours, 18).reshape(3, 48)
    for epoch in seen:
        assert len(set(epoch)) == 48  # no image twice in an epoch
    assert len(set(seen[0]) ^ set(seen[1])) > 0 or not np.array_equal(seen[0], seen[1])
    assert not np.array_equal(seen[0], seen[1])  # each epoch its own order
    again = _seen(inp.worker_batches(8, PLAIN, seed=3, epochs=1), colours, 6)
    np.testing.assert_array_equal(again, seen[0])  # the order follows from the seed
    other = _seen(inp.worker_batches(8, PLAIN, seed=4, epochs=1), colours, 6)
    assert not np.array_equal(other, seen[0])


def test_resume_continues_the_same_stream(tmp_path):
    _solid_folder(tmp_path, 40, shape=(30, 44))
    inp = _open(f"folder:{tmp_path}")
    spec = aug.AugmentSpec(image_size=16)  # the whole recipe: crops and colours
    full = [b.numpy() for b in inp.worker_batches(8, spec, seed=1, epochs=3)]
    resumed = [b.numpy() for b in inp.worker_batches(8, spec, seed=1, epochs=3, initial_epoch=2)]
    assert len(full) == 15 and len(resumed) == 5
    for a, b in zip(full[10:], resumed):
        np.testing.assert_array_equal(a, b)


def test_workers_read_disjoint_shares_of_a_folder(tmp_path):
    colours = _solid_folder(tmp_path, 41)
    inp = _open(f"folder:{tmp_path}")
    assert inp.worker_counts(2) == [20, 20]
    for epoch in (0, 1):
        shares = [
            _seen(inp.worker_batches(4, PLAIN, 5, epoch + 1, epoch, worker=w, workers=2, steps=5), colours, 5)
            for w in (0, 1)
        ]
        assert not set(shares[0]) & set(shares[1])
        assert len(set(shares[0]) | set(shares[1])) == 40


def test_undecodable_files_are_skipped_counted_and_the_epoch_keeps_its_steps(tmp_path):
    colours = _solid_folder(tmp_path, 30, bad=5)
    inp = _open(f"folder:{tmp_path}")
    assert inp.num_train == 35 and inp.steps_per_epoch(8) == 4  # 35 files, 30 decodable
    seen = _seen(inp.worker_batches(8, PLAIN, seed=0, epochs=1), colours, 10)
    assert len(seen) == 32  # 4 whole batches: two images of the epoch's start come again
    assert set(seen) == set(range(30))
    assert inp.skipped_in_training() == 5


# ---------------------------------------------------------------------------
# TFRecord shards.


def _write_shards(directory, colours, shards=4, index=True, labels=True):
    directory.mkdir(parents=True, exist_ok=True)
    files, entries = [], []
    for s in range(shards):
        name = f"train-{s:05d}-of-{shards:05d}.tfrecord"
        path = directory / name
        rows = list(range(s, len(colours), shards))
        with tf.io.TFRecordWriter(str(path)) as w:
            for i in rows:
                png = tf.io.encode_png(np.broadcast_to(colours[i], (12, 18, 3)).copy()).numpy()
                w.write(records.make_example(png, i % 2 if labels else -1, 12, 18, b"png", f"{i}.png"))
        files.append(str(path))
        entries.append({"file": name, "count": len(rows), "bytes": os.path.getsize(path)})
    if index:
        doc = {
            "format": records.INDEX_FORMAT, "version": records.INDEX_VERSION, "source": "test",
            "class_names": ["c0", "c1"] if labels else [], "skipped": [], "max_side": None, "seed": 0,
            "splits": {"train": {"count": len(colours), "shards": entries}},
        }
        (directory / records.INDEX_FILE).write_text(json.dumps(doc))
    return files


def test_tfrecord_shards_exactly_once_and_disjoint_workers(tmp_path):
    colours = _colours(37)
    _write_shards(tmp_path / "shards", colours, shards=5)
    for spec in (str(tmp_path / "shards"), str(tmp_path / "shards" / "train-*")):
        inp = _open(f"tfrecord:{spec}")
        assert inp.num_train == 37 and inp.class_names == ["c0", "c1"]
    counts = inp.worker_counts(2)  # shards 0, 2, 4 and 1, 3: 8+7+7 and 8+7
    assert counts == [22, 15]
    assert inp.steps_per_epoch(10, workers=2) == 3  # the smaller share: 15 // 5
    one = _seen(inp.worker_batches(9, PLAIN, 0, 1), colours, 4)
    assert len(one) == 36 and len(set(one)) == 36
    shares = [set(_seen(inp.worker_batches(5, PLAIN, 0, 1, worker=w, workers=2), colours, 3)) for w in (0, 1)]
    assert len(shares[0]) == 15 and len(shares[1]) == 15 and not shares[0] & shares[1]


def test_tfrecord_bad_input_is_one_clear_error(tmp_path):
    with pytest.raises(UsageError, match="matches no files"):
        _open(f"tfrecord:{tmp_path / 'nothing-*.tfrecord'}")
    plain = tmp_path / "plain.tfrecord"
    with tf.io.TFRecordWriter(str(plain)) as w:
        w.write(tf.train.Example(features=tf.train.Features(feature={
            "image/class/label": tf.train.Feature(int64_list=tf.train.Int64List(value=[1]))})).SerializeToString())
    with pytest.raises(UsageError, match="image/encoded"):
        _open(f"tfrecord:{plain}")
    files = _write_shards(tmp_path / "cut", _colours(12), shards=3)
    data = open(files[1], "rb").read()
    open(files[1], "wb").write(data[: len(data) // 2])
    with pytest.raises(UsageError, match="train-00001-of-00003"):
        _open(f"tfrecord:{tmp_path / 'cut'}")


def test_a_shard_truncated_mid_run_names_the_shard_and_keeps_the_checkpoint(tmp_path):
    """Without prepare.py's index the damage shows only when the reader reaches it."""
    files = _write_shards(tmp_path / "shards", _colours(64), shards=4, index=False)
    config = make_config(
        "digits", dataset=f"tfrecord:{tmp_path}/shards/train-*", input="stream", image_size=16, epochs=3,
        batch_size=16, width=4, proj_dim=16, pred_dim=8, knn_every=0, diag_every=0,
    )

    class Truncate(tf.keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            if epoch == 0:
                data = open(files[2], "rb").read()
                open(files[2], "wb").write(data[: len(data) - 50])

    logdir = str(tmp_path / "run")
    with pytest.raises(UsageError, match=r"train-00002-of-00004.tfrecord \(truncated.*epoch (\d)\) is intact") as e:
        training.run(config, logdir, verbose=0, extra_callbacks=[Truncate()])
    # Batches are prefetched, so the reader may reach the damage an epoch later.
    said = int(re.search(r"epoch (\d)\) is intact", str(e.value)).group(1))
    meta = json.loads(open(os.path.join(logdir, "checkpoints", "last", "training_metadata.json")).read())
    assert said == meta["epoch"] in (1, 2)
    assert len(str(e.value).splitlines()) == 1


# ---------------------------------------------------------------------------
# tensorflow-datasets, read from real records without decoding them up front.


def test_tfds_records_are_read_undecoded_in_disjoint_worker_shares(tmp_path):
    tfds_tiny.prepare(tmp_path, num_train=48, num_test=8, shards=4)
    inp = _open("tiny_images", data_dir=str(tmp_path))
    assert inp.num_train == 48 and len(inp.eval_split("test")) == 8
    source, members = inp.source, inp.splits["train"].indices
    index, raw, label = next(iter(source.records("train", members)))
    assert raw.dtype == tf.string and tf.io.is_jpeg(raw)  # still a JPEG: decoded only at the crops
    counts = inp.worker_counts(2)
    assert sum(counts) == 48
    # What each worker really reads equals what worker_counts promised, and no record
    # is read by both.
    shares = []
    for w in (0, 1):
        got = [int(i) for i, _, _ in source.epoch_records(members, 0, tf.constant(0, tf.int64), w, 2)]
        assert len(got) == counts[w]
        shares.append(set(got))
    assert not shares[0] & shares[1] and len(shares[0] | shares[1]) == 48
    epoch0 = [int(i) for i, _, _ in source.epoch_records(members, 0, tf.constant(0, tf.int64), 0, 1)]
    epoch1 = [int(i) for i, _, _ in source.epoch_records(members, 0, tf.constant(1, tf.int64), 0, 1)]
    assert sorted(epoch0) == sorted(epoch1) and epoch0 != epoch1


def test_tfds_shards_are_read_in_a_new_order_every_epoch(tmp_path):
    # Once the files were read in the same order every epoch (only the records within a
    # bounded buffer moved); now the shard order itself follows (seed, epoch).
    tfds_tiny.prepare(tmp_path, num_train=64, num_test=8, shards=8)
    inp = _open("tiny_images", data_dir=str(tmp_path))
    source, members = inp.source, inp.splits["train"].indices
    offsets = np.cumsum([0] + source._counts["train"])

    def first_shards(epoch):
        firsts = []
        for i, _, _ in source.epoch_records(members, 0, tf.constant(epoch, tf.int64), 0, 1):
            shard = int(np.searchsorted(offsets, int(i), side="right")) - 1
            if shard not in firsts:
                firsts.append(shard)
        return firsts

    orders = [first_shards(e) for e in range(4)]
    assert all(sorted(o) == list(range(8)) for o in orders)
    assert len({tuple(o) for o in orders}) > 1


def test_tfds_stream_run_trains_and_monitors(tmp_path):
    tfds_tiny.prepare(tmp_path / "tfds", num_train=64, num_test=16, shards=2)
    config = make_config(
        "digits", dataset="tiny_images", data_dir=str(tmp_path / "tfds"), input="stream", image_size=16,
        epochs=1, batch_size=16, width=4, proj_dim=16, pred_dim=8, knn_every=1, diag_every=1, diag_images=8,
        diag_views=2, projector_images=8,
    )
    summary = training.run(config, str(tmp_path / "run"), verbose=0)
    assert summary["input"] == "stream" and summary["epochs_completed"] == 1
    assert summary["knn_top1"] is not None and summary["skipped_images"] == 0
    assert json.load(open(tmp_path / "run" / "config.json"))["input"] == "stream"


# ---------------------------------------------------------------------------
# --input auto


def _resolve(count=10, **overrides):
    config = make_config("digits", **overrides)
    return input_lib.resolve_input(config, catalog.parse_dataset(config.dataset), count)


def test_auto_input_says_which_and_why(tmp_path):
    folder = f"folder:{tmp_path}"
    assert _resolve(1797)[0] == "memory"
    kind, reason = _resolve(dataset=folder, image_size=32)
    assert kind == "memory" and "within 50%" in reason
    kind, reason = _resolve(dataset=folder, image_size=224)
    assert kind == "stream" and "original images" in reason
    assert _resolve(dataset="tfrecord:x/*")[0] == "stream"
    assert _resolve(dataset=folder, input="memory", image_size=224)[0] == "memory"
    with pytest.raises(UsageError, match="--input stream"):
        _resolve(dataset="tfrecord:x/*", input="memory")
    lines = []
    _solid_folder(tmp_path, 10)
    assert input_lib.open_input(make_config("digits", dataset=folder, image_size=32), lines.append)[1] == "memory"
    assert lines == ["input: memory (auto: 10 images at 32 px need 0.0 GiB, within 50% of this machine's "
                     f"{input_lib.memory_total() / 2**30:.0f} GiB)"]


def test_auto_streams_what_does_not_fit(tmp_path, monkeypatch):
    monkeypatch.setattr(input_lib, "memory_total", lambda: 10 * 32 * 32 * 3)  # room for 5 images
    kind, reason = _resolve(dataset=f"folder:{tmp_path}", image_size=32)
    assert kind == "stream" and "more than 50%" in reason
    with pytest.raises(UsageError, match="--input stream"):
        _resolve(dataset=f"folder:{tmp_path}", image_size=32, input="memory")


# ---------------------------------------------------------------------------
# The crops: drawn on the original image, decoded at the crop.


def _torchvision_crop(rng, height, width, scale=(0.2, 1.0), ratio=(3 / 4, 4 / 3)):
    """torchvision.transforms.RandomResizedCrop.get_params, transcribed with numpy."""
    area = height * width
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1])))
        w, h = int(round(math.sqrt(target * aspect))), int(round(math.sqrt(target / aspect)))
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


@pytest.mark.parametrize("height,width,fmt", [(375, 500, "jpeg"), (500, 200, "png")])
def test_crop_boxes_on_non_square_originals_follow_torchvision(height, width, fmt):
    image = np.random.default_rng(0).integers(0, 256, (height, width, 3), np.uint8)
    raw = tf.io.encode_jpeg(image) if fmt == "jpeg" else tf.io.encode_png(image)
    spec = aug.AugmentSpec(image_size=64)
    boxes = tf.map_fn(
        lambda s: decode.crop_boxes(raw, tf.stack([tf.constant(9, tf.int64), s]), spec),
        tf.range(1000, dtype=tf.int64), fn_output_signature=tf.TensorSpec([2, 4], tf.int32),
    ).numpy().reshape(-1, 4)
    rng = np.random.default_rng(1)
    ref = np.array([_torchvision_crop(rng, height, width) for _ in range(2000)])
    for b in (boxes, ref):
        assert (b[:, :2] >= 0).all() and (b[:, 0] + b[:, 2] <= height).all() and (b[:, 1] + b[:, 3] <= width).all()
    measures = {
        "area": lambda b: b[:, 2] * b[:, 3] / (height * width),
        "log aspect": lambda b: np.log(b[:, 3] / b[:, 2]),
        "centre y": lambda b: (b[:, 0] + b[:, 2] / 2) / height,
        "centre x": lambda b: (b[:, 1] + b[:, 3] / 2) / width,
    }
    for name, f in measures.items():
        assert stats.ks_2samp(f(boxes), f(ref)).pvalue > 1e-3, name


def test_decoded_crops_are_the_boxes_of_the_original():
    """An asymmetric image (a ramp in y, another in x): a swapped axis, a shifted box or a
    wrong scale in the scaled JPEG decode would show in the pixels."""
    y, x = np.mgrid[0:600, 0:1000]
    image = np.stack([y * 255 // 599, x * 255 // 999, (x // 50 + y // 50) % 2 * 255], -1).astype(np.uint8)
    spec = aug.AugmentSpec(image_size=48)
    for raw in (tf.io.encode_jpeg(image, quality=98), tf.io.encode_png(image)):
        for s in range(6):
            seed = tf.constant([s, 1], tf.int64)
            crops = decode.decode_crops(raw, seed, spec).numpy().astype(float)
            for view, (t, l, h, w) in enumerate(decode.crop_boxes(raw, seed, spec).numpy()):
                # Pixel centres of the resized crop in original coordinates.
                cy = t + (np.arange(48) + 0.5) * h / 48 - 0.5
                cx = l + (np.arange(48) + 0.5) * w / 48 - 0.5
                np.testing.assert_allclose(crops[view, :, 0, 0], cy * 255 / 599, atol=4)
                np.testing.assert_allclose(crops[view, 0, :, 1], cx * 255 / 999, atol=4)


def test_eval_center_crop_at_224():
    """resize the shorter side to 256, centre-crop 224 (the official protocol), against PIL."""
    rng = np.random.default_rng(3)
    image = np.clip(rng.normal(128, 60, (300, 500, 3)), 0, 255).astype(np.uint8)
    out = aug.eval_resize_uint8(image[None], 224).numpy()[0].astype(float)
    resized = np.asarray(Image.fromarray(image).resize((426, 256), Image.BILINEAR)).astype(float)
    top, left = 16, 101  # round((256 - 224) / 2), round((426 - 224) / 2)
    assert np.abs(out - resized[top : top + 224, left : left + 224]).mean() < 2.0
    assert np.abs(out - resized[top : top + 224, left + 4 : left + 228]).mean() > 4.0  # a shifted crop is not
    square = aug.eval_resize_uint8(np.zeros([2, 40, 60, 3], np.uint8), 32)
    assert square.shape == (2, 32, 32, 3)  # below 96 px: the plain resize, as before


def test_memory_path_at_32px_is_unchanged():
    """The in-memory path's views and evaluation at 32 px, against digests of the code
    as it was when the inputs were given one decode stage and one batch format
    (tests/data/memory_path_32px.json): a change to the crops, the colour steps, the
    order or the batch format shows here."""
    from simsiam_tf.input import sources
    from simsiam_tf.input.memory import MemoryInput

    golden = json.load(open(os.path.join(os.path.dirname(__file__), "data", "memory_path_32px.json")))
    rng = np.random.default_rng(0)
    source = sources.ArraySource("golden", {"train": (rng.integers(0, 256, (16, 32, 32, 3), dtype=np.uint8), None)})
    memory = MemoryInput(source, catalog.decide_splits(source.stored), 32)
    ds = memory.worker_batches(8, 0, 1, aug.AugmentSpec.for_image_size(32), seed=3, epochs=2)
    sums = np.concatenate([b.numpy().astype(np.int64).sum(axis=(2, 3)) for b in ds.take(3)])  # [B, view, channel]
    np.testing.assert_array_equal(sums, golden["batch_sums"])
    evaluated = aug.eval_preprocess(tf.constant(rng.integers(0, 256, (2, 40, 24, 3), dtype=np.uint8)), 32).numpy()
    np.testing.assert_allclose(evaluated.sum(axis=(1, 2)), golden["eval_sums"], atol=0.02)


def test_a_hostile_folder_streams_like_it_loads(tmp_path):
    """The folder of tests/test_reliability.py (empty, truncated and fake images, a link
    loop; grey, RGBA, 16-bit, CMYK, a 10,000 px JPEG, a Latin-1 name): the stream decodes
    at the crop exactly the files the in-memory path decodes, and counts the rest."""
    from test_reliability import _hostile_folder

    bad = _hostile_folder(tmp_path)
    inp = _open(f"folder:{tmp_path}", 32)
    total = inp.num_train
    assert total == 12 + bad  # every file is listed, the self-link "loop.jpg" too; "up" is no class
    spec = aug.AugmentSpec(image_size=32)
    views = [b for b in inp.worker_batches(total, spec, seed=0, epochs=1, augment_on="device")]
    assert len(views) == 1 and views[0].shape == (total, 2, 32, 32, 3) and views[0].dtype == tf.uint8
    assert inp.skipped_in_training() == bad
