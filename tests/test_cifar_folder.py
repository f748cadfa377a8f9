"""make_cifar10_folder.py: a TFDS dataset out, the image folder train.py reads in; and the
files a fresh checkout carries beside it (LICENSE, CITATION.cff).

The dataset is tests/tfds_tiny.py's, real TFDS shards prepared offline in a tmp data_dir.
The script runs in-process, as prepare.py's tests run prepare.py (importing tfds_tiny is
what registers `tiny_images`); a real process only where the process itself matters:
one-line errors and their exit codes.
"""

import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

import make_cifar10_folder
import tfds_tiny
from simsiam_tf.input import catalog, tfds_data

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NUM_TRAIN, NUM_TEST = 24, 8  # tfds_tiny labels image i as i % 4: 6 and 2 per class
# Two JPEG round trips (TFDS stores tiny_images as JPEG, the script writes quality 95) of
# flat colours: measured at most 1 level of 255 off; the class's next image is 4 away.
JPEG_TOLERANCE = 2


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tfds")
    tfds_tiny.prepare(path, num_train=NUM_TRAIN, num_test=NUM_TEST, shards=2)
    return str(path)


def _main(args, capsys):
    try:
        code = make_cifar10_folder.main([str(a) for a in args])
    except SystemExit as e:  # argparse errors
        code = e.code
    out = capsys.readouterr()
    return code, out.out, out.err


def _run(*args, timeout=60):
    """The script as a real process: (exit code, stdout, stderr)."""
    proc = subprocess.run(
        [sys.executable, "make_cifar10_folder.py", *map(str, args)], cwd=REPO, capture_output=True, text=True, check=False,
        env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"), timeout=timeout,
    )
    return proc.returncode, proc.stdout, proc.stderr


def _one_line(err):
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def _siblings(out):
    """What the script left beside --out other than --out itself (a .partial- or .old- folder)."""
    return sorted(n for n in os.listdir(out.parent) if n.startswith(out.name + "."))


def test_writes_every_image_under_its_class_with_its_pixels(data_dir, tmp_path, capsys):
    out = tmp_path / "cifar"
    code, stdout, err = _main(["--out", out, "--dataset", "tiny_images", "--data-dir", data_dir], capsys)
    assert code == 0, err
    lines = stdout.strip().splitlines()
    assert lines[0].startswith(f"train: {NUM_TRAIN} images from tiny_images 'train' (")
    assert lines[1].startswith(f"test: {NUM_TEST} images from tiny_images 'test' (")
    assert lines[2].startswith(f"Wrote {NUM_TRAIN} train and {NUM_TEST} test images of tiny_images (4 classes, "
                               f"JPEG quality 95) to {out} in ")
    assert lines[2].endswith(f"; train on them with: python train.py --dataset folder:{out}")
    assert sorted(os.listdir(out)) == ["test", "train"] and _siblings(out) == []
    for split, count in (("train", NUM_TRAIN), ("test", NUM_TEST)):
        assert sorted(os.listdir(out / split)) == sorted(tfds_tiny.CLASSES)
        for label, name in enumerate(tfds_tiny.CLASSES):
            files = sorted(os.listdir(out / split / name))
            assert files == [f"{n:04d}.jpg" for n in range(count // 4)]
            # tfds_tiny.image(label, i) differs by i: every image of the class comes back
            # once, with the generator's pixels.
            expected = {i: tfds_tiny.image(label, i).astype(int) for i in range(label, count, 4)}
            found = []
            for f in files:
                pixels = tf.io.decode_jpeg(tf.io.read_file(str(out / split / name / f))).numpy().astype(int)
                diff, i = min((np.abs(pixels - image).max(), i) for i, image in expected.items())
                assert diff <= JPEG_TOLERANCE, (split, name, f, diff)
                found.append(i)
            assert sorted(found) == sorted(expected), (split, name, found)


def test_the_folder_is_what_train_py_reads(data_dir, tmp_path, capsys):
    out = tmp_path / "cifar"
    assert _main(["--out", out, "--dataset", "tiny_images", "--data-dir", data_dir], capsys)[0] == 0
    folder = catalog.scan_folder(str(out))
    assert folder.class_names == sorted(tfds_tiny.CLASSES)
    assert sorted(folder.splits) == ["test", "train"]
    for split, count in (("train", NUM_TRAIN), ("test", NUM_TEST)):
        files, labels = folder.splits[split].files, folder.splits[split].labels
        assert len(files) == count and np.bincount(labels).tolist() == [count // 4] * 4
        assert all(os.path.basename(os.path.dirname(f)) == folder.class_names[y] for f, y in zip(files, labels))


def test_limit_takes_at_most_n_images_per_split(data_dir, tmp_path, capsys):
    out = tmp_path / "small"
    code, stdout, err = _main(["--out", out, "--dataset", "tiny_images", "--data-dir", data_dir, "--limit", 6], capsys)
    assert code == 0, err
    assert "Wrote 6 train and 6 test images" in stdout
    for split in ("train", "test"):
        assert sum(len(files) for _, _, files in os.walk(out / split)) == 6
    catalog.scan_folder(str(out))  # still a folder train.py accepts


def test_an_existing_folder_is_refused_with_one_line_and_kept(tmp_path):
    out = tmp_path / "cifar"
    (out / "train").mkdir(parents=True)
    (out / "train" / "mine.jpg").write_bytes(b"keep")
    code, stdout, err = _run("--out", out, "--dataset", "tiny_images")
    assert code == 2 and stdout == ""
    assert _one_line(err) == (
        f"make_cifar10_folder.py: error: --out {str(out)!r} exists and is not empty; "
        "pass --overwrite to replace it, or choose another --out"
    )
    assert (out / "train" / "mine.jpg").read_bytes() == b"keep" and _siblings(out) == []


def test_overwrite_replaces_the_folder_whole(data_dir, tmp_path, capsys):
    out = tmp_path / "cifar"
    (out / "train" / "stale").mkdir(parents=True)
    (out / "train" / "stale" / "old.jpg").write_bytes(b"old")
    code, _, err = _main(["--out", out, "--dataset", "tiny_images", "--data-dir", data_dir, "--overwrite"], capsys)
    assert code == 0, err
    assert sorted(os.listdir(out / "train")) == sorted(tfds_tiny.CLASSES) and _siblings(out) == []


def test_an_empty_out_folder_is_filled(data_dir, tmp_path, capsys):
    out = tmp_path / "cifar"
    out.mkdir()
    assert _main(["--out", out, "--dataset", "tiny_images", "--data-dir", data_dir, "--limit", 4], capsys)[0] == 0
    assert sorted(os.listdir(out)) == ["test", "train"] and _siblings(out) == []


@pytest.mark.parametrize(
    "args, message",
    [
        (["--limit", "-1"], "argument --limit: expected a number >= 0, got -1 (see --help)"),
        (["--limit", "all"], "argument --limit: expected a whole number, got 'all' (see --help)"),
        (["--dataset", "no_such_dataset"], "--dataset 'no_such_dataset' is not a tensorflow-datasets name"),
    ],
)
def test_bad_arguments_exit_2_with_one_line(tmp_path, capsys, args, message):
    out = tmp_path / "cifar"
    code, _, err = _main(["--out", out, *args], capsys)
    assert code == 2 and message in _one_line(err) and not out.exists()


def test_without_network_a_dataset_not_prepared_fails_with_one_line(tmp_path):
    if tfds_data.network_available():
        pytest.skip("the network is up: TFDS would download CIFAR-10 (160 MB)")
    empty, out = tmp_path / "tfds", tmp_path / "cifar"
    empty.mkdir()
    code, stdout, err = _run("--out", out, "--data-dir", empty, timeout=30)
    assert code == 2 and stdout == ""
    assert _one_line(err) == (
        "make_cifar10_folder.py: error: tensorflow-datasets could not get cifar10 (no network, and it is not "
        f"prepared in {empty}/cifar10/3.0.2): run `python make_cifar10_folder.py --out DIR` on a machine with "
        "network and copy DIR here, or pass --data-dir where it is prepared"
    )
    assert not out.exists() and _siblings(out) == [] and os.listdir(empty) == []


# --- LICENSE and CITATION.cff -------------------------------------------------------


def test_license_is_apache_2_with_the_projects_copyright():
    with open(os.path.join(REPO, "LICENSE")) as f:
        text = f.read()
    assert text.lstrip().startswith("Apache License\n                           Version 2.0, January 2004")
    assert "END OF TERMS AND CONDITIONS" in text and "Copyright [yyyy]" not in text
    assert "\n   Copyright 2026 The simsiam-tf Authors\n" in text


def test_citation_cff_has_the_required_keys_and_cites_the_paper():
    with open(os.path.join(REPO, "CITATION.cff")) as f:
        text = f.read()
    try:
        import yaml
    except ImportError:  # PyYAML is no dependency: the top-level keys line by line
        keys = {line.split(":")[0] for line in text.splitlines() if line[:1].isalpha()}
        assert {"cff-version", "message", "title", "authors", "type", "license", "references"} <= keys
    else:
        cff = yaml.safe_load(text)
        assert cff["cff-version"] == "1.2.0" and cff["title"] == "simsiam-tf" and cff["type"] == "software"
        assert cff["license"] == "Apache-2.0" and cff["authors"] and "SimSiam paper" in cff["message"]
        (paper,) = cff["references"]
        assert paper["title"] == "Exploring Simple Siamese Representation Learning" and paper["year"] == 2021
        assert [a["family-names"] for a in paper["authors"]] == ["Chen", "He"]
    assert "arXiv:2011.10566" in text
