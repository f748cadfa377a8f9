"""prepare.py and simsiam_tf.input.records: image folders in, TFRecord shards and index.json out.

Folders are built in tmp_path with PIL; prepare.py runs in-process except where the
process itself matters (SIGKILL mid-run, one-line errors of a real process).
"""

import io
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

import prepare
from simsiam_tf.input import records
from simsiam_tf.config import UsageError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RNG = np.random.default_rng(0)


def _image(path, width, height, fmt=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = RNG.integers(0, 256, (height, width, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path, fmt or ("PNG" if path.suffix == ".png" else "JPEG"))
    return path


def _folder(root, train, test=None):
    """root/train/<class>/i.jpg|png for {class: count}; sizes vary so the bytes differ."""
    for split, classes in (("train", train), ("test", test or {})):
        for name, count in classes.items():
            for i in range(count):
                _image(root / split / name / f"{i:04d}.{'png' if i % 3 == 0 else 'jpg'}", 8 + i % 13, 6 + i % 7)
    return root


def _main(args, capsys):
    try:
        code = prepare.main([str(a) for a in args])
    except SystemExit as e:  # argparse errors
        code = e.code
    out = capsys.readouterr()
    return code, out.out, out.err


def _records(out, split):
    """{filename: feature dict} of every record of `split`, and the filenames per shard."""
    index = records.read_index(str(out))
    found, per_shard = {}, []
    for shard in index["splits"][split]["shards"]:
        names = []
        for raw in tf.data.TFRecordDataset(str(out / shard["file"])):
            feature = tf.train.Example.FromString(raw.numpy()).features.feature
            name = feature["image/filename"].bytes_list.value[0].decode()
            found[name] = {
                "encoded": feature["image/encoded"].bytes_list.value[0],
                "format": feature["image/format"].bytes_list.value[0],
                "label": feature["image/class/label"].int64_list.value[0],
                "height": feature["image/height"].int64_list.value[0],
                "width": feature["image/width"].int64_list.value[0],
            }
            names.append(name)
        per_shard.append(names)
    return found, per_shard


def _one_error_line(err):
    lines = [l for l in err.splitlines() if "error:" in l]
    assert len(lines) == 1 and lines[0].startswith("prepare.py: error: "), err
    assert "Traceback" not in err
    return lines[0]


# ---------------------------------------------------------------------------
# Round trip.


def test_every_image_round_trips_with_its_bytes_label_and_size(tmp_path, capsys):
    src = _folder(tmp_path / "src", {"cat": 13, "dog": 11, "fox": 12}, {"dog": 4, "fox": 3})
    out = tmp_path / "out"
    code, stdout, err = _main(["--src", src, "--out", out, "--shards", 4, "--workers", 2], capsys)
    assert code == 0, err
    assert "Wrote train 36 images in 4 shards, test 7 images in 4 shards; skipped 0;" in stdout
    assert "warning" not in err and not (out / ".partial").exists()

    index = json.loads((out / "index.json").read_text())
    assert oct((out / "index.json").stat().st_mode & 0o777) == "0o644"
    assert index["format"] == "simsiam-tf-tfrecord" and index["version"] == 1
    assert index["source"] == str(src) and index["class_names"] == ["cat", "dog", "fox"]
    assert index["skipped"] == [] and index["max_side"] is None and index["seed"] == 0
    for split, classes in (("train", ["cat", "dog", "fox"]), ("test", ["dog", "fox"])):
        found, per_shard = _records(out, split)
        files = sorted(p.relative_to(src / split).as_posix() for p in (src / split).rglob("*.*"))
        assert sorted(found) == files
        for name, record in found.items():
            path = src / split / name
            assert record["encoded"] == path.read_bytes(), name
            assert record["format"] == (b"png" if name.endswith(".png") else b"jpeg")
            assert record["label"] == index["class_names"].index(name.split("/")[0])
            assert (record["width"], record["height"]) == Image.open(path).size
        shards = index["splits"][split]["shards"]
        counts = [s["count"] for s in shards]
        assert counts == [len(names) for names in per_shard] and sum(counts) == index["splits"][split]["count"]
        assert max(counts) - min(counts) <= 1
        assert [s["file"] for s in shards] == [f"{split}-{i:05d}-of-00004.tfrecord" for i in range(4)]
        assert all(s["bytes"] == (out / s["file"]).stat().st_size for s in shards)
        # Shuffled before sharding: every shard of 9 images mixes the sorted classes.
        if split == "train":
            assert all(len({name.split("/")[0] for name in names}) > 1 for names in per_shard)
        assert set(name.split("/")[0] for name in found) == set(classes)
        # The median size config.choose_preset reads: of the images themselves.
        sizes = [Image.open(p).size for p in (src / split).rglob("*.*")]
        assert index["splits"][split]["median_size"] == {
            "width": int(np.median([w for w, _ in sizes])), "height": int(np.median([h for _, h in sizes])),
            "shorter": int(np.median([min(w, h) for w, h in sizes])),
        }

    # parse: pure TF ops inside tf.data give the same bytes and labels.
    paths = [str(out / s["file"]) for s in index["splits"]["train"]["shards"]]
    parsed = tf.data.TFRecordDataset(paths).map(records.parse)
    found, _ = _records(out, "train")
    by_bytes = {r["encoded"]: r["label"] for r in found.values()}
    pairs = [(x.numpy(), y.numpy()) for x, y in parsed]
    assert len(pairs) == 36 and all(by_bytes[x] == y for x, y in pairs)
    assert parsed.element_spec[1].dtype == tf.int32 and parsed.element_spec[0].shape == []

    # The same seed writes the same shards.
    code, _, err = _main(["--src", src, "--out", tmp_path / "again", "--shards", 4], capsys)
    assert code == 0, err
    for shard in index["splits"]["train"]["shards"]:
        assert (tmp_path / "again" / shard["file"]).read_bytes() == (out / shard["file"]).read_bytes()


def test_a_folder_of_loose_images_is_unlabelled(tmp_path, capsys):
    src = tmp_path / "loose"
    for i in range(5):
        _image(src / f"{i}.jpg", 10, 12)
    code, _, err = _main(["--src", src, "--out", tmp_path / "out"], capsys)
    assert code == 0, err
    index = records.read_index(str(tmp_path / "out"))
    assert index["class_names"] == [] and list(index["splits"]) == ["train"]
    assert len(index["splits"]["train"]["shards"]) == 5  # at most one shard per image
    found, _ = _records(tmp_path / "out", "train")
    assert sorted(found) == [f"{i}.jpg" for i in range(5)]
    assert all(r["label"] == -1 for r in found.values())


def test_default_number_of_shards():
    assert records.default_num_shards(5, 10**6) == 5  # never an empty shard
    assert records.default_num_shards(50_000, 130 * 2**20) == 16  # CIFAR-10: the minimum
    assert records.default_num_shards(10**6, 100 * 128 * 2**20 + 1) == 101  # ~128 MiB each


# ---------------------------------------------------------------------------
# Bad files and resizing.


def test_undecodable_files_are_skipped_counted_and_listed(tmp_path, capsys):
    src = _folder(tmp_path / "src", {"cat": 10, "dog": 10})
    (src / "train" / "cat" / "empty.jpg").write_bytes(b"")
    good = (src / "train" / "cat" / "0001.jpg").read_bytes()
    (src / "train" / "dog" / "truncated.jpg").write_bytes(good[: len(good) // 2])
    (src / "train" / "dog" / "text.jpg").write_text("not an image\n")
    out = tmp_path / "out"
    code, stdout, err = _main(["--src", src, "--out", out, "--shards", 3], capsys)
    assert code == 0, err
    bad = ["train/cat/empty.jpg", "train/dog/text.jpg", "train/dog/truncated.jpg"]
    warnings = [l for l in err.splitlines() if "warning:" in l]
    assert len(warnings) == 1 and "skipped 3 file(s)" in warnings[0]
    assert all(b in warnings[0] for b in bad)
    assert "skipped 3;" in stdout
    index = records.read_index(str(out))
    assert index["skipped"] == bad and index["splits"]["train"]["count"] == 20
    found, per_shard = _records(out, "train")
    assert sorted(found) == sorted(f"{c}/{i:04d}.{'png' if i % 3 == 0 else 'jpg'}" for c in ("cat", "dog") for i in range(10))
    assert sorted(len(names) for names in per_shard) == [6, 7, 7]  # balanced over the images kept


def test_max_side_resizes_only_larger_images_keeping_their_aspect(tmp_path, capsys):
    src = tmp_path / "src"
    wide = _image(src / "train" / "a" / "wide.jpg", 200, 100)
    tall = _image(src / "train" / "a" / "tall.png", 60, 150)
    small = _image(src / "train" / "b" / "small.jpg", 40, 30)
    exact = _image(src / "train" / "b" / "exact.png", 64, 20)
    code, _, err = _main(["--src", src, "--out", tmp_path / "out", "--max-side", 64, "--quality", 90], capsys)
    assert code == 0, err
    found, _ = _records(tmp_path / "out", "train")
    assert records.read_index(str(tmp_path / "out"))["max_side"] == 64
    for name, path, size in (("a/wide.jpg", wide, (64, 32)), ("a/tall.png", tall, (26, 64))):
        record = found[name]
        assert record["format"] == b"jpeg" and record["encoded"] != path.read_bytes()
        stored = Image.open(io.BytesIO(record["encoded"]))
        assert stored.format == "JPEG" and stored.size == size == (record["width"], record["height"])
        original = Image.open(path).size
        assert abs(size[0] / size[1] - original[0] / original[1]) < 0.05
    for name, path in (("b/small.jpg", small), ("b/exact.png", exact)):
        assert found[name]["encoded"] == path.read_bytes()
        assert (found[name]["width"], found[name]["height"]) == Image.open(path).size


# ---------------------------------------------------------------------------
# Atomicity and the output directory.


def test_a_leftover_partial_directory_is_removed(tmp_path, capsys):
    src = _folder(tmp_path / "src", {"cat": 3, "dog": 3})
    leftover = tmp_path / "out" / ".partial"
    leftover.mkdir(parents=True)
    (leftover / "train-00000-of-00002.tfrecord").write_bytes(b"half a shard")
    code, _, err = _main(["--src", src, "--out", tmp_path / "out", "--shards", 2], capsys)
    assert code == 0, err
    assert not leftover.exists()
    assert sorted(os.listdir(tmp_path / "out")) == ["index.json", "train-00000-of-00002.tfrecord", "train-00001-of-00002.tfrecord"]


def test_an_out_dir_holding_a_dataset_is_refused_without_overwrite(tmp_path, capsys):
    src = _folder(tmp_path / "src", {"cat": 3, "dog": 3})
    out = tmp_path / "out"
    assert _main(["--src", src, "--out", out, "--shards", 3], capsys)[0] == 0
    before = {f: (out / f).read_bytes() for f in os.listdir(out)}
    code, _, err = _main(["--src", src, "--out", out, "--shards", 2], capsys)
    assert code == 2 and "pass --overwrite" in _one_error_line(err)
    assert {f: (out / f).read_bytes() for f in os.listdir(out)} == before

    (out / "notes.txt").write_text("kept")
    code, _, err = _main(["--src", src, "--out", out, "--shards", 2, "--overwrite"], capsys)
    assert code == 0, err
    # The three old shards are gone, not mixed with the two new ones.
    assert sorted(os.listdir(out)) == ["index.json", "notes.txt", "train-00000-of-00002.tfrecord", "train-00001-of-00002.tfrecord"]
    assert records.read_index(str(out))["splits"]["train"]["count"] == 6


def test_sigkill_mid_run_leaves_only_complete_shards(tmp_path, capsys):
    # A test split large enough that the run is still writing it when the train
    # shards, renamed into place at the end of their split, first appear.
    src = tmp_path / "src"
    for i in range(200):
        _image(src / "train" / ("cat" if i % 2 else "dog") / f"{i}.png", 48, 48)
    for i in range(2500):
        _image(src / "test" / ("cat" if i % 2 else "dog") / f"{i}.png", 48, 48)
    out = tmp_path / "out"
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    proc = subprocess.Popen(
        [sys.executable, os.path.join(REPO, "prepare.py"), "--src", str(src), "--out", str(out), "--shards", "8"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
    )
    deadline = time.time() + 60
    while time.time() < deadline and proc.poll() is None:
        if out.is_dir() and any(f.endswith(".tfrecord") for f in os.listdir(out)):
            break
        time.sleep(0.002)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    assert proc.returncode == -signal.SIGKILL, "prepare.py finished before it could be killed mid-run"

    assert not (out / "index.json").exists()
    assert (out / ".partial").is_dir()  # the test split was being written there
    shards = sorted(str(out / f) for f in os.listdir(out) if f.endswith(".tfrecord"))
    assert shards and all(os.path.basename(s).startswith("train-") for s in shards)
    assert records.find_damaged_shards(shards) == []
    assert sum(sum(1 for _ in tf.data.TFRecordDataset(s)) for s in shards) == 25 * len(shards)

    # The killed run's shards are refused without --overwrite; with it, .partial goes.
    code, _, err = _main(["--src", src, "--out", out], capsys)
    assert code == 2 and "no index.json" in _one_error_line(err)
    code, _, err = _main(["--src", src, "--out", out, "--shards", 8, "--overwrite"], capsys)
    assert code == 0, err
    assert not (out / ".partial").exists()
    index = records.read_index(str(out))
    records.check_shard_sizes(str(out), index, "train")
    records.check_shard_sizes(str(out), index, "test")
    assert index["splits"]["test"]["count"] == 2500


# ---------------------------------------------------------------------------
# Checks the streaming reader makes before training.


def _write(path, payloads):
    with tf.io.TFRecordWriter(str(path)) as writer:
        for payload in payloads:
            writer.write(payload)
    return str(path)


@pytest.fixture
def shard(tmp_path):
    example = records.make_example(b"\xff\xd8jpeg bytes", 3, 2, 2, b"jpeg", "cat/0001.jpg")
    return _write(tmp_path / "good.tfrecord", [example] * 50)


def test_parse_eagerly_and_in_tf_data(shard):
    unlabelled = tf.train.Example(features=tf.train.Features(feature={
        "image/encoded": tf.train.Feature(bytes_list=tf.train.BytesList(value=[b"png bytes"])),
    })).SerializeToString()
    encoded, label = records.parse(tf.constant(unlabelled))
    assert (encoded.numpy(), label.numpy(), label.dtype) == (b"png bytes", -1, tf.int32)
    pairs = list(tf.data.TFRecordDataset(shard).map(records.parse).take(2).as_numpy_iterator())
    assert pairs == [(b"\xff\xd8jpeg bytes", 3)] * 2


def test_check_first_record(tmp_path, shard):
    assert records.check_first_record(shard) is None
    assert records.check_first_record(_write(tmp_path / "empty.tfrecord", [])) is None
    not_examples = _write(tmp_path / "text.tfrecord", [b"not an example proto"])
    with pytest.raises(UsageError, match="text.tfrecord .*write shards with prepare.py or the TF Model Garden classification layout"):
        records.check_first_record(not_examples)
    other = tf.train.Example(features=tf.train.Features(feature={
        "image/raw": tf.train.Feature(bytes_list=tf.train.BytesList(value=[b"pixels"])),
    })).SerializeToString()
    with pytest.raises(UsageError, match="records in .*other.tfrecord have no image/encoded feature; write shards with prepare.py"):
        records.check_first_record(_write(tmp_path / "other.tfrecord", [other]))
    (tmp_path / "plain.tfrecord").write_text("a text file, not TFRecord framing at all\n")
    with pytest.raises(UsageError, match="plain.tfrecord cannot be read as a TFRecord file"):
        records.check_first_record(str(tmp_path / "plain.tfrecord"))


def test_truncated_and_missing_shards_are_named(tmp_path, capsys):
    src = _folder(tmp_path / "src", {"cat": 4, "dog": 4})
    out = tmp_path / "out"
    assert _main(["--src", src, "--out", out, "--shards", 4], capsys)[0] == 0
    index = records.read_index(str(out))
    records.check_shard_sizes(str(out), index, "train")
    first, second = (out / s["file"] for s in index["splits"]["train"]["shards"][:2])
    first.write_bytes(first.read_bytes()[:-7])
    second.unlink()
    with pytest.raises(UsageError) as caught:
        records.check_shard_sizes(str(out), index, "train")
    message = str(caught.value)
    assert f"{first.name} ({first.stat().st_size:,} bytes on disk" in message
    assert f"{second.name} (missing)" in message and "re-run prepare.py" in message
    assert "train-00002" not in message

    third = out / index["splits"]["train"]["shards"][2]["file"]
    flipped = bytearray(third.read_bytes())
    flipped[len(flipped) // 2] ^= 0xFF  # same size, so only reading it finds the damage
    third.write_bytes(bytes(flipped))
    shards = [str(out / s["file"]) for s in index["splits"]["train"]["shards"]]
    damaged = dict(records.find_damaged_shards(shards))
    assert list(damaged) == [str(first), str(second), str(third)]
    assert "truncated record" in damaged[str(first)] and "corrupted record" in damaged[str(third)]
    assert "function_node" not in damaged[str(third)]


def test_read_index(tmp_path, capsys):
    assert records.read_index(str(tmp_path)) is None
    (tmp_path / "index.json").write_text("{not json")
    with pytest.raises(UsageError, match="index.json is not valid JSON"):
        records.read_index(str(tmp_path))
    src = _folder(tmp_path / "src", {"cat": 2, "dog": 2})
    assert _main(["--src", src, "--out", tmp_path / "out"], capsys)[0] == 0
    index = json.loads((tmp_path / "out" / "index.json").read_text())
    index["splits"]["train"]["shards"][0]["file"] = "../../etc/passwd"
    (tmp_path / "out" / "index.json").write_text(json.dumps(index))
    with pytest.raises(UsageError, match="not a plain file name"):
        records.read_index(str(tmp_path / "out"))


# ---------------------------------------------------------------------------
# Command-line errors.


@pytest.mark.parametrize(
    "args, message",
    [
        (["--out", "OUT"], "the following arguments are required: --src"),
        (["--src", "MISSING", "--out", "OUT"], "does not exist or is not a directory"),
        (["--src", "EMPTY", "--out", "OUT"], "holds no .jpg, .jpeg or .png files"),
        (["--src", "SRC", "--out", "OUT", "--shards", "0"], "expected at least 1, got 0"),
        (["--src", "SRC", "--out", "OUT", "--quality", "101"], "expected 1..100, got 101"),
        (["--src", "SRC", "--out", "OUT", "--workers", "two"], "expected a whole number, got 'two'"),
        (["--src", "SRC", "--out", "FILE"], "is a file, not a directory"),
        (["--src", "SRC", "--out", "FILE/sub"], "cannot be written"),
        (["--src", "UNKNOWN_TEST_CLASS", "--out", "OUT"], "test classes ['emu'] in"),
        (["--src", "ALL_BAD", "--out", "OUT"], "none of the 2 image files"),
    ],
)
def test_bad_input_exits_2_with_one_line(tmp_path, capsys, args, message):
    (tmp_path / "EMPTY").mkdir()
    _folder(tmp_path / "SRC", {"cat": 2})
    _folder(tmp_path / "UNKNOWN_TEST_CLASS", {"cat": 2}, {"emu": 1})
    (tmp_path / "ALL_BAD" / "train" / "cat").mkdir(parents=True)
    for name in ("a.jpg", "b.png"):
        (tmp_path / "ALL_BAD" / "train" / "cat" / name).write_text("text")
    (tmp_path / "FILE").write_text("a file")
    names = ("MISSING", "EMPTY", "SRC", "OUT", "FILE", "UNKNOWN_TEST_CLASS", "ALL_BAD")
    args = [str(tmp_path / a) if a.split("/")[0] in names else a for a in args]
    code, _, err = _main(args, capsys)
    assert code == 2
    assert message in _one_error_line(err)
    assert not (tmp_path / "OUT").exists() or not any(f.endswith(".tfrecord") for f in os.listdir(tmp_path / "OUT"))


def test_a_real_process_prints_one_line_and_exits_2(tmp_path):
    result = subprocess.run(
        [sys.executable, os.path.join(REPO, "prepare.py"), "--src", str(tmp_path / "nothing"), "--out", str(tmp_path / "out")],
        capture_output=True, text=True, env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"), timeout=120,
    )
    assert result.returncode == 2
    assert "does not exist" in _one_error_line(result.stderr)
    assert not (tmp_path / "out").exists()
