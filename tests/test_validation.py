"""The evaluation protocol: checkpoints are chosen on a validation split held out of the
training split, and the test split only measures.

A validation split that overlaps training or test, a best checkpoint chosen on the test
split, or a reported number that is not the chosen checkpoint's would each fail here.
"""

import json
import os

import numpy as np
import pytest
from PIL import Image

import evaluate
from simsiam_tf import checkpoints, export, training
from simsiam_tf import input as input_lib
from simsiam_tf.config import load_config, make_config, save_config
from simsiam_tf.input import catalog


def _input(dataset, size, kind, data_dir=None, **overrides):
    config = make_config("digits", dataset=dataset, image_size=size, data_dir=data_dir, input=kind, **overrides)
    return input_lib.open_input(config)[0]


def _split(data, name):
    return data.eval_split(name).materialize()


def test_hold_out_is_stratified_disjoint_and_fixed():
    labels = np.repeat(np.arange(5), [100, 40, 20, 7, 1])
    train, val = catalog.hold_out(labels, 0.1)
    assert np.intersect1d(train, val).size == 0
    np.testing.assert_array_equal(np.union1d(train, val), np.arange(len(labels)))
    # Each class gives round(0.1 * n) images, and never its only one.
    np.testing.assert_array_equal(np.bincount(labels[val], minlength=5), [10, 4, 2, 1, 0])
    again_train, again_val = catalog.hold_out(labels, 0.1)
    np.testing.assert_array_equal(val, again_val)
    # Random within a class, not its first images.
    assert not np.array_equal(val[:10], np.arange(10))


def test_digits_validation_split_is_held_out_of_training_and_apart_from_test():
    whole = _input("digits", 32, "memory", val_fraction=0.0)
    held = _input("digits", 32, "memory", val_fraction=0.1)
    (whole_train, whole_labels), (train, _), (val, val_labels) = (
        _split(whole, "train"), _split(held, "train"), _split(held, "val")
    )
    assert len(train) + len(val) == len(whole_train) == 1347
    assert len(val) == 136
    assert whole.eval_split("val") is None
    # Images as rows of bytes: the validation images are training images, none kept
    # for training, and the test split is untouched.
    rows = lambda a: {x.tobytes() for x in a}
    assert rows(val) <= rows(whole_train)
    assert not rows(val) & rows(train)
    np.testing.assert_array_equal(_split(held, "test")[0], _split(whole, "test")[0])
    # Stratified: every digit keeps about a tenth of its images in validation.
    share = np.bincount(val_labels, minlength=10) / np.bincount(whole_labels, minlength=10)
    assert np.all(np.abs(share - 0.1) < 0.02)


def _folder(root, per_class=20):
    for split, n in (("train", per_class), ("test", 4)):
        for c in range(3):
            d = root / split / f"class{c}"
            d.mkdir(parents=True)
            for i in range(n):
                Image.fromarray(np.full((8, 8, 3), 40 * c + i, np.uint8)).save(d / f"{i}.png")
    return root


def test_memory_and_streaming_inputs_hold_out_the_same_files(tmp_path):
    root = _folder(tmp_path / "images")
    memory = _input(f"folder:{root}", 16, "memory", val_fraction=0.25)
    streamed = _input(f"folder:{root}", 16, "stream", val_fraction=0.25)
    for name, count in (("train", 45), ("val", 15), ("test", 12)):
        assert len(memory.eval_split(name)) == len(streamed.eval_split(name)) == count
        images, labels = _split(streamed, name)
        np.testing.assert_array_equal(images, _split(memory, name)[0])
        np.testing.assert_array_equal(labels, _split(memory, name)[1])
    # Training never reads a validation file.
    files = catalog.scan_folder(str(root)).splits["train"].files
    members = streamed.splits["train"].indices
    read = {p.numpy().decode() for _, p, _ in streamed.source.epoch_records(members, 0, 0, 0, 1)}
    val = {files[i] for i in streamed.splits["val"].indices}
    assert read == set(files) - val and len(read) == 45


def test_a_tfds_datasets_own_validation_split_is_used(tmp_path):
    import tfds_tiny

    tfds_tiny.prepare(tmp_path, num_train=40, num_test=8, num_val=12, shards=2)
    for kind in ("memory", "stream"):
        data = _input("tiny_images", 16, kind, data_dir=str(tmp_path), val_fraction=0.1)
        assert [len(data.eval_split(s)) for s in ("train", "val", "test")] == [40, 12, 8]


def test_tfds_without_its_own_validation_split_holds_out_the_same_stratified_images_on_every_path(tmp_path):
    # Streamed, this was once the last quarter of the train split, unstratified, while
    # the in-memory path held out a stratified sample: two different validation splits.
    import tfds_tiny

    tfds_tiny.prepare(tmp_path, num_train=40, num_test=8, shards=2)
    memory = _input("tiny_images", 16, "memory", data_dir=str(tmp_path), val_fraction=0.2)
    streamed = _input("tiny_images", 16, "stream", data_dir=str(tmp_path), val_fraction=0.2)
    for data in (memory, streamed):
        assert [len(data.eval_split(s)) for s in ("train", "val")] == [32, 8]
    val, val_labels = _split(streamed, "val")
    np.testing.assert_array_equal(val, _split(memory, "val")[0])
    assert np.bincount(val_labels).tolist() == [2, 2, 2, 2]  # stratified: 2 of each class's 10
    assert not {x.tobytes() for x in val} & {x.tobytes() for x in _split(streamed, "train")[0]}


def _logs(val, test):
    return {"knn_val_top1": val, "knn_top1": test}


class _Weights:
    """A stand-in model: `save_weights` records the epoch it was called at."""

    diverged = None

    def __init__(self):
        self.saved = []
        self.epoch = 0

    def save_weights(self, path, overwrite=True):
        with open(path, "w") as f:
            f.write(str(self.epoch))
        self.saved.append(self.epoch)


def test_best_checkpoint_follows_validation_not_test(tmp_path):
    # Epoch 1 has the best test accuracy, epoch 2 the best validation accuracy: the
    # validation split chooses, and the chosen checkpoint's test accuracy is reported.
    best = checkpoints.BestCheckpoint(str(tmp_path))
    model = _Weights()
    best.set_model(model)
    seen = []
    for epoch, (val, test) in enumerate([(0.50, 0.90), (0.70, 0.40), (0.60, 0.80)]):
        model.epoch = epoch + 1
        logs = _logs(val, test)
        best.on_epoch_end(epoch, logs)
        seen.append(logs)
    assert model.saved == [1, 2]
    assert seen[-1]["knn_best_epoch"] == 2
    assert seen[-1]["knn_val_top1_best"] == 0.70
    assert seen[-1]["knn_top1_val_selected"] == 0.40
    info = json.loads((tmp_path / "checkpoints" / "best" / "info.json").read_text())
    assert info == {"epoch": 2, "selected_on": "val", "knn_val_top1": 0.70, "knn_top1": 0.40}
    assert (tmp_path / "checkpoints" / "best" / "model.weights.h5").read_text() == "2"
    # Resumed, it continues from the summary's record instead of starting over.
    resumed = checkpoints.BestCheckpoint(str(tmp_path), previous=seen[-1])
    resumed.set_model(model)
    logs = _logs(0.65, 0.95)
    resumed.on_epoch_end(3, logs)
    assert logs["knn_best_epoch"] == 2 and logs["knn_top1_val_selected"] == 0.40


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    logdir = str(tmp_path_factory.mktemp("val") / "run")
    # k = 200, as evaluate.py uses; 400 training images leave a 360-image bank.
    config = make_config(
        "digits", width=8, proj_dim=64, pred_dim=16, batch_size=64, epochs=3, train_limit=400,
        knn_every=1, diag_every=0, projector_images=0,
    )
    training.run(config, logdir, verbose=0)
    return logdir


def test_a_run_reports_last_and_validation_selected_test_accuracy(run_dir):
    summary = json.loads(open(os.path.join(run_dir, "summary.json")).read())
    history = summary["history"]
    val = [h["knn_val_top1"] for h in history]
    test = [h["knn_top1"] for h in history]
    best = int(np.argmax(val))  # the first of equals, as a strict improvement keeps it
    assert summary["knn_best_epoch"] == best + 1
    assert summary["knn_val_top1_best"] == val[best]
    assert summary["knn_top1_val_selected"] == test[best]
    assert summary["knn_top1"] == test[-1] and summary["knn_val_top1"] == val[-1]
    assert "knn_top1_best" not in summary  # the test-selected number is gone
    info = json.loads(open(os.path.join(run_dir, "checkpoints", "best", "info.json")).read())
    assert info["selected_on"] == "val" and info["epoch"] == best + 1


def test_evaluate_scores_the_chosen_checkpoint_as_training_did(run_dir, tmp_path, capsys):
    # evaluate.py on the val-selected checkpoint, with nothing but --run, reproduces the
    # test top-1 the run recorded for that checkpoint: it takes the run's 400-image
    # subset, validation split and bank from config.json. (It once read the whole
    # training split, the run's validation images in its bank.)
    summary = json.loads(open(os.path.join(run_dir, "summary.json")).read())
    out = tmp_path / "e.json"
    assert evaluate.main(["--run", run_dir, "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    result = json.loads(out.read_text())
    assert result["train_images"] == 360  # 400 less the 40 held out, as in training
    assert result["knn"]["top1"] == pytest.approx(summary["knn_top1_val_selected"], abs=1e-9)
    assert f"val-selected (epoch {summary['knn_best_epoch']})" in printed
    assert evaluate.main(["--run", run_dir, "--checkpoint", "last", "--json", str(out)]) == 0
    assert "(last (epoch 3)" in capsys.readouterr().out
    assert json.loads(out.read_text())["knn"]["top1"] == pytest.approx(summary["knn_top1"], abs=1e-9)


def test_without_a_validation_split_there_is_no_best_checkpoint(tmp_path, capsys):
    logdir = str(tmp_path / "run")
    config = make_config(
        "digits", width=8, proj_dim=64, pred_dim=16, batch_size=32, epochs=1, train_limit=64,
        knn_every=1, knn_k=20, diag_every=0, projector_images=0, val_fraction=0.0,
    )
    summary = training.run(config, logdir, verbose=0)
    assert "no best checkpoint is kept" in capsys.readouterr().err
    assert not os.path.exists(os.path.join(logdir, "checkpoints", "best"))
    assert summary["knn_top1"] is not None and summary["knn_top1_val_selected"] is None
    path = export.checkpoint_path(logdir, "best")  # falls back to the last, and says so
    assert export.checkpoint_selection(path) == "last (epoch 1)"


def test_runs_from_before_validation_splits_resume_without_one(tmp_path):
    path = tmp_path / "config.json"
    save_config(make_config("digits"), str(path))
    old = json.loads(path.read_text())
    del old["val_fraction"]
    path.write_text(json.dumps(old))
    assert load_config(str(path)).val_fraction == 0.0


def test_a_test_selected_checkpoint_of_an_older_run_is_labelled_so(tmp_path):
    best = tmp_path / "checkpoints" / "best"
    best.mkdir(parents=True)
    (best / "info.json").write_text(json.dumps({"epoch": 7, "knn_top1": 0.8}))
    label = export.checkpoint_selection(str(best / "model.weights.h5"))
    assert label.startswith("test-selected (epoch 7") and "older version" in label
