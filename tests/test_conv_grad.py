"""The convolution whose kernel gradient is a forward convolution (simsiam_tf/conv_grad.py)
against TensorFlow's own convolution gradients and the definition, and where the model uses it."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from simsiam_tf import conv_grad
from simsiam_tf import model as model_lib

# (input shape, kernel shape, strides, padding): the ResNet-18 stage-3 and -4 forms, small.
CASES = [
    ((3, 4, 4, 8), (3, 3, 8, 6), (1, 1), "SAME"),  # 3x3 convolution, stride 1
    ((3, 9, 9, 5), (3, 3, 5, 6), (2, 2), "VALID"),  # 3x3, stride 2, on a map padded beforehand
    ((3, 8, 8, 5), (1, 1, 5, 7), (2, 2), "VALID"),  # the 1x1 stride-2 shortcut
    ((3, 4, 4, 5), (1, 1, 5, 7), (1, 1), "VALID"),  # the same on the subsampled map (<= 5 channels)
    ((2, 5, 7, 4), (3, 1, 4, 3), (1, 2), "VALID"),  # uneven kernel and strides
    ((2, 10, 9, 3), (3, 3, 3, 4), (2, 2), "VALID"),  # a strided map with rows and columns never read
]


def _grads(conv, x, kernel, dy):
    with tf.GradientTape() as tape:
        tape.watch([x, kernel])
        y = conv(x, kernel)
        loss = tf.reduce_sum(tf.cast(y, tf.float32) * dy)
    return (y, *tape.gradient(loss, [x, kernel]))


@pytest.mark.parametrize("shape, kshape, strides, padding", CASES)
def test_float32_forward_and_gradients_equal_tensorflow_s(shape, kshape, strides, padding):
    rng = np.random.default_rng(0)
    x = tf.constant(rng.normal(size=shape), tf.float32)
    kernel = tf.constant(rng.normal(size=kshape), tf.float32)
    out_shape = tf.nn.conv2d(x, kernel, strides, padding).shape
    dy = tf.constant(rng.normal(size=out_shape), tf.float32)
    ours = _grads(lambda a, k: conv_grad.conv2d(a, k, strides, padding), x, kernel, dy)
    theirs = _grads(lambda a, k: tf.nn.conv2d(a, k, strides, padding), x, kernel, dy)
    for a, b, what in zip(ours, theirs, ("output", "input gradient", "kernel gradient")):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-5, atol=1e-4, err_msg=what)
    # The kernel gradient from its definition: dW[i, j] = sum over b, h, w of x[b, h*s + i, w*s + j] dy[b, h, w].
    xp = x.numpy() if padding == "VALID" else np.pad(x.numpy(), [(0, 0), (1, 1), (1, 1), (0, 0)])
    (sh, sw), (ho, wo) = strides, out_shape[1:3]
    want = np.stack([np.einsum("bhwc,bhwd->cd", xp[:, i : i + (ho - 1) * sh + 1 : sh, j : j + (wo - 1) * sw + 1 : sw],
                               dy.numpy()) for i in range(kshape[0]) for j in range(kshape[1])]).reshape(kshape)
    np.testing.assert_allclose(ours[2].numpy(), want, rtol=1e-5, atol=1e-4)


def test_bfloat16_kernel_gradient_rounds_like_tensorflow_s():
    # Stage 4 of ResNet-18 at a smaller width: both sum in float32 and round once to bfloat16.
    rng = np.random.default_rng(1)
    x = tf.cast(tf.constant(rng.normal(size=(8, 4, 4, 64))), tf.bfloat16)
    kernel = tf.cast(tf.constant(rng.normal(size=(3, 3, 64, 64)) * 0.05), tf.bfloat16)
    dy = tf.constant(rng.normal(size=(8, 4, 4, 64)), tf.float32)
    ours = _grads(lambda a, k: conv_grad.conv2d(a, k, (1, 1), "SAME"), x, kernel, dy)[2]
    theirs = _grads(lambda a, k: tf.nn.conv2d(a, k, 1, "SAME"), x, kernel, dy)[2]
    assert ours.dtype == theirs.dtype == tf.bfloat16
    exact = _grads(lambda a, k: tf.nn.conv2d(a, k, 1, "SAME"), tf.cast(x, tf.float32), tf.cast(kernel, tf.float32),
                   tf.cast(tf.cast(dy, tf.bfloat16), tf.float32))[2].numpy()
    scale = np.abs(exact).max()
    for got in (ours, theirs):  # one bfloat16 rounding of the float32 sum: 2^-8 relative, plus the sum's own
        np.testing.assert_allclose(tf.cast(got, tf.float32).numpy(), exact, rtol=2 ** -7, atol=1e-3 * scale)


def test_same_padding_needs_stride_one_and_an_odd_kernel():
    x, kernel = tf.zeros([1, 4, 4, 2]), tf.zeros([2, 2, 2, 2])
    with pytest.raises(ValueError, match="SAME needs stride 1 and an odd kernel"):
        conv_grad.conv2d(x, kernel, (1, 1), "SAME")


def test_only_small_bfloat16_maps_with_wide_kernels_take_it():
    bf16, fp32 = tf.zeros([1, 8, 8, 8], tf.bfloat16), tf.zeros([1, 8, 8, 8])
    assert conv_grad.wanted(bf16, (3, 3), (1, 1), (8, 8))
    assert conv_grad.wanted(bf16, (3, 3), (1, 1), (4, 4))
    assert not conv_grad.wanted(fp32, (3, 3), (1, 1), (4, 4))  # float32: TensorFlow's kernel
    assert not conv_grad.wanted(bf16, (1, 1), (1, 1), (4, 4))  # 1x1 shortcut: measured slower
    assert not conv_grad.wanted(bf16, (3, 3), (1, 1), (16, 16))  # larger map: measured slower
    assert not conv_grad.wanted(bf16, (3, 3), (2, 2), (4, 4))  # dilated
    assert not conv_grad.wanted(bf16, (3, 3), (1, 1), (None, 4))  # unknown size


def test_the_bfloat16_backbone_uses_it_in_stages_3_and_4_with_the_same_gradients(monkeypatch):
    # A 32 px input gives stage 3 8 x 8 maps and stage 4 4 x 4 maps, at any width.
    calls = []
    original = conv_grad.conv2d
    monkeypatch.setattr(conv_grad, "conv2d", lambda *a: calls.append(a[0].shape[1:]) or original(*a))
    keras.utils.set_random_seed(0)
    backbone = model_lib.build_backbone("resnet18", 32, width=8, dtype="mixed_bfloat16")
    x = tf.random.stateless_normal([4, 32, 32, 3], seed=[1, 2])

    def kernel_grads():
        with tf.GradientTape() as tape:
            loss = tf.reduce_sum(tf.square(backbone(x, training=True)))
        return {v.path: g for v, g in zip(backbone.trainable_variables, tape.gradient(loss, backbone.trainable_variables))}

    ours = kernel_grads()
    # Stages 3 and 4: each one's 3x3 stride-2 convolution (on its input padded to 17 x 17 and 9 x 9) and
    # three 3x3 at 8 x 8 and 4 x 4; not the 1x1 stride-2 shortcuts.
    assert sorted(tuple(s) for s in calls) == sorted([(17, 17, 16), *[(8, 8, 32)] * 3, (9, 9, 32), *[(4, 4, 64)] * 3])
    monkeypatch.setattr(conv_grad, "SMALL_MAP", 0)  # TensorFlow's kernels everywhere
    calls.clear()
    theirs = kernel_grads()
    assert not calls
    assert ours.keys() == theirs.keys()
    for name in ours:
        a, b = (tf.cast(g, tf.float32).numpy() for g in (ours[name], theirs[name]))
        np.testing.assert_allclose(a, b, rtol=0.05, atol=0.02 * np.abs(b).max() + 1e-6, err_msg=name)


def test_the_kernel_gradient_benchmark_times_every_layer_three_ways():
    # benchmarks/kernel_gradient.py, behind docs/performance.md's per-layer table, at a
    # tiny size: the numbers are not judged, only that every distinct convolution of the
    # ResNet-18 gets a time per method and the ratios are the times' ratios.
    import json
    import os
    import subprocess
    import sys

    from conftest import REPO

    done = subprocess.run([sys.executable, os.path.join(REPO, "benchmarks", "kernel_gradient.py"),
                           "--width", "4", "--batch", "2", "--repeats", "1"],
                          capture_output=True, text=True, env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"), timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = json.loads(done.stdout.strip().splitlines()[-1])["rows"]
    assert [r["layer"] for r in rows][:3] == ["stem", "stage1 3x3", "stage2 3x3/2"] and len(rows) == 11
    assert [r["map"] for r in rows if r["layer"].startswith("stage4")] == ["4x4"] * 3
    for r in rows:
        assert all(r[f"{m}_ms"] > 0 for m in ("backprop_filter", "taps", "transposed")), r
        assert abs(r["transposed_speedup"] - r["backprop_filter_ms"] / r["transposed_ms"]) < 0.01, r
