"""The order of an epoch and the seeds of its images, the same on every path.

Everything random about an epoch follows from (--seed, epoch), and everything random
about an image's two views from (--seed, epoch, the image's stored index): never from a
batch's position, the worker that reads it or the number of workers. So memory, stream
and the tf.data service crop an image the same way in the same epoch, a resumed run
sees exactly the epochs an uninterrupted one would, and any split of an epoch over
workers makes the same views.

- `epoch_seed(seed, epoch)`: int64 [2], the seed of one epoch.
- `shuffled(positions, seed, epoch, n)`: the epoch's permutation of n members, one
  position at a time (`tf.random.experimental.index_shuffle`: nothing of size n is ever
  materialised, so a unit of 64 files of a million-image folder costs 64 lookups).
- `image_seed(seed, epoch, index)`: the seed of one image's views.
- `shuffle_buffer(ds, seed, epoch, size)`: a bounded shuffle whose order depends on
  (seed, epoch) alone.
"""

from __future__ import annotations

import tensorflow as tf

SHUFFLE_GRAPH_SEED = 20201120  # see shuffle_buffer


def epoch_seed(seed: int, epoch) -> tf.Tensor:
    """int64 [2]: the seed of epoch `epoch` (0-based) of a run with --seed `seed`."""
    return tf.stack([tf.constant(seed, tf.int64), tf.cast(epoch, tf.int64)])


def shuffled(positions, seed: int, epoch, n: int) -> tf.Tensor:
    """Which of n members (0..n-1) sits at each of `positions` in the epoch's order.

    `positions` int64 (any shape, values in 0..n-1). The order is a uniform random
    permutation drawn from (seed, epoch), the same on every path.
    """
    positions = tf.cast(positions, tf.int64)
    if n <= 1:
        return tf.zeros_like(positions)
    key = tf.random.experimental.stateless_fold_in(epoch_seed(seed, epoch), 0x0DE4)
    return tf.random.experimental.index_shuffle(positions, key, tf.constant(n - 1, tf.int64))


def image_seed(seed: int, epoch, index) -> tf.Tensor:
    """int64 [2]: the seed of the two views of the image with stored index `index` (a
    scalar) in epoch `epoch`."""
    return tf.random.experimental.stateless_fold_in(epoch_seed(seed, epoch), tf.cast(index, tf.int64))


def shuffle_buffer(ds: tf.data.Dataset, seed: int, epoch, size: int, stream=0) -> tf.data.Dataset:
    """`ds.shuffle(size)`, its order a function of (seed, epoch, stream) alone (`stream`
    an int or a scalar tensor: a worker, a unit).

    tf.data pairs an op seed with the graph-level seed, and TF 2.21 cannot take a tensor
    op seed when that graph seed is 0 (`random_seed.get_seed` compares the pair with
    (0, 0) in Python), which `--seed 0` makes it. Inside a per-epoch dataset function
    (a graph of its own) the graph seed is fixed here, so the order depends on the
    epoch's seed only, not on whatever global seed the process has.
    """
    if not tf.executing_eagerly():
        tf.random.set_seed(SHUFFLE_GRAPH_SEED)
    key = tf.random.experimental.stateless_fold_in(epoch_seed(seed, epoch), 0x5F)
    key = tf.random.experimental.stateless_fold_in(key, tf.cast(stream, tf.int64))
    op_seed = tf.random.stateless_uniform([], key, minval=1, maxval=2**62, dtype=tf.int64)
    return ds.shuffle(size, seed=op_seed)
