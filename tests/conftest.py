"""Test session setup: two logical CPU devices, so MirroredStrategy has two replicas.

The split must happen before TensorFlow runs anything, hence here, at import time.
Single-device code keeps running on /cpu:0.
"""

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import pytest  # noqa: E402

from simsiam_tf.distribute import split_cpu  # noqa: E402

split_cpu(2)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CIFAR = os.path.join(os.path.dirname(REPO), "shared", "datasets", "cifar10")
# The benchmarks read data/cifar10 unless SIMSIAM_CIFAR10 names another folder
# (benchmarks/common.py); the tests, and the benchmarks they start, read the shared one.
os.environ.setdefault("SIMSIAM_CIFAR10", CIFAR)


@pytest.fixture(scope="session")
def mirrored():
    """One MirroredStrategy over the two logical CPUs, shared by every in-process test.

    Each new MirroredStrategy numbers its collectives from the same keys (group 1,
    instance 100, ...), and TensorFlow caches a collective's shape by key for the life
    of the process, so a second strategy on the same devices can clash with the first
    ("Shape mismatch in the collective instance 100"). A program makes one strategy;
    so does the test session.
    """
    import tensorflow as tf

    strategy = tf.distribute.MirroredStrategy(split_cpu(2))
    assert strategy.num_replicas_in_sync == 2
    return strategy


@pytest.fixture
def cifar_dir():
    if not os.path.isdir(os.path.join(CIFAR, "train")):
        pytest.skip(f"the shared CIFAR-10 folder is not at {CIFAR}")
    return CIFAR


@pytest.fixture
def python():
    return sys.executable


# The files that take longest, longest first, as `--durations` of full runs ranks them
# (summed per file). pytest-xdist's --dist loadfile hands whole files to the two workers
# in collection order, given pytest.ini's --no-loadscope-reorder: by default xdist 3.x
# orders files by their number of tests instead, which put the learning, collapse and
# SimCLR runs last, one worker running them alone. Starting the long ones first lets
# both workers finish together; no file should take much more than a fifth of the run.
LONGEST_FIRST = (
    "test_benchmarks.py", "test_reliability.py", "test_data_service.py", "test_emulated_hosts.py",
    "test_learning.py", "test_train_cli.py", "test_collapse.py", "test_gpu_check.py", "test_stream_training.py",
    "test_simclr.py", "test_errors.py", "test_accumulation.py",
)


def pytest_collection_modifyitems(items):
    def rank(item):
        name = os.path.basename(str(item.fspath))
        return LONGEST_FIRST.index(name) if name in LONGEST_FIRST else len(LONGEST_FIRST)

    items.sort(key=rank)  # stable: each file keeps its own order
