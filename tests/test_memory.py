"""The in-memory input: digits, image folders and tensorflow-datasets decoded once, and
the training batches made from them."""

import os

import numpy as np
import pytest
from PIL import Image

from simsiam_tf import augment as aug
from simsiam_tf import input as input_lib
from simsiam_tf.config import UsageError, make_config
from simsiam_tf.input import catalog, contract, sources, tfds_data
from simsiam_tf.input.memory import MemoryInput


def _load(dataset, size, data_dir=None, **overrides):
    """The dataset as the in-memory input holds it (no validation split unless asked)."""
    overrides.setdefault("val_fraction", 0.0)
    config = make_config("digits", dataset=dataset, image_size=size, data_dir=data_dir, input="memory", **overrides)
    return input_lib.open_input(config)[0]


def _split(data, name):
    return data.eval_split(name).materialize()


def _arrays(images, labels=None, size=16):
    source = sources.ArraySource("arrays", {"train": (images, labels)})
    return MemoryInput(source, catalog.decide_splits(source.stored), size)


def _write_image(path, size=(20, 16), colour=(200, 10, 10), mode="RGB"):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.new(mode, size, colour if mode == "RGB" else colour[0]).save(path)


def _labelled_folder(root, classes=("cat", "dog"), per_class=3, test_classes=None):
    for split, names in (("train", classes), ("test", test_classes or classes)):
        for c, name in enumerate(names):
            for i in range(per_class):
                ext = "png" if i % 2 else "jpg"
                _write_image(str(root / split / name / f"{i}.{ext}"), colour=(40 * c, 100, 20 * i))
    return root


def test_digits_split_is_fixed_stratified_and_rgb32():
    a, b = _load("digits", 32), _load("digits", 32)
    (a_train, a_labels), (a_test, a_test_labels) = _split(a, "train"), _split(a, "test")
    assert a_train.shape == (1347, 32, 32, 3) and a_test.shape == (450, 32, 32, 3)
    assert a_train.dtype == np.uint8 and a_train.max() > 200
    np.testing.assert_array_equal(a_labels, _split(b, "train")[1])
    np.testing.assert_array_equal(a_test, _split(b, "test")[0])
    share = np.bincount(a_test_labels, minlength=10) / 450
    assert np.allclose(share, np.bincount(a_labels, minlength=10) / 1347, atol=0.01)
    assert contract.can_monitor_knn(a)


def test_labelled_folder_with_bad_files(tmp_path):
    root = _labelled_folder(tmp_path)
    (root / "train" / "cat" / "broken.jpg").write_bytes(b"\xff\xd8\xff not really a jpeg")
    (root / "train" / "dog" / "empty.png").write_bytes(b"")
    (root / "train" / "dog" / "notes.txt").write_text("ignored: not an image extension")
    data = _load(f"folder:{root}", 24)
    images, labels = _split(data, "train")
    assert images.shape == (6, 24, 24, 3)
    assert sorted(labels.tolist()) == [0, 0, 0, 1, 1, 1]
    assert data.class_names == ["cat", "dog"]
    assert sorted(os.path.basename(f) for f in data.skipped) == ["broken.jpg", "empty.png"]
    assert data.eval_split("train").skipped == 2  # counted with the split they were missing from
    assert _split(data, "test")[0].shape == (6, 24, 24, 3) and contract.can_monitor_knn(data)


def test_grayscale_and_rgba_images_become_rgb(tmp_path):
    _write_image(str(tmp_path / "train" / "a" / "g.png"), mode="L", colour=(77,))
    img = Image.new("RGBA", (10, 10), (1, 2, 3, 128))
    img.save(tmp_path / "train" / "a" / "rgba.png")
    images, _ = _split(_load(f"folder:{tmp_path}", 16), "train")
    assert images.shape == (2, 16, 16, 3)
    assert {tuple(im[0, 0]) for im in images} == {(77, 77, 77), (1, 2, 3)}


def test_test_labels_follow_the_train_class_names(tmp_path):
    root = _labelled_folder(tmp_path, classes=("a", "b", "c"), test_classes=("b",))
    assert set(_split(_load(f"folder:{root}", 16), "test")[1].tolist()) == {1}


def test_flat_folder_is_unlabelled_and_skips_knn(tmp_path):
    for i in range(4):
        _write_image(str(tmp_path / f"img{i}.png"))
    data = _load(f"folder:{tmp_path}", 16, val_fraction=0.1)  # nothing to stratify by: no validation split
    images, labels = _split(data, "train")
    assert images.shape == (4, 16, 16, 3)
    assert labels is None and not contract.can_monitor_knn(data) and data.eval_split("val") is None


def test_train_limit_decodes_a_fixed_subset(tmp_path):
    root = _labelled_folder(tmp_path, per_class=10)
    a = _split(_load(f"folder:{root}", 16, train_limit=7), "train")[0]
    b = _split(_load(f"folder:{root}", 16, train_limit=7), "train")[0]
    assert len(a) == 7
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda p: str(p / "missing"), "does not exist"),
        (lambda p: (p / "empty").mkdir() or str(p / "empty"), "holds no .jpg"),
        (lambda p: (p / "x.txt").write_text("x") and str(p), "holds no .jpg"),
        (lambda p: "", "needs a path"),
    ],
)
def test_missing_or_empty_folders(tmp_path, make, message):
    with pytest.raises(UsageError, match=message):
        _load(f"folder:{make(tmp_path)}", 32)


def test_unknown_test_class_is_an_error(tmp_path):
    root = _labelled_folder(tmp_path, classes=("a",), test_classes=("zebra",))
    with pytest.raises(UsageError, match="not among the train classes"):
        _load(f"folder:{root}", 16)


def test_real_cifar10_folder(cifar_dir):
    data = _load(f"folder:{cifar_dir}", 32, train_limit=500)
    assert _split(data, "train")[0].shape == (500, 32, 32, 3)
    assert data.class_names[0] == "airplane" and len(data.class_names) == 10
    test_images, _ = _split(data, "test")
    assert test_images.shape == (10000, 32, 32, 3) and not data.skipped
    # The first test image is the first airplane file: TF's and PIL's JPEG decoders
    # differ by a few levels at most (chroma upsampling), images differ by far more.
    first = sorted(os.listdir(os.path.join(cifar_dir, "test", "airplane")))[0]
    pil = np.asarray(Image.open(os.path.join(cifar_dir, "test", "airplane", first)).convert("RGB")).astype(int)
    assert np.abs(test_images[0].astype(int) - pil).mean() < 1.5
    assert np.abs(test_images[1].astype(int) - pil).mean() > 10


def test_tfds_dataset_through_the_real_tfds_code(tmp_path):
    # tests/tfds_tiny.py writes real TFDS shards offline with TFDS's own builder.
    import tfds_tiny

    tfds_tiny.prepare(tmp_path, num_train=40, num_test=12, shards=2)
    data = _load("tiny_images", 24, str(tmp_path))
    train, train_labels = _split(data, "train")
    assert train.shape == (40, 24, 24, 3) and train.dtype == np.uint8
    assert _split(data, "test")[0].shape == (12, 24, 24, 3)
    assert data.class_names == list(tfds_tiny.CLASSES) and contract.can_monitor_knn(data)
    # Records are read in shard order, each with its own label (tfds_tiny: label = index % 4).
    assert sorted(np.bincount(train_labels).tolist()) == [10, 10, 10, 10]


def test_tfds_without_network_names_offline_alternatives(tmp_path, monkeypatch):
    monkeypatch.setattr(tfds_data, "network_available", lambda *a, **k: False)
    with pytest.raises(UsageError, match="cannot download 'cifar10'.*--dataset digits.*folder:PATH"):
        _load("cifar10", 32, data_dir=str(tmp_path))
    assert not os.listdir(tmp_path) or not any((tmp_path / "cifar10").rglob("*.tfrecord*"))


def test_unknown_dataset():
    with pytest.raises(UsageError, match="unknown dataset 'no_such_dataset_xyz'"):
        _load("no_such_dataset_xyz", 32)


def _epochs(memory, batch, seed, epochs, initial_epoch=0, workers=1, worker=0):
    spec = aug.AugmentSpec(image_size=16)
    return [b.numpy() for b in memory.worker_batches(batch, worker, workers, spec, seed, epochs, initial_epoch)]


def test_batches_are_the_batch_format_and_resume_exactly_where_they_stopped():
    memory = _arrays(np.random.default_rng(0).integers(0, 256, (40, 16, 16, 3), dtype=np.uint8))
    full = _epochs(memory, 8, seed=1, epochs=3)
    tail = _epochs(memory, 8, seed=1, epochs=3, initial_epoch=1)
    assert len(full) == 15 and len(tail) == 10
    assert full[0].shape == (8, 2, 16, 16, 3) and full[0].dtype == np.uint8
    for a, b in zip(full[5:], tail):
        np.testing.assert_array_equal(a, b)
    assert not np.array_equal(_epochs(memory, 8, seed=2, epochs=1)[0], full[0])


def test_a_batch_larger_than_the_data_is_refused():
    with pytest.raises(UsageError, match="larger than the 10 training images"):
        _epochs(_arrays(np.zeros((10, 16, 16, 3), np.uint8)), 16, seed=0, epochs=1)


def test_worker_shares_reproduce_the_global_batch_exactly():
    """Each of n workers builds only its slice, with the views one process would make."""
    memory = _arrays(np.random.default_rng(3).integers(0, 256, (48, 16, 16, 3), dtype=np.uint8))
    full = _epochs(memory, 12, seed=4, epochs=2)
    shares = [_epochs(memory, 12, seed=4, epochs=2, workers=3, worker=i) for i in range(3)]
    assert len(full) == 8 and all(len(s) == 8 for s in shares)
    for step, whole in enumerate(full):
        assert all(s[step].shape[0] == 4 for s in shares)
        np.testing.assert_array_equal(np.concatenate([s[step] for s in shares]), whole)


def test_tfds_train_limit_applies_before_the_memory_check(tmp_path, monkeypatch):
    """The memory check counts the limited train split plus test (and validation), not
    every split; the limited images are the subset `catalog.subset` takes of the full split."""
    import tfds_tiny

    tfds_tiny.prepare(tmp_path, num_train=64, num_test=16, shards=2)
    full = _load("tiny_images", 32, str(tmp_path))
    monkeypatch.setattr(input_lib, "memory_total", lambda: 2 * 40 * 32 * 32 * 3)  # half holds 40 images
    with pytest.raises(UsageError, match="80 images at 32 px"):
        _load("tiny_images", 32, str(tmp_path))
    limited = _load("tiny_images", 32, str(tmp_path), train_limit=20)  # 20 + 16 test images fit
    keep = catalog.subset(64, 20)
    np.testing.assert_array_equal(_split(limited, "train")[0], _split(full, "train")[0][keep])
    np.testing.assert_array_equal(_split(limited, "train")[1], _split(full, "train")[1][keep])
    np.testing.assert_array_equal(_split(limited, "test")[0], _split(full, "test")[0])
