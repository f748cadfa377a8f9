"""The tf.data service across hosts: a dispatcher, two input workers and the trainer,
each in a network namespace of its own, joined by veth links to a switch
(benchmarks/emulated_hosts.py). The same commands users run, on addresses that exist
only inside those namespaces.

- every pair a trainer receives across the network is the pair made in process for the
  same (seed, epoch, image), byte for byte, and the bytes on the trainer's link are
  those pairs' (JPEG on the wire: tests/test_wire.py, and the lossy run below);
- a run whose trainer loses its link for longer than --data-service-grace stops with
  the exit 75 line, and --resume finishes it (after the dispatcher, lost too, came
  back on its journal);
- with 1% of packets lost on every link and the trainer's link cut for 10 s mid-epoch,
  the run goes on (the default grace is 60 s) and misses no image (with JPEG on the
  wire, so that train.py's unpacking runs end to end too).

Needs root (CI runs as root); elsewhere these tests skip, saying why.
"""

import json
import os
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest
from conftest import REPO
from PIL import Image

sys.path.insert(0, os.path.join(REPO, "benchmarks"))
import emulated_hosts  # noqa: E402
import service_wire  # noqa: E402

SIZE = 16
ENV = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
SMALL = ["--image-size", str(SIZE), "--width", "4", "--knn-every", "0", "--diag-every", "0", "--precision", "float32"]
HOSTS = ["dispatcher", "worker1", "worker2", "trainer"]

pytestmark = pytest.mark.skipif(emulated_hosts.why_unsupported() is not None,
                                reason=f"emulated hosts: {emulated_hosts.why_unsupported()}")


@pytest.fixture(scope="module")
def hosts():
    with emulated_hosts.EmulatedHosts(HOSTS) as h:
        yield h


@pytest.fixture
def cluster(hosts, tmp_path):
    for name in HOSTS:  # every test starts on clean, unlimited links
        hosts.restore(name)
        hosts.shape(name)
    c = service_wire.Cluster(hosts, str(tmp_path / "journal"))
    yield c
    c.stop()


def _folder(root, n, side=24):
    """n PNGs (lossless: the files decode the same everywhere) in two classes, each a
    random 4 x 4 grid upscaled, smooth as photos are (JPEG's error on noise is no guide)."""
    rng = np.random.default_rng(1)
    for i in range(n):
        d = root / "train" / f"c{i % 2}"
        d.mkdir(parents=True, exist_ok=True)
        grid = Image.fromarray(rng.integers(0, 256, (4, 4, 3), dtype=np.uint8))
        grid.resize((side + 4, side), Image.BICUBIC).save(d / f"{i:04d}.png")
    return root


def test_the_hosts_reach_each_other_and_nothing_else(hosts):
    root_addresses = subprocess.run(["ip", "-o", "addr"], capture_output=True, text=True).stdout
    assert emulated_hosts.SUBNET not in root_addresses  # the root namespace takes no part
    for name in HOSTS:
        # One route, to the hosts' own subnet: no default route, no way out.
        assert hosts.routes(name) == [f"{emulated_hosts.SUBNET}.0/24 dev eth0 proto kernel scope link src "
                                      f"{hosts.address(name)}"]
    probe = ("import socket, sys\n"
             "for host in sys.argv[1:]:\n"
             "    try:\n"
             "        socket.create_connection((host, 9), timeout=2).close(); print(host, 'open')\n"
             "    except ConnectionRefusedError: print(host, 'refused')\n"
             "    except OSError as e: print(host, 'unreachable', e.errno)\n")
    out = hosts.run("trainer", sys.executable, "-c", probe, hosts.address("worker1"), "1.1.1.1").stdout.splitlines()
    assert out[0] == f"{hosts.address('worker1')} refused"  # another host answers (nothing on port 9)
    assert out[1].startswith("1.1.1.1 unreachable")  # the world does not


def test_every_pair_across_hosts_is_the_pair_made_in_process_byte_for_byte(hosts, cluster, tmp_path):
    from simsiam_tf import augment as aug
    from simsiam_tf.config import make_config
    from simsiam_tf.input import decode, open_input, order

    folder = _folder(tmp_path / "images", 64)
    saved = tmp_path / "pairs.npz"
    out = service_wire.read_in(hosts, cluster.target, f"folder:{folder}", "exact", wire="uint8", augment_on="host",
                               size=SIZE, batch=16, batches=12, warmup=0, epochs=2, save=str(saved), timeout_s=300)
    got = np.load(saved)
    views, epochs, ids = got["views"], got["epochs"], got["ids"]
    assert views.shape == (192, 2, SIZE, SIZE, 3) and views.dtype == np.uint8
    # The whole stream: two epochs and the reserve, each of the 64 images once in each
    # (dynamic sharding over the two workers, whose units arrive in any order).
    for e in (0, 1, 2):
        assert sorted(ids[epochs == e].tolist()) == list(range(64))

    source = open_input(make_config(dataset=f"folder:{folder}", image_size=SIZE, input="stream",
                                    val_fraction=0.0))[0].source
    spec = aug.AugmentSpec.for_image_size(SIZE)
    expected = np.stack([
        decode.image_views(source.load(source.describe("train", i)), order.image_seed(0, int(e), int(i)), spec,
                           "host").numpy()
        for e, i in zip(epochs, ids)
    ])
    np.testing.assert_array_equal(views, expected)  # byte for byte
    # What crossed the trainer's link: the views plus headers and framing, no more. The
    # stream was read to its end, so no batch was still in flight: the total is exact.
    uint8_bytes = 2 * SIZE * SIZE * 3
    assert uint8_bytes <= out["bytes_received"] / out["pairs"] < 1.5 * uint8_bytes, out


def _wait_for(path, proc, timeout_s):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and proc.poll() is None and not path.exists():
        time.sleep(0.2)
    return path.exists()


def _train(hosts, cluster, args, **kwargs):
    argv = [sys.executable, "train.py", "--data-service", f"grpc://{cluster.target}", *args]
    return hosts.popen("trainer", argv, cwd=REPO, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                       text=True, **kwargs)


def test_a_trainer_cut_off_beyond_the_grace_stops_with_exit_75_and_resume_finishes(hosts, cluster, tmp_path):
    # Also what tests/test_data_service.py checks on loopback where these hosts cannot be made.
    from simsiam_tf import data_service

    folder = _folder(tmp_path / "images", 256)
    run = tmp_path / "run"
    meta = run / "checkpoints" / "last" / "training_metadata.json"
    trainer = _train(hosts, cluster, ["--dataset", f"folder:{folder}", "--data-service-grace", "4", "--epochs", "6",
                                      "--batch-size", "32", "--logdir", str(run), *SMALL])
    try:
        assert _wait_for(meta, trainer, 240), trainer.communicate()[1][-2000:]
        hosts.cut("trainer")
        out, err = trainer.communicate(timeout=120)
    finally:
        hosts.restore("trainer")
        if trainer.poll() is None:
            trainer.kill()
    assert trainer.returncode == data_service.EXIT_DISPATCHER_LOST, err[-2000:]
    assert f"the tf.data service dispatcher at {cluster.target} has been unreachable for 4 s" in err
    assert f"python train.py --resume {run}" in err
    at_stop = json.loads(meta.read_text())["epoch"]
    assert 1 <= at_stop < 6

    # The dispatcher lost too (its host restarted): it comes back on its journal.
    assert "recovered its jobs" in cluster.restart_dispatcher()
    resumed = _train(hosts, cluster, ["--resume", str(run)])
    out, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err[-3000:]
    assert f"epochs {at_stop + 1}-6" in out
    summary = json.loads((run / "summary.json").read_text())
    assert [h["epoch"] for h in summary["history"]] == list(range(1, 7))
    assert all(np.isfinite(h["loss"]) for h in summary["history"])


@pytest.mark.skipif(shutil.which("nft") is None, reason="packet loss needs nft: apt-get install nftables (.ci/run does)")
def test_a_lossy_network_and_a_10_second_cut_lose_no_image(hosts, cluster, tmp_path):
    for name in HOSTS:
        hosts.shape(name, loss_pct=1.0)
    folder = _folder(tmp_path / "images", 256)
    run = tmp_path / "run"
    meta = run / "checkpoints" / "last" / "training_metadata.json"
    # With JPEG on the wire (train.py's own unpacking, end to end), on two replicas with
    # the augmentation on them: also what tests/test_data_service.py checks on loopback
    # where these hosts cannot be made.
    trainer = _train(hosts, cluster, ["--dataset", f"folder:{folder}", "--epochs", "4", "--batch-size", "32",
                                      "--data-service-wire", "jpeg", "--strategy", "mirrored", "--cpu-replicas", "2",
                                      "--augment-on", "device", "--logdir", str(run), *SMALL])
    try:
        assert _wait_for(meta, trainer, 240), trainer.communicate()[1][-2000:]
        before = hosts.counters("trainer")
        hosts.cut("trainer")
        time.sleep(10)
        hosts.restore("trainer")
        out, err = trainer.communicate(timeout=300)
    finally:
        hosts.restore("trainer")
        if trainer.poll() is None:
            trainer.kill()
    assert trainer.returncode == 0, err[-3000:]
    assert all(hosts.dropped(name) > 0 for name in ("trainer", "worker1", "worker2"))  # the loss was real
    after = hosts.counters("trainer")
    assert after["rx_bytes"] > before["rx_bytes"]  # the rest of the run came over the restored link
    summary = json.loads((run / "summary.json").read_text())
    assert [h["epoch"] for h in summary["history"]] == [1, 2, 3, 4]
    assert summary["images_missed"] == 0
    assert "unreachable" not in err
    assert "jpeg on the wire" in out and "on 2 replica(s)" in out
    config = json.loads((run / "config.json").read_text())
    assert config["data_service_wire"] == "jpeg" and config["data_service"] == f"grpc://{cluster.target}"
    assert summary["input"] == "service" and all(np.isfinite(h["loss"]) for h in summary["history"])


def test_hosts_vanish_with_their_maker_even_when_it_is_killed(tmp_path):
    # A process makes two hosts, starts a process in one, and is killed with SIGKILL (no
    # cleanup code runs): the kernel kills what it started, and the namespaces go with it.
    script = (
        "import os, sys, time\n"
        f"sys.path.insert(0, {os.path.join(REPO, 'benchmarks')!r})\n"
        "from emulated_hosts import EmulatedHosts\n"
        "h = EmulatedHosts(['a', 'b'])\n"
        "p = h.popen('a', ['sleep', '600'])\n"
        "held = [str(x.pid) for x in h._holders.values()]\n"
        "print(p.pid, ' '.join(os.readlink(f'/proc/{x}/ns/net') for x in held), flush=True)\n"
        "time.sleep(600)\n"
    )
    maker = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        fields = maker.stdout.readline().split()
        started, namespaces = int(fields[0]), set(fields[1:])
        assert len(namespaces) == 3 and os.readlink("/proc/self/ns/net") not in namespaces  # switch, a, b
    finally:
        maker.kill()
        maker.wait()

    def alive():
        left = []
        for pid in os.listdir("/proc"):
            try:
                if pid.isdigit() and os.readlink(f"/proc/{pid}/ns/net") in namespaces:
                    left.append(pid)
            except OSError:
                pass
        return left

    deadline = time.monotonic() + 10
    while alive() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert alive() == []  # no process holds any of the three namespaces: they are gone
    assert not os.path.exists(f"/proc/{started}") or open(f"/proc/{started}/stat").read().split()[2] == "Z"
