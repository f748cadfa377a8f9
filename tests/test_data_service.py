"""The tf.data service path (simsiam_tf.input.service and the servers of
simsiam_tf.data_service), on loopback. Across hosts (network namespaces, where this
machine can make them): tests/test_emulated_hosts.py, which then also checks what the
two tests marked ACROSS_HOSTS check here.

A dispatcher runs in this process (or as a subprocess where a test kills it) and the
workers run as subprocesses started by `python -m simsiam_tf.data_service worker`, so
a worker can be killed like a lost host.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections import Counter

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from simsiam_tf import augment as aug
from simsiam_tf import data_service
from simsiam_tf import input as input_lib
from simsiam_tf.config import make_config
from simsiam_tf.input import decode, service, sources

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "benchmarks"))
import emulated_hosts  # noqa: E402
ENV = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
SPEC = aug.AugmentSpec.for_image_size(16)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _folder(root, n_train, n_test=0, side=12):
    """n_train (and n_test) small PNGs in two classes, each a different grey level."""
    rng = np.random.default_rng(0)
    for split, n in (("train", n_train), ("test", n_test)):
        for i in range(n):
            directory = root / split / f"class{i % 2}"
            directory.mkdir(parents=True, exist_ok=True)
            pixels = rng.integers(0, 256, size=(side, side, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(directory / f"{i:05d}.png")
    return root


def _start_worker(dispatcher_port):
    proc = subprocess.Popen(
        [sys.executable, "-m", "simsiam_tf.data_service", "worker", "--dispatcher", f"127.0.0.1:{dispatcher_port}",
         "--port", "0", "--worker-address", "127.0.0.1:%port%"],
        cwd=REPO, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
    )
    line = proc.stdout.readline()
    assert "tf.data service worker on 127.0.0.1:" in line, line
    return proc


class Cluster:
    """An in-process dispatcher and two worker subprocesses."""

    def __init__(self, work_dir):
        svc = tf.data.experimental.service
        self.dispatcher = svc.DispatchServer(svc.DispatcherConfig(port=0, work_dir=str(work_dir), fault_tolerant_mode=True))
        self.port = int(self.dispatcher.target.rsplit(":", 1)[1])
        self.target = f"grpc://127.0.0.1:{self.port}"
        self.workers = [_start_worker(self.port) for _ in range(2)]

    def stop(self):
        for w in self.workers:
            if w.poll() is None:
                w.kill()
            w.wait()
        self.dispatcher.stop()


@pytest.fixture
def cluster(tmp_path):
    c = Cluster(tmp_path / "dispatcher")
    yield c
    c.stop()


def _service_input(folder, target, job):
    config = make_config("digits", dataset=f"folder:{folder}", image_size=16, input="stream", val_fraction=0.0)
    return service.ServiceInput(input_lib.open_input(config)[0], target, job)


def _read(inp, local_batch, epochs):
    """The raw stream the trainers read: (batch, epoch, image id), the batch in the one format."""
    dataset_id, spec = inp.connect(local_batch, SPEC, seed=3, epochs=epochs, augment_on="device")
    ds = tf.data.experimental.service.from_dataset_id(
        processing_mode=tf.data.experimental.service.ShardingPolicy.DYNAMIC, service=inp.target,
        dataset_id=dataset_id, element_spec=spec, job_name=inp.job,
    )
    return ds


def test_one_epoch_delivers_every_image_of_a_folder_exactly_once(cluster, tmp_path):
    # 1,024 images are 16 units of 64 (sources.FILES_PER_UNIT) and a batch of 32 divides
    # a unit, so each worker's share of the stream is whole batches and nothing is
    # dropped at its end: the test reads the whole stream, whatever the load. (With
    # units that batches do not divide, each worker drops its last partial batch; a
    # worker slowed by a busy CPU may still hold images of epoch 0 there, seen once in
    # CI. Training never reads that far: the reserve epoch is there for that.)
    assert sources.FILES_PER_UNIT % 32 == 0
    folder = _folder(tmp_path / "images", 1024)
    inp = _service_input(folder, cluster.target, "exactly-once")
    seen = []
    for batch, epoch, ids in _read(inp, 32, epochs=2):  # two epochs and the reserve
        assert batch.dtype == tf.uint8 and batch.shape == (32, 2, 16, 16, 3)  # device mode: the crops
        seen += zip(epoch.numpy().tolist(), ids.numpy().tolist())
    assert max(Counter(seen).values()) == 1  # nothing twice
    for e in (0, 1, 2):  # the run's two epochs and the reserve, each whole
        assert sorted(i for k, i in seen if k == e) == list(range(1024)), f"epoch {e}"
    assert len(seen) == 3 * 1024


def test_a_worker_killed_mid_epoch_costs_only_its_images_and_they_are_counted(cluster, tmp_path):
    folder = _folder(tmp_path / "images", 1000)
    inp = _service_input(folder, cluster.target, "kill-one")
    received = np.zeros(3, np.int64)  # epochs 0, 1 and the reserve, as the trainer counts them

    class Counts:  # what ServiceDelivery reads from a ServiceInput
        num_train = 1000

        @staticmethod
        def delivered(strategy=None):
            return received.copy()

    delivery = service.ServiceDelivery(Counts, initial_epoch=0, stall_s=0)  # the epoch rule alone: see below
    seen, closed = [], []
    for i, (_, epoch, ids) in enumerate(_read(inp, 25, epochs=2)):
        if i == 4:
            cluster.workers[0].kill()  # as a host lost mid-epoch
        seen += zip(epoch.numpy().tolist(), ids.numpy().tolist())
        np.add.at(received, epoch.numpy(), 1)
        if (i + 1) % 40 == 0:  # a training epoch: 1,000 images
            closed += delivery.count_closed()
        if closed:
            break
        assert len(seen) < 3000, "epoch 1 never closed"
    assert max(Counter(seen).values()) == 1  # no duplicates, before or after the kill
    epoch0 = {i for e, i in seen if e == 0}
    missed = 1000 - len(epoch0)
    assert 0 < missed < 1000  # the killed worker held some images, the other went on
    # What the callback reports is what really went missing.
    assert closed[0] == (0, len(epoch0))


def test_host_views_are_the_float_augmentation_rounded_to_whole_grey_levels(tmp_path):
    # Every path sends uint8 views (the batch format): the augmentation computed in float,
    # rounded to whole grey levels, then normalised on the device.
    from simsiam_tf.model import normalize_uint8

    folder = _folder(tmp_path / "images", 4, side=40)
    raw = tf.io.read_file(str(sorted((folder / "train" / "class0").iterdir())[0]))
    step = 1 / (255 * np.array(aug.IMAGENET_STD))  # one grey level, normalised
    for seed in range(8):  # flips, jitter, grayscale and blur drawn differently
        seed = tf.constant([seed, 2], tf.int64)
        sent = decode.image_views(raw, seed, SPEC, "host")
        assert sent.dtype == tf.uint8 and sent.shape == (2, 16, 16, 3)
        crop_seed, seed1, seed2 = tf.unstack(tf.random.experimental.stateless_split(seed, 3))
        crops = decode.decode_crops(raw, crop_seed, SPEC)
        for view, view_seed in ((0, seed1), (1, seed2)):
            in_float = aug.photometric_image(crops[view], aug.image_params(view_seed, SPEC), SPEC)
            assert np.all(np.abs(normalize_uint8(sent[view]).numpy() - in_float.numpy()) <= step / 2 + 1e-5)


def test_a_server_whose_shutdown_hangs_still_exits_after_the_grace():
    # A server whose own stop() never returns (TensorFlow's took over 30 s once under
    # load): SIGTERM still ends the process, with exit code 0, after the grace.
    script = (
        "import time\n"
        "from simsiam_tf import data_service\n"
        "data_service.STOP_GRACE_SECONDS = 0.5\n"
        "class Stuck:\n"
        "    def stop(self):\n"
        "        time.sleep(600)\n"
        "raise SystemExit(data_service._serve(Stuck(), 'serving'))\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", script], cwd=REPO, env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True)
    try:
        assert proc.stdout.readline().strip() == "serving"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
        assert "stopped (without waiting more than 0.5 s" in proc.stdout.read()
    finally:
        proc.kill()


def test_servers_say_what_they_serve_and_stop_on_sigterm(tmp_path):
    port = _free_port()
    dispatcher = subprocess.Popen(
        [sys.executable, "-m", "simsiam_tf.data_service", "dispatcher", "--port", str(port), "--work-dir",
         str(tmp_path / "journal")],
        cwd=REPO, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
    )
    try:
        line = dispatcher.stdout.readline()
        assert "dispatcher serving grpc://" in line and f":{port}" in line and "fault-tolerant" in line, line
        worker = _start_worker(port)
        worker.send_signal(signal.SIGTERM)
        assert worker.wait(timeout=30) == 0
        dispatcher.send_signal(signal.SIGTERM)
        assert dispatcher.wait(timeout=30) == 0
        # Restarted with the same command line, it recovers from its journal.
        again = subprocess.Popen(dispatcher.args, cwd=REPO, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        assert "recovered its jobs" in again.stdout.readline()
        again.send_signal(signal.SIGTERM)
        assert again.wait(timeout=30) == 0
    finally:
        for p in (dispatcher,):
            if p.poll() is None:
                p.kill()


def _train(args, timeout=300, **kw):
    return subprocess.run([sys.executable, "train.py", *args], cwd=REPO, env=ENV, capture_output=True, text=True,
                          timeout=timeout, **kw)


SMALL = ["--image-size", "16", "--width", "4", "--knn-every", "0", "--diag-every", "0", "--precision", "float32"]


def test_unreachable_dispatcher_exits_2_naming_the_address(tmp_path):
    port = _free_port()
    started = time.monotonic()
    result = _train(["--dataset", f"folder:{_folder(tmp_path / 'images', 40)}", "--data-service",
                     f"grpc://127.0.0.1:{port}", "--logdir", str(tmp_path / "run"), *SMALL])
    assert result.returncode == 2
    lines = [l for l in result.stderr.splitlines() if l.startswith("train.py: error")]
    assert len(lines) == 1 and f"127.0.0.1:{port}" in lines[0], result.stderr[-2000:]
    assert time.monotonic() - started < 30
    assert not (tmp_path / "run").exists()


ACROSS_HOSTS = pytest.mark.skipif(
    emulated_hosts.why_unsupported() is None,
    reason="checked across emulated hosts instead, by tests/test_emulated_hosts.py (this machine can make them)",
)


@ACROSS_HOSTS
def test_two_fit_epochs_under_mirrored_through_the_service(cluster, tmp_path):
    folder = _folder(tmp_path / "images", 256, 64)
    run = tmp_path / "run"
    result = _train(["--dataset", f"folder:{folder}", "--data-service", cluster.target, "--strategy", "mirrored",
                     "--cpu-replicas", "2", "--epochs", "2", "--batch-size", "32", "--augment-on", "device",
                     "--logdir", str(run), *SMALL])
    assert result.returncode == 0, result.stderr[-3000:]
    assert "through the tf.data service" in result.stdout and "on 2 replica(s)" in result.stdout
    summary = json.loads((run / "summary.json").read_text())
    assert summary["epochs_completed"] == 2 and summary["input"] == "service"
    assert summary["images_missed"] == 0
    assert all(np.isfinite(h["loss"]) for h in summary["history"])
    assert json.loads((run / "config.json").read_text())["data_service"] == cluster.target


def test_two_multi_worker_trainers_share_one_job(cluster, tmp_path):
    folder = _folder(tmp_path / "images", 256)
    ports = [_free_port(), _free_port()]
    tf_cluster = {"worker": [f"127.0.0.1:{p}" for p in ports]}
    run = tmp_path / "run"
    trainers = [
        subprocess.Popen(
            [sys.executable, "train.py", "--dataset", f"folder:{folder}", "--data-service", cluster.target,
             "--strategy", "multi_worker", "--epochs", "2", "--batch-size", "32", "--logdir", str(run), *SMALL],
            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            env=dict(ENV, TF_CONFIG=json.dumps({"cluster": tf_cluster, "task": {"type": "worker", "index": i}})),
        )
        for i in range(2)
    ]
    try:
        outputs = [t.communicate(timeout=300)[0] for t in trainers]
    finally:
        for t in trainers:
            if t.poll() is None:
                t.kill()
    for t, out in zip(trainers, outputs):
        assert t.returncode == 0, out[-3000:]
    jobs = [line.split("(job ")[1].split(",")[0] for out in outputs for line in out.splitlines() if "(job simsiam-" in line]
    assert len(jobs) == 2 and jobs[0] == jobs[1]  # one job, read by both
    assert "on 2 replica(s)" in outputs[0]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["epochs_completed"] == 2
    assert summary["images_missed"] == 0  # what the two trainers received, summed


@ACROSS_HOSTS
def test_a_lost_dispatcher_stops_training_and_resume_continues(tmp_path):
    folder = _folder(tmp_path / "images", 256)
    port = _free_port()
    journal = str(tmp_path / "journal")
    command = [sys.executable, "-m", "simsiam_tf.data_service", "dispatcher", "--port", str(port), "--work-dir", journal]
    dispatcher = subprocess.Popen(command, cwd=REPO, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    dispatcher.stdout.readline()
    worker = _start_worker(port)
    run = tmp_path / "run"
    train = [sys.executable, "train.py", "--dataset", f"folder:{folder}", "--data-service", f"grpc://127.0.0.1:{port}",
             "--data-service-grace", "4", "--epochs", "6", "--batch-size", "32", "--logdir", str(run), *SMALL]
    meta = run / "checkpoints" / "last" / "training_metadata.json"
    trainer = subprocess.Popen(train, cwd=REPO, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 240
        while time.time() < deadline and trainer.poll() is None and not meta.exists():
            time.sleep(0.1)
        dispatcher.kill()
        dispatcher.wait()
        out, err = trainer.communicate(timeout=120)
        if trainer.returncode == 0:
            pytest.skip("the run finished before the dispatcher was killed")
        assert trainer.returncode == data_service.EXIT_DISPATCHER_LOST, err[-2000:]
        assert f"dispatcher at 127.0.0.1:{port} has been unreachable" in err and "--resume" in err
        at_stop = json.loads(meta.read_text())["epoch"]
        assert 1 <= at_stop < 6

        dispatcher = subprocess.Popen(command, cwd=REPO, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        assert "recovered its jobs" in dispatcher.stdout.readline()
        resumed = subprocess.run([sys.executable, "train.py", "--resume", str(run)], cwd=REPO, env=ENV,
                                 capture_output=True, text=True, timeout=300)
        assert resumed.returncode == 0, resumed.stderr[-3000:]
        assert f"epochs {at_stop + 1}-6" in resumed.stdout
        summary = json.loads((run / "summary.json").read_text())
        assert [h["epoch"] for h in summary["history"]] == list(range(1, 7))
    finally:
        for p in (trainer, dispatcher, worker):
            if p.poll() is None:
                p.kill()


def test_a_short_epoch_is_counted_only_after_its_images_stopped_for_stall_s(tmp_path):
    # Data epoch 0 is 10 images short while epoch 1's arrive: a worker that stopped, or
    # one whose connection is still backing off after a cut link. Counted as missed only
    # once none of its images came for stall_s seconds (and a training epoch).
    received = np.array([0, 0, 0])
    now = [0.0]

    class Counts:
        num_train = 100

        @staticmethod
        def delivered(strategy=None):
            return received.copy()

    delivery = service.ServiceDelivery(Counts, initial_epoch=0, stall_s=60, clock=lambda: now[0])
    received[:] = [90, 20, 0]
    assert delivery.count_closed() == []  # first look
    now[0], received[1] = 30.0, 60
    assert delivery.count_closed() == []  # no news of epoch 0 for 30 s: may still come
    now[0], received[:2] = 45.0, [95, 90]
    assert delivery.count_closed() == []  # it came: the clock restarts
    now[0], received[1] = 100.0, 99
    assert delivery.count_closed() == []  # 55 s without news
    now[0], received[2] = 106.0, 10
    assert delivery.count_closed() == [(0, 95)]  # 61 s: the 5 left are missed
    now[0], received[1:] = 107.0, [100, 20]
    assert delivery.count_closed() == [(1, 100)]  # a complete epoch closes at once
