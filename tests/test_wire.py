"""The tf.data service's wire formats (simsiam_tf.input.wire): what a worker sends is,
once the trainer has unpacked it, the batch in the batch format: the same bytes for
uint8 and snappy, the views within the JPEG error for jpeg. Across hosts:
tests/test_emulated_hosts.py; the measured bytes and CPU: benchmarks/service_wire.py."""

import glob
import os

import numpy as np
import pytest
import tensorflow as tf
from conftest import CIFAR

from simsiam_tf.config import UsageError, make_config, validate
from simsiam_tf.input import wire


@pytest.fixture(scope="module")
def views():
    """Eight pairs of 64-px views of real photos (CIFAR-10 test images), or random
    pixels where the shared folder is absent."""
    files = sorted(glob.glob(os.path.join(CIFAR, "test", "*", "*.jpg")))[:16]
    if len(files) < 16:
        return np.random.default_rng(0).integers(0, 256, (8, 2, 64, 64, 3), dtype=np.uint8)
    images = [tf.image.resize(tf.io.decode_jpeg(tf.io.read_file(f), channels=3), (64, 64)) for f in files]
    return np.clip(np.round(np.stack(images)), 0, 255).astype(np.uint8).reshape(8, 2, 64, 64, 3)


@pytest.mark.parametrize("name", ["uint8", "snappy"])
def test_uint8_and_snappy_send_the_batch_as_it_is(views, name):
    sent = wire.pack(tf.constant(views), name)
    assert sent.dtype == tf.uint8
    np.testing.assert_array_equal(wire.unpack(sent, name, 64).numpy(), views)
    assert wire.compression(name) == {"uint8": None, "snappy": "AUTO"}[name]  # the service's own snappy


def test_jpeg_sends_each_view_as_a_jpeg_and_unpacks_to_the_batch_format(views):
    sent = wire.pack(tf.constant(views), "jpeg")
    assert sent.dtype == tf.string and sent.shape == (8, 2)
    assert wire.compression("jpeg") is None  # already compressed
    for b, v in ((0, 0), (7, 1)):  # each element is a JPEG of that view
        one = tf.io.decode_jpeg(sent[b, v]).numpy()
        assert one.shape == (64, 64, 3)
        assert np.abs(one.astype(int) - views[b, v].astype(int)).mean() < 4
    back = wire.unpack(sent, "jpeg", 64).numpy()
    assert back.shape == views.shape and back.dtype == np.uint8
    error = np.abs(back.astype(int) - views.astype(int))
    # Measured on CIFAR-10 photos at 64 px, quality 90: mean 1.4 grey levels, 99th
    # percentile 5; the bounds leave room for other photos, and fail for a wrong view.
    assert error.mean() < 3 and np.percentile(error, 99) < 12
    assert np.abs(back[:, ::-1].astype(int) - views.astype(int)).mean() > 10  # views not swapped
    sent_bytes = sum(len(x) for x in sent.numpy().ravel())
    assert sent_bytes < views.nbytes / 3


def test_an_unknown_wire_format_is_refused_naming_the_choices():
    with pytest.raises(UsageError, match=r"--data-service-wire 'png': choose one of uint8, snappy, jpeg"):
        validate(make_config("digits", data_service="grpc://h:5050", data_service_wire="png"))
