"""The contract every training input keeps (simsiam_tf.input.contract), checked the same
way on memory, stream and the tf.data service, on one small folder of solid-colour
images (each image's colour says which it is, whatever the crop):

- the same training, validation and test images, and the same steps per epoch;
- the same first batch of crops for the same seed on memory and stream;
- every training image exactly once per epoch, in a different order the next epoch;
- batches in the one batch format, uint8 [B, 2, S, S, 3].
"""

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from simsiam_tf import augment as aug
from simsiam_tf import input as input_lib
from simsiam_tf.config import make_config
from simsiam_tf.input import batches, contract, service

SIZE = 16
SPEC = aug.AugmentSpec(image_size=SIZE)  # the whole recipe; colour steps kept, see _which
CROPS = "device"  # crops only: a crop of a solid image has exactly the image's colour


def _colours(n):
    grid = np.stack(np.meshgrid(*[np.arange(20, 236, 24)] * 3, indexing="ij"), -1).reshape(-1, 3)
    return grid[np.random.default_rng(0).permutation(len(grid))[:n]].astype(np.uint8)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """train/<a|b|c>/*.png (60) and test/<a|b|c>/*.png (12), each a solid colour, PNG so
    that every decoder gives the exact colour."""
    root = tmp_path_factory.mktemp("contract")
    colours = _colours(72)
    for i, colour in enumerate(colours):
        split = "train" if i < 60 else "test"
        d = root / split / "abc"[i % 3]
        d.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (20 + i % 5, 18), tuple(int(c) for c in colour)).save(d / f"{i:03d}.png")
    return root, colours


@pytest.fixture(scope="module")
def cluster():
    svc = tf.data.experimental.service
    dispatcher = svc.DispatchServer(svc.DispatcherConfig(port=0))
    # One worker: it reads the units in order, so the stream's batches come epoch by
    # epoch (with several, the first come first served; test_data_service.py covers that).
    worker = svc.WorkerServer(svc.WorkerConfig(dispatcher_address=dispatcher.target.split("://")[1]))
    yield dispatcher.target
    worker.stop()
    dispatcher.stop()


@pytest.fixture(scope="module")
def inputs(folder, cluster):
    root, _ = folder
    config = make_config("digits", dataset=f"folder:{root}", image_size=SIZE, val_fraction=0.2)
    memory, _ = input_lib.open_input(config.replace(input="memory"))
    stream, _ = input_lib.open_input(config.replace(input="stream"))
    served = service.ServiceInput(input_lib.open_input(config.replace(input="stream"))[0], cluster, "contract")
    return {"memory": memory, "stream": stream, "service": served}


def _which(views, colours):
    """The index of each view's image (uint8 [B, S, S, 3] crops of solid images)."""
    rgb = views.reshape(len(views), -1, 3).astype(float)
    assert (rgb.max(1) - rgb.min(1) <= 1).all(), "a crop is not of one solid image"
    dist = np.abs(rgb.mean(1)[:, None, :] - colours[None].astype(float)).sum(-1)
    assert (dist.min(1) < 2).all(), "a view is not the colour of any image"
    return dist.argmin(1)


def _images_of(batch, colours):
    x1, x2 = (x.numpy() for x in batches.unpack(batch))
    a, b = _which(x1, colours), _which(x2, colours)
    np.testing.assert_array_equal(a, b)  # both views of an image come from it
    return a


def _epochs(inp, global_batch, epochs):
    """The training batches of `epochs` epochs as the trainer reads them (one device)."""
    ds = inp.batches(tf.distribute.get_strategy(), global_batch, SPEC, seed=7, epochs=epochs, augment_on=CROPS)
    return list(ds.take(epochs * inp.steps_per_epoch(global_batch)))


def test_every_input_reads_the_same_splits_and_steps(inputs, folder):
    _, colours = folder
    first = inputs["memory"]
    for name, inp in inputs.items():
        assert inp.num_train == first.num_train == 60 - 12, name  # 12 held out: 4 of each class's 20
        assert inp.class_names == ["a", "b", "c"] and contract.can_monitor_knn(inp), name
        for split in ("train", "val", "test"):
            images, labels = inp.eval_split(split).materialize()
            expected, expected_labels = first.eval_split(split).materialize()
            np.testing.assert_array_equal(images, expected, err_msg=f"{name} {split}")
            np.testing.assert_array_equal(labels, expected_labels, err_msg=f"{name} {split}")
        assert inp.steps_per_epoch(8) == 6, name
    # The validation images are out of the training split, and they are not test images.
    which = {s: set(_which(first.eval_split(s).materialize()[0], colours)) for s in ("train", "val", "test")}
    assert len(which["val"]) == 12 and not which["val"] & which["train"] and not which["test"] & which["train"]


def test_memory_and_stream_make_the_same_first_batch(inputs):
    # PNG: the two decoders give the same pixels, so the same crops are the same bytes.
    for augment_on in ("device", "host"):
        first = [
            next(iter(inputs[kind].batches(tf.distribute.get_strategy(), 8, SPEC, 3, 1, augment_on=augment_on)))
            for kind in ("memory", "stream")
        ]
        assert first[0].dtype == tf.uint8 and first[0].shape == (8, 2, SIZE, SIZE, 3)
        np.testing.assert_array_equal(first[0].numpy(), first[1].numpy(), err_msg=augment_on)


@pytest.mark.parametrize("kind", ["memory", "stream"])
def test_every_image_once_per_epoch_in_a_new_order_each_epoch(inputs, folder, kind):
    _, colours = folder
    inp = inputs[kind]
    steps = inp.steps_per_epoch(8)
    got = _epochs(inp, 8, 2)
    assert all(b.dtype == tf.uint8 and b.shape == (8, 2, SIZE, SIZE, 3) for b in got)
    seen = [np.concatenate([_images_of(b, colours) for b in got[e * steps : (e + 1) * steps]]) for e in range(2)]
    train = set(_which(inp.eval_split("train").materialize()[0], colours))
    for epoch in seen:
        assert len(epoch) == len(set(epoch)) == 48  # 48 of 48: no remainder, nothing twice
    assert set(seen[0]) == set(seen[1]) == train
    assert not np.array_equal(seen[0], seen[1])


def test_the_service_delivers_every_image_once_per_data_epoch_in_a_new_order(inputs, folder):
    # The service streams the whole run: its workers decode in parallel, so the last
    # images of one data epoch and the first of the next can share a training epoch.
    # Every batch says which data epoch and image each view is (what ServiceDelivery
    # counts); per data epoch, every training image arrives exactly once.
    root, colours = folder
    served = inputs["service"]
    dataset_id, element_spec = served.connect(8, SPEC, seed=7, epochs=2, augment_on=CROPS)
    stream = tf.data.experimental.service.from_dataset_id(
        processing_mode=tf.data.experimental.service.ShardingPolicy.DYNAMIC, service=served.target,
        dataset_id=dataset_id, element_spec=element_spec, job_name=served.job,
    )
    files = sorted(str(p) for p in (root / "train").rglob("*.png"))
    colour_of = np.array([int(p.rsplit("/", 1)[1][:3]) for p in files])  # stored index -> its image's colour
    by_epoch = {0: [], 1: []}
    for batch, epoch, ids in stream.take(3 * 6):  # the two epochs and the reserve's first
        assert batch.dtype == tf.uint8 and batch.shape == (8, 2, SIZE, SIZE, 3)
        np.testing.assert_array_equal(_images_of(batch, colours), colour_of[ids.numpy()])
        for e, i in zip(epoch.numpy(), ids.numpy()):
            by_epoch.setdefault(int(e), []).append(int(i))
    train = set(served.stream.splits["train"].indices.tolist())
    for e in (0, 1):
        assert sorted(by_epoch[e]) == sorted(train), e
    assert by_epoch[0] != by_epoch[1]
