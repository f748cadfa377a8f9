"""train.py as a user runs it: bad input exits 2 with one line, runs write their artefacts."""

import json
import os
import platform
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from simsiam_tf import rundir, training
from simsiam_tf.config import UsageError, load_config, make_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _train(args, cwd, timeout=300, env=None):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", **(env or {}))
    env.pop("TF_ENABLE_ONEDNN_OPTS", None)  # importing simsiam_tf here set it; train.py must by itself
    return subprocess.run(
        [sys.executable, os.path.join(REPO, "train.py"), *args],
        cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env,
    )


# Pinned to float32: what these runs check must not depend on what --precision auto
# picks on the CPU at hand (bfloat16 on one with AVX512-BF16 or AMX).
TINY_AUTO = ["--width", "8", "--batch-size", "32", "--train-limit", "64", "--knn-every", "2", "--seed", "5"]
TINY_FLAGS = [*TINY_AUTO, "--precision", "float32"]


def _error_lines(stderr):
    return [l for l in stderr.splitlines() if "error:" in l]


@pytest.mark.parametrize(
    "args, message",
    [
        (["--dataset", "no_such_dataset_xyz"], "unknown dataset 'no_such_dataset_xyz'"),
        (["--dataset", "folder:/nonexistent/images"], "does not exist"),
        (["--dataset", "folder:EMPTY"], "holds no .jpg"),
        (["--batch-size", "5000"], "larger than the dataset's 1211 training images"),
        (["--strategy", "mirrored", "--cpu-replicas", "2", "--batch-size", "127"], "not divisible by the 2 replicas"),
        (["--epochs", "abc"], "expected a whole number, got 'abc'"),
        (["--epochs", "0"], "--epochs must be at least 1"),
        (["--lr", "-1"], "--lr must be in (0, 100)"),
        (["--precision", "float8"], "--precision 'float8': choose one of float32, bfloat16, float16, auto"),
        (["--precision", "float17"], "--precision 'float17': choose one of float32, bfloat16, float16, auto"),
        (["--xla", "maybe"], "--xla 'maybe': choose one of auto, on, off"),
        (["--strategy", "gpus"], "--strategy 'gpus': choose one of"),
        (["--batch-size", "1"], "--batch-size must be at least 2"),
        (["--image-size", "5"], "--image-size must be in [16, 1024]"),
        (["--preset", "huge"], "unknown preset 'huge'"),
        (["--bogus-flag"], "unrecognized arguments: --bogus-flag"),
        (["--resume", "NOT_A_RUN"], "has no config.json"),  # files, but not a run's
        (["--data-service", "grpc://127.0.0.1:9", "--input", "memory", "--dataset", "folder:EMPTY"], "drop --input memory"),
        (["--data-service", "no-port"], "expected grpc://HOST:PORT"),
        (["--val-fraction", "0.7"], "--val-fraction must be in [0, 0.5]"),
    ],
)
def test_bad_input_exits_2_with_one_line_and_writes_nothing(tmp_path, args, message):
    (tmp_path / "EMPTY").mkdir()
    (tmp_path / "NOT_A_RUN").mkdir()
    (tmp_path / "NOT_A_RUN" / "notes.txt").write_text("not a run")
    args = [a.replace("EMPTY", str(tmp_path / "EMPTY")).replace("NOT_A_RUN", str(tmp_path / "NOT_A_RUN")) for a in args]
    logdir = tmp_path / "run"
    result = _train([*args, "--logdir", str(logdir)], cwd=tmp_path)
    assert result.returncode == 2, result.stderr[-2000:]
    lines = _error_lines(result.stderr)
    assert len(lines) == 1, result.stderr[-2000:]
    assert message in lines[0]
    assert "Traceback" not in result.stderr
    assert not logdir.exists()


def test_projector_dimension_flags_keep_the_papers_bottleneck():
    import train

    def config(*argv):
        return make_config(None, **train.explicit_overrides(train.build_parser().parse_args(list(argv))))

    assert (config().proj_dim, config().pred_dim) == (512, 128)  # the digits preset
    assert (config("--proj-dim", "2048").proj_dim, config("--proj-dim", "2048").pred_dim) == (2048, 512)
    assert config("--proj-dim", "256", "--pred-dim", "100").pred_dim == 100
    assert config("--pred-dim", "32").proj_dim == 512
    # The projector's hidden width follows --proj-dim unless given (as before it had a flag).
    assert config().proj_hidden_dim == 512
    assert config("--proj-dim", "2048").proj_hidden_dim == 2048
    both = config("--proj-dim", "2048", "--proj-hidden-dim", "512")
    assert (both.proj_dim, both.proj_hidden_dim, both.pred_dim) == (2048, 512, 512)
    assert config("--proj-hidden-dim", "128").proj_dim == 512


def test_a_run_saved_before_the_hidden_width_setting_loads_with_its_old_projector(tmp_path):
    from simsiam_tf.config import save_config

    path = str(tmp_path / "config.json")
    save_config(make_config("digits", proj_dim=256), path)
    data = json.loads(open(path).read())
    del data["proj_hidden_dim"]
    open(path, "w").write(json.dumps(data))
    assert load_config(path).proj_hidden_dim == 256  # not the class default 2048


def test_fix_pred_lr_can_be_turned_on_and_off():
    import train

    def config(*argv):
        return make_config(None, **train.explicit_overrides(train.build_parser().parse_args(list(argv))))

    assert config("--dataset", "imagenet2012").fix_pred_lr is True  # the imagenet preset's
    assert config("--dataset", "imagenet2012", "--no-fix-pred-lr").fix_pred_lr is False
    assert config().fix_pred_lr is False and config("--fix-pred-lr").fix_pred_lr is True


def test_projector_images_has_a_flag():
    import train

    def config(*argv):
        return make_config(None, **train.explicit_overrides(train.build_parser().parse_args(list(argv))))

    assert config().projector_images == 2000
    assert config("--projector-images", "0").projector_images == 0
    assert config("--projector-images", "500").projector_images == 500


def test_one_command_line_starts_a_run_and_continues_it(tmp_path):
    # What a scheduler that requeues a preempted job runs: the same line every time.
    command = [*TINY_FLAGS, "--epochs", "1", "--resume", str(tmp_path / "run")]
    first = _train(command, cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-2000:]
    assert "no run in" in first.stdout and "starting it there" in first.stdout
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["epochs_completed"] == 1
    again = _train(command, cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "starting it there" not in again.stdout and "all 1 epochs are already done" in again.stdout


def test_bare_resume_needs_a_run_directory(tmp_path):
    result = subprocess.run(
        [sys.executable, os.path.join(REPO, "train.py"), "--resume"], cwd=tmp_path, capture_output=True, text=True
    )
    assert result.returncode == 2 and "--resume needs the run directory" in result.stderr


def test_mirrored_run_on_two_cpu_replicas(tmp_path):
    logdir = tmp_path / "run"
    result = _train(
        # No --precision: this test checks what auto resolves to, whatever the CPU.
        [*TINY_AUTO, "--epochs", "1", "--strategy", "mirrored", "--cpu-replicas", "2", "--logdir", str(logdir)],
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "on 2 replica(s)" in result.stdout
    summary = json.loads((logdir / "summary.json").read_text())
    assert summary["epochs_completed"] == 1 and summary["knn_top1"] is not None
    # No --precision: "auto" is resolved for this machine, said, and recorded as used.
    from simsiam_tf.distribute import resolve_precision

    import tensorflow as tf

    expected, reason = resolve_precision("auto", tf.distribute.get_strategy())
    assert f"precision: {expected} ({reason})" in result.stdout
    assert json.loads((logdir / "config.json").read_text())["precision"] == expected
    # train.py imports simsiam_tf before TensorFlow, so on x86 TensorFlow's oneDNN
    # kernels are on (the step is 1.5x slower without them on an AVX2 CPU).
    if platform.machine().lower() in ("x86_64", "amd64"):
        assert "kernels: oneDNN (TF_ENABLE_ONEDNN_OPTS=1)" in result.stdout


def test_one_thread_makes_a_run_bit_reproducible(tmp_path):
    # Multi-threaded CPU kernels add partial sums in a varying order, so two runs of one
    # seed drift apart after the first epoch (docs/contrastive.md, "Reruns"); with one
    # thread per pool they are identical, as that page tells users who need it.
    one_thread = {"TF_NUM_INTRAOP_THREADS": "1", "TF_NUM_INTEROP_THREADS": "1"}
    histories = []
    for name in ("a", "b"):
        logdir = tmp_path / name
        args = [*TINY_FLAGS, "--epochs", "3", "--knn-every", "0", "--diag-every", "0", "--projector-images", "0"]
        result = _train([*args, "--logdir", str(logdir)], cwd=tmp_path, env=one_thread)
        assert result.returncode == 0, result.stderr
        histories.append([(h["loss"], h["z_std"]) for h in json.loads((logdir / "summary.json").read_text())["history"]])
    assert len(histories[0]) == 3 and histories[0] == histories[1]


def test_existing_logdir_is_not_overwritten(tmp_path):
    logdir = tmp_path / "run"
    logdir.mkdir()
    (logdir / "keep.txt").write_text("mine")
    result = _train(["--logdir", str(logdir), "--epochs", "1"], cwd=tmp_path)
    assert result.returncode == 2 and "already holds files; pass --resume" in result.stderr
    assert os.listdir(logdir) == ["keep.txt"]


def _tiny(**overrides):
    base = dict(width=8, proj_dim=64, pred_dim=16, batch_size=32, epochs=2, train_limit=64, knn_every=1, knn_k=20)
    base.update(overrides)
    return make_config("digits", **base)


# One run read by the three tests below (they only read it): a training run costs 25-30 s
# on a 2-core CPU, most of it starting up. log_every_steps=1 for the TensorBoard test.
SHARED = dict(log_every_steps=1)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    logdir = str(tmp_path_factory.mktemp("tiny") / "run")
    return logdir, training.run(_tiny(**SHARED), logdir, verbose=0)


def test_smoke_fit_writes_all_artefacts(tiny_run):
    logdir, summary = tiny_run
    for key in ("epochs_completed", "loss", "z_std", "knn_top1", "knn_top1_init", "train_images_per_sec", "wall_time_s"):
        assert summary[key] is not None, key
    assert summary["epochs_completed"] == 2 and len(summary["history"]) == 2
    with open(os.path.join(logdir, "summary.json")) as f:
        assert json.load(f)["epochs_completed"] == 2
    # config.json records what --input auto chose.
    assert load_config(os.path.join(logdir, "config.json")) == _tiny(**SHARED).replace(input="memory")
    for path in ("checkpoints/last/latest.weights.h5", "checkpoints/best/model.weights.h5", "checkpoints/best/info.json"):
        assert os.path.exists(os.path.join(logdir, path)), path
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(os.path.join(logdir, "tb")))
    assert not [f for f in os.listdir(logdir) if f.startswith(".tmp")]


def test_tensorboard_events_hold_the_promised_tags(tiny_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logdir, _ = tiny_run
    acc = EventAccumulator(os.path.join(logdir, "tb"), size_guidance={"tensors": 0})
    acc.Reload()
    tags = set(acc.Tags()["tensors"])
    assert {"train/loss", "train/z_std", "train/lr", "epoch/loss", "knn/test_top1", "knn/val_top1", "knn/test_top1_val_selected", "views/pairs"} <= tags
    import tensorflow as tf

    lr = [float(tf.make_ndarray(event.tensor_proto)) for event in acc.Tensors("train/lr")]
    assert lr[0] == pytest.approx(_tiny().lr)  # the first step runs at the initial rate




def _final_weights(logdir):
    from simsiam_tf.model import build_simsiam

    model = build_simsiam(load_config(os.path.join(logdir, "config.json")))
    model.load_weights(os.path.join(logdir, "checkpoints", "last", "latest.weights.h5"))
    return [v.numpy() for v in model.weights]


def test_sigkill_mid_run_then_resume_matches_an_uninterrupted_run(tmp_path):
    epochs = "5"
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    # The uninterrupted run alongside the one to be killed (they share nothing): one
    # run's time instead of two.
    straight = tmp_path / "straight"
    uninterrupted = subprocess.Popen(
        [sys.executable, os.path.join(REPO, "train.py"), *TINY_FLAGS, "--epochs", epochs, "--logdir", str(straight)],
        cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        env={k: v for k, v in env.items() if k != "TF_ENABLE_ONEDNN_OPTS"},  # as _train runs it
    )
    killed = tmp_path / "killed"
    meta = killed / "checkpoints" / "last" / "training_metadata.json"
    proc = subprocess.Popen(
        [sys.executable, os.path.join(REPO, "train.py"), *TINY_FLAGS, "--epochs", epochs, "--logdir", str(killed)],
        cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env,
    )
    try:
        deadline = time.time() + 240
        while time.time() < deadline and proc.poll() is None:
            if meta.exists() and json.loads(meta.read_text())["epoch"] >= 1:
                break
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        _, err = uninterrupted.communicate(timeout=300)
        assert uninterrupted.returncode == 0, err[-2000:]
    finally:
        proc.wait()
        if uninterrupted.poll() is None:
            uninterrupted.kill()
            uninterrupted.wait()
    at_kill = json.loads(meta.read_text())["epoch"]
    if at_kill >= int(epochs):
        pytest.skip("the run finished before it could be killed")

    resumed = _train(["--resume", str(killed)], cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"epochs {at_kill + 1}-{epochs}" in resumed.stdout

    summary = json.loads((killed / "summary.json").read_text())
    reference = json.loads((straight / "summary.json").read_text())
    assert summary["epochs_completed"] == int(epochs)
    assert [h["epoch"] for h in summary["history"]] == list(range(1, int(epochs) + 1))
    assert summary["knn_top1_init"] == pytest.approx(reference["knn_top1_init"])
    for a, b in zip(_final_weights(straight), _final_weights(killed)):
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-5)
    assert summary["loss"] == pytest.approx(reference["loss"], abs=1e-4)


def test_resume_refuses_a_changed_configuration(tiny_run):
    logdir, _ = tiny_run
    with pytest.raises(UsageError, match="these flags differ: width=16"):  # --lr and --batch-size may change
        rundir.resolve_resume(logdir, {"width": 16})
    assert rundir.resolve_resume(logdir, {"batch_size": 32}) == _tiny(**SHARED).replace(input="memory")


@pytest.mark.parametrize("preset", [[], ["--preset", "cifar"]])
def test_a_missing_folder_fails_before_tensorflow_and_before_any_preset_line(tmp_path, preset):
    # train.main in a fresh process that reports whether TensorFlow got imported: a fact,
    # not a timing.
    script = (
        "import sys, train\n"
        f"rc = train.main(['--dataset', 'folder:{tmp_path / 'missing'}', *{preset!r}])\n"
        "print('rc', rc, 'tensorflow imported:', 'tensorflow' in sys.modules)\n"
    )
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.stdout.strip().splitlines() == ["rc 2 tensorflow imported: False"]  # no "preset:" line
    assert _error_lines(result.stderr) == [
        f"train.py: error: image folder '{tmp_path / 'missing'}' does not exist or is not a directory; "
        "check --dataset folder:PATH"
    ]
