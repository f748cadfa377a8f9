"""The preset a dataset gets without --preset: from what a folder's images are.

train.py is mostly run up to the point where it refuses a --logdir that already holds
files, after the preset is chosen and printed and before TensorFlow is imported, so each
command line takes a second. Only the resume test trains: one tiny epoch, then one more.
"""

import json
import os
import subprocess
import sys

import pytest
from PIL import Image

from simsiam_tf import image_sizes
from simsiam_tf.config import SMALL_IMAGE_SIDE, choose_preset, make_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CIFAR = os.path.join(os.path.dirname(REPO), "shared", "datasets", "cifar10")


def _folder(root, size, ext, per_class=3):
    """root/train/<class>/*.<ext> of `size` = (width, height)."""
    for c in ("a", "b"):
        os.makedirs(root / "train" / c, exist_ok=True)
        for i in range(per_class):
            Image.new("RGB", size, (40 * i, 90, 30)).save(root / "train" / c / f"{i}.{ext}")
    return f"folder:{root}"


@pytest.fixture
def small(tmp_path):
    return _folder(tmp_path / "small", (32, 32), "png")


@pytest.fixture
def photos(tmp_path):
    return _folder(tmp_path / "photos", (400, 300), "jpg")


def _train_until_logdir_check(tmp_path, *args):
    """train.py's stdout and exit code, stopped before TensorFlow by a non-empty --logdir."""
    logdir = tmp_path / "taken"
    logdir.mkdir(exist_ok=True)
    (logdir / "keep.txt").write_text("mine")
    result = subprocess.run(
        [sys.executable, os.path.join(REPO, "train.py"), *args, "--logdir", str(logdir)],
        cwd=tmp_path, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 2 and "already holds files" in result.stderr, result.stderr[-2000:]
    assert "tensorflow" not in result.stderr.lower()
    return result.stdout


# The smallest training train.py runs: float32 (not what --precision auto picks on the
# CPU at hand), a narrow network, no monitors.
TINY = ["--width", "8", "--batch-size", "4", "--precision", "float32", "--knn-every", "0", "--diag-every", "0",
        "--projector-images", "0", "--seed", "3"]


def _train(tmp_path, *args):
    """train.py with `args` (TINY unless resuming) run to the end: the CompletedProcess."""
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    command = [sys.executable, os.path.join(REPO, "train.py"), *([] if "--resume" in args else TINY), *args]
    return subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=300, env=env)


def test_small_images_get_cifar(small):
    preset, why = choose_preset(small)
    assert preset == "cifar" and "median image 32x32 px over 6 sampled files" in why
    config = make_config(None, dataset=small)
    assert (config.preset, config.image_size, config.backbone) == ("cifar", 32, "resnet18")


def test_photos_get_imagenet_and_train_py_says_why(tmp_path, photos):
    preset, why = choose_preset(photos)
    assert preset == "imagenet" and "median image 400x300 px over 6 sampled files" in why
    config = make_config(None, dataset=photos)
    assert (config.preset, config.image_size, config.backbone) == ("imagenet", 224, "resnet50")
    out = _train_until_logdir_check(tmp_path, "--dataset", photos)
    assert f"preset: imagenet ({photos}: median image 400x300 px over 6 sampled files; images with a shorter side ≤ 64 px get cifar" in out


def test_image_size_overrides_the_size_and_chooses_the_recipe(tmp_path, small, photos):
    # Photos trained at 32 px get the CIFAR ResNet-18, whose stem is made for 32 px.
    config = make_config(None, dataset=photos, image_size=32)
    assert (config.preset, config.image_size, config.backbone) == ("cifar", 32, "resnet18")
    config = make_config(None, dataset=small, image_size=128)
    assert (config.preset, config.image_size, config.backbone) == ("imagenet", 128, "resnet50")
    assert choose_preset(small, SMALL_IMAGE_SIDE)[0] == "cifar" and choose_preset(small, SMALL_IMAGE_SIDE + 1)[0] == "imagenet"
    assert choose_preset("tfrecord:shards/*", 224)[0] == "imagenet"
    out = _train_until_logdir_check(tmp_path, "--dataset", photos, "--image-size", "32")
    assert "preset: cifar (--image-size 32 ≤ 64 px: the CIFAR ResNet-18 recipe; --preset overrides)" in out
    # With an explicit preset, --image-size still sets the size.
    assert make_config("imagenet", dataset=photos, image_size=96).image_size == 96


def test_an_explicit_preset_wins(tmp_path, small, photos):
    assert make_config("cifar", dataset=photos).preset == "cifar"
    assert make_config("imagenet", dataset=small).preset == "imagenet"
    out = _train_until_logdir_check(tmp_path, "--dataset", photos, "--preset", "cifar")
    assert "preset:" not in out


def test_prepared_shards_get_the_preset_of_their_images(tmp_path, small, photos):
    # prepare.py records the training images' median size in index.json.
    for folder, name, expected in ((small, "small-shards", "cifar"), (photos, "photo-shards", "imagenet")):
        out = tmp_path / name
        done = subprocess.run(
            [sys.executable, os.path.join(REPO, "prepare.py"), "--src", folder[len("folder:"):], "--out", str(out)],
            capture_output=True, text=True, timeout=300,
        )
        assert done.returncode == 0, done.stderr[-2000:]
        for spec in (f"tfrecord:{out}", f"tfrecord:{out}/train-*"):
            preset, why = choose_preset(spec)
            assert preset == expected, why
        assert make_config(None, dataset=f"tfrecord:{out}").preset == expected
    assert "median image 400x300 px over its 6 training images (index.json)" in why
    # An index from an older prepare.py (or none) leaves the shards on cifar, saying why.
    index = json.loads((out / "index.json").read_text())
    del index["splits"]["train"]["median_size"]
    (out / "index.json").write_text(json.dumps(index))
    preset, why = choose_preset(f"tfrecord:{out}")
    assert preset == "cifar" and "no index.json with image sizes" in why and "--preset imagenet" in why


def test_other_datasets_keep_their_presets():
    assert choose_preset("digits")[0] == "digits"
    assert choose_preset("imagenet2012")[0] == "imagenet"
    assert choose_preset("cifar10")[0] == "cifar"
    preset, why = choose_preset("tfrecord:shards/*")  # no index.json: sizes only inside the records
    assert preset == "cifar" and "--preset imagenet" in why


def test_unreadable_or_missing_folders_fall_back_and_leave_the_error_to_the_loader(tmp_path):
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "x.jpg").write_bytes(b"\xff\xd8\xff not really a jpeg")
    assert image_sizes.median_size(str(tmp_path / "broken")) is None
    assert choose_preset(f"folder:{tmp_path / 'broken'}") == ("cifar", f"folder:{tmp_path / 'broken'}: no image size could be read")
    assert image_sizes.median_size(str(tmp_path / "missing")) is None


def test_the_sample_is_fixed_spread_and_bounded(tmp_path):
    root = tmp_path / "many"
    for c in ("a", "b", "c"):
        os.makedirs(root / c)
        for i in range(100):
            (root / c / f"{i:03d}.png").write_bytes(b"")
    files = image_sizes.sample_files(str(root), 30)
    assert files == image_sizes.sample_files(str(root), 30) and len(files) == 30
    assert {os.path.basename(os.path.dirname(f)) for f in files} == {"a", "b", "c"}
    assert len([f for f in files if "/b/" in f]) == 10


def test_a_resumed_run_keeps_its_saved_preset(tmp_path, photos):
    # A run saved with the cifar preset on photos, whose size alone would pick imagenet
    # (224 px, ResNet-50). Trained for real: one step of 4 images per epoch; the time
    # goes to starting train.py and TensorFlow.
    run = tmp_path / "run"
    first = _train(tmp_path, "--dataset", photos, "--preset", "cifar", "--epochs", "1", "--logdir", str(run))
    assert first.returncode == 0, first.stderr[-2000:]
    saved = json.loads((run / "config.json").read_text())
    assert (saved["preset"], saved["image_size"], saved["backbone"]) == ("cifar", 32, "resnet18")

    # A flag that differs from the saved run stops it before training: no preset is chosen anew.
    refused = _train(tmp_path, "--resume", str(run), "--epochs", "3")
    assert refused.returncode == 2 and "flags differ" in refused.stderr
    assert "preset:" not in refused.stdout

    # Resumed for real, as a run stopped after epoch 1 of 2 leaves config.json, with the
    # --dataset that alone would pick imagenet for a new run.
    (run / "config.json").write_text(json.dumps({**saved, "epochs": 2}))
    resumed = _train(tmp_path, "--resume", str(run), "--dataset", photos)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "preset:" not in resumed.stdout and "epochs 2-2" in resumed.stdout, resumed.stdout[-2000:]
    assert "Training SimSiam (cifar preset)" in resumed.stdout  # what it trained, not only what config.json says
    config = json.loads((run / "config.json").read_text())
    assert (config["preset"], config["image_size"], config["backbone"]) == ("cifar", 32, "resnet18")
    assert json.loads((run / "summary.json").read_text())["epochs_completed"] == 2


@pytest.mark.skipif(not os.path.isdir(os.path.join(CIFAR, "train")), reason="no CIFAR-10 folder on this machine")
def test_cifar10_folder_gets_cifar(tmp_path):
    out = _train_until_logdir_check(tmp_path, "--dataset", f"folder:{CIFAR}")
    assert f"preset: cifar (folder:{CIFAR}: median image 32x32 px over 200 sampled files;" in out
