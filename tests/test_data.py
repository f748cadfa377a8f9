"""Data sources and the pair pipeline: digits, image folders, tensorflow-datasets."""

import os

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds
from PIL import Image

from simsiam_tf import augment as aug
from simsiam_tf import data as data_lib
from simsiam_tf.config import UsageError


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
    a, b = data_lib.load_digits(32), data_lib.load_digits(32)
    assert a.train_images.shape == (1347, 32, 32, 3) and a.test_images.shape == (450, 32, 32, 3)
    assert a.train_images.dtype == np.uint8 and a.train_images.max() > 200
    np.testing.assert_array_equal(a.train_labels, b.train_labels)
    np.testing.assert_array_equal(a.test_images, b.test_images)
    share = np.bincount(a.test_labels, minlength=10) / 450
    assert np.allclose(share, np.bincount(a.train_labels, minlength=10) / 1347, atol=0.01)
    assert a.has_knn_splits


def test_labelled_folder_with_bad_files(tmp_path):
    root = _labelled_folder(tmp_path)
    (root / "train" / "cat" / "broken.jpg").write_bytes(b"\xff\xd8\xff not really a jpeg")
    (root / "train" / "dog" / "empty.png").write_bytes(b"")
    (root / "train" / "dog" / "notes.txt").write_text("ignored: not an image extension")
    data = data_lib.load(f"folder:{root}", 24)
    assert data.train_images.shape == (6, 24, 24, 3)
    assert sorted(data.train_labels.tolist()) == [0, 0, 0, 1, 1, 1]
    assert data.class_names == ["cat", "dog"]
    assert sorted(os.path.basename(f) for f in data.skipped) == ["broken.jpg", "empty.png"]
    assert data.test_images.shape == (6, 24, 24, 3) and data.has_knn_splits


def test_grayscale_and_rgba_images_become_rgb(tmp_path):
    _write_image(str(tmp_path / "train" / "a" / "g.png"), mode="L", colour=(77,))
    img = Image.new("RGBA", (10, 10), (1, 2, 3, 128))
    img.save(tmp_path / "train" / "a" / "rgba.png")
    data = data_lib.load(f"folder:{tmp_path}", 16)
    assert data.train_images.shape == (2, 16, 16, 3)
    assert {tuple(im[0, 0]) for im in data.train_images} == {(77, 77, 77), (1, 2, 3)}


def test_test_labels_follow_the_train_class_names(tmp_path):
    root = _labelled_folder(tmp_path, classes=("a", "b", "c"), test_classes=("b",))
    data = data_lib.load(f"folder:{root}", 16)
    assert set(data.test_labels.tolist()) == {1}


def test_flat_folder_is_unlabelled_and_skips_knn(tmp_path):
    for i in range(4):
        _write_image(str(tmp_path / f"img{i}.png"))
    data = data_lib.load(f"folder:{tmp_path}", 16)
    assert data.train_images.shape == (4, 16, 16, 3)
    assert data.train_labels is None and not data.has_knn_splits


def test_train_limit_decodes_a_fixed_subset(tmp_path):
    root = _labelled_folder(tmp_path, per_class=10)
    a = data_lib.load(f"folder:{root}", 16, train_limit=7)
    b = data_lib.load(f"folder:{root}", 16, train_limit=7)
    assert len(a.train_images) == 7
    np.testing.assert_array_equal(a.train_images, b.train_images)


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
        data_lib.load(f"folder:{make(tmp_path)}", 32)


def test_unknown_test_class_is_an_error(tmp_path):
    root = _labelled_folder(tmp_path, classes=("a",), test_classes=("zebra",))
    with pytest.raises(UsageError, match="not among the train classes"):
        data_lib.load(f"folder:{root}", 16)


def test_real_cifar10_folder(cifar_dir):
    data = data_lib.load(f"folder:{cifar_dir}", 32, train_limit=500)
    assert data.train_images.shape == (500, 32, 32, 3)
    assert data.class_names[0] == "airplane" and len(data.class_names) == 10
    assert data.test_images.shape == (10000, 32, 32, 3) and not data.skipped
    # The first test image is the first airplane file: TF's and PIL's JPEG decoders
    # differ by a few levels at most (chroma upsampling), images differ by far more.
    first = sorted(os.listdir(os.path.join(cifar_dir, "test", "airplane")))[0]
    pil = np.asarray(Image.open(os.path.join(cifar_dir, "test", "airplane", first)).convert("RGB")).astype(int)
    assert np.abs(data.test_images[0].astype(int) - pil).mean() < 1.5
    assert np.abs(data.test_images[1].astype(int) - pil).mean() > 10


def test_tfds_source_through_the_real_loading_code(monkeypatch):
    # tfds.testing.mock_data stands in for the download and the stored records; the
    # builder, splits, features and our conversion are the real code.
    monkeypatch.setattr(data_lib, "network_available", lambda *a, **k: True)
    with tfds.testing.mock_data(num_examples=40):
        data = data_lib.load("cifar10", 24)
    assert data.train_images.shape == (40, 24, 24, 3) and data.train_images.dtype == np.uint8
    assert data.test_images.shape == (40, 24, 24, 3)
    assert len(data.class_names) == 10 and data.has_knn_splits
    assert data.train_labels.min() >= 0 and data.train_labels.max() < 10


def test_tfds_without_network_names_offline_alternatives(tmp_path, monkeypatch):
    monkeypatch.setattr(data_lib, "network_available", lambda *a, **k: False)
    with pytest.raises(UsageError, match="cannot download 'cifar10'.*--dataset digits.*folder:PATH"):
        data_lib.load("cifar10", 32, data_dir=str(tmp_path))
    assert not os.listdir(tmp_path) or not any((tmp_path / "cifar10").rglob("*.tfrecord*"))


def test_unknown_dataset():
    with pytest.raises(UsageError, match="unknown dataset 'no_such_dataset_xyz'"):
        data_lib.load("no_such_dataset_xyz", 32)


def test_pair_dataset_resumes_exactly_where_it_stopped():
    images = np.random.default_rng(0).integers(0, 256, (40, 16, 16, 3), dtype=np.uint8)
    layer = aug.SimSiamAugment(aug.AugmentSpec(image_size=16))
    full = [tuple(v.numpy() for v in b) for b in data_lib.pair_dataset(images, 8, layer, seed=1, epochs=3)]
    tail = [tuple(v.numpy() for v in b) for b in data_lib.pair_dataset(images, 8, layer, seed=1, epochs=3, initial_epoch=1)]
    assert len(full) == 15 and len(tail) == 10
    for (a1, a2), (b1, b2) in zip(full[5:], tail):
        np.testing.assert_array_equal(a1, b1)
        np.testing.assert_array_equal(a2, b2)
    other = next(iter(data_lib.pair_dataset(images, 8, layer, seed=2, epochs=1)))[0].numpy()
    assert not np.allclose(other, full[0][0])


def test_pair_dataset_rejects_a_batch_larger_than_the_data():
    layer = aug.SimSiamAugment(aug.AugmentSpec(image_size=16))
    with pytest.raises(UsageError, match="larger than the 10 training images"):
        data_lib.pair_dataset(np.zeros((10, 16, 16, 3), np.uint8), 16, layer, seed=0, epochs=1)


def test_worker_shards_reproduce_the_global_batch_exactly():
    """Each of n workers builds only its slice, with the views one process would make."""
    images = np.random.default_rng(3).integers(0, 256, (48, 16, 16, 3), dtype=np.uint8)
    layer = aug.SimSiamAugment(aug.AugmentSpec(image_size=16))
    full = [tuple(v.numpy() for v in b) for b in data_lib.pair_dataset(images, 12, layer, seed=4, epochs=2)]
    shards = [
        [tuple(v.numpy() for v in b) for b in data_lib.pair_dataset(images, 12, layer, seed=4, epochs=2, shard=(i, 3))]
        for i in range(3)
    ]
    assert len(full) == 8 and all(len(s) == 8 for s in shards)
    for step, whole in enumerate(full):
        for view in range(2):
            assert all(s[step][view].shape[0] == 4 for s in shards)
            np.testing.assert_allclose(np.concatenate([s[step][view] for s in shards]), whole[view], atol=1e-6)


def test_tfds_train_limit_applies_before_the_memory_check(tmp_path, monkeypatch):
    """The memory check counts the limited train split plus test (and validation), not
    every split; the limited images are the subset `subset` takes of the full split."""
    import tfds_tiny

    tfds_tiny.prepare(tmp_path, num_train=64, num_test=16, shards=2)
    full = data_lib.load("tiny_images", 32, str(tmp_path))
    monkeypatch.setattr(data_lib, "memory_total", lambda: 2 * 40 * 32 * 32 * 3)  # half holds 40 images
    with pytest.raises(UsageError, match="80 images at 32 px"):
        data_lib.load("tiny_images", 32, str(tmp_path))
    limited = data_lib.load("tiny_images", 32, str(tmp_path), train_limit=20)  # 20 + 16 test images fit
    keep = data_lib.subset(64, 20)
    np.testing.assert_array_equal(limited.train_images, full.train_images[keep])
    np.testing.assert_array_equal(limited.train_labels, full.train_labels[keep])
    np.testing.assert_array_equal(limited.test_images, full.test_images)
