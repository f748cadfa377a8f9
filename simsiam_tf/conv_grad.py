"""A 2-D convolution whose kernel gradient is a sum of matrix products, for small bfloat16 maps on CPUs.

TensorFlow 2.21 links oneDNN v3.7.3, whose bfloat16 kernel-gradient convolution runs
the deepest layers of a CIFAR ResNet-18 at less than half the speed of the same
convolution's forward pass: 52.9 ms for a 3x3, 512-channel convolution on 4 x 4 maps
at batch 128 (forward 21.0 ms), against 28.4 ms for the same gradient as nine matrix
products; PyTorch's newer oneDNN takes about 23 ms (docs/performance.md, "bfloat16
against PyTorch"; 2-core AMD EPYC, AVX512-BF16). On larger maps TensorFlow's kernel
is as fast or faster.

`conv2d` is `tf.nn.conv2d` with the same forward pass and the same input gradient
(TensorFlow's own kernels: Conv2D, Conv2DBackpropInput). Only the kernel gradient
differs: for each of the kh x kw taps, the input rows that tap reads, as a
[B*Ho*Wo, Cin] matrix, times the output gradient [B*Ho*Wo, Cout]. The same sum in
another order; in bfloat16 both ways sum in float32 and round once
(tests/test_conv_grad.py). simsiam_tf.model.Conv2D uses it where `wanted` says so.
"""

from __future__ import annotations

import tensorflow as tf

SMALL_MAP = 4  # output maps at most this high and wide ...
MIN_FILTERS = 512  # ... with at least this many output channels take the matmul kernel gradient


def wanted(inputs: tf.Tensor, filters: int, dilation_rate, output_hw) -> bool:
    """Whether `conv2d` pays for a convolution: bfloat16 on a machine without GPUs, no
    dilation, at least MIN_FILTERS output channels on a known output map of at most
    SMALL_MAP x SMALL_MAP. Measured on the ResNet-18 fit step, bfloat16, 2-core AMD EPYC
    with AVX512-BF16: stage 4 of the full network (512 channels, 4 x 4) 3% faster,
    adding stage 3 (256 channels, 8 x 8) no faster, stage 4 at width 16 (128 channels)
    2.5% slower."""
    return (inputs.dtype == tf.bfloat16 and tuple(dilation_rate) == (1, 1) and filters >= MIN_FILTERS
            and all(n is not None and n <= SMALL_MAP for n in output_hw)
            and not tf.config.list_logical_devices("GPU"))


def conv2d(x: tf.Tensor, kernel: tf.Tensor, strides, padding: str) -> tf.Tensor:
    """tf.nn.conv2d(x, kernel, strides, padding) for NHWC, no dilation, padding "VALID",
    or "SAME" at stride 1 with an odd kernel; the kernel gradient by `kernel_gradient`."""
    strides = tuple(strides)
    kh, kw = kernel.shape[0], kernel.shape[1]
    if padding == "SAME" and (strides != (1, 1) or kh % 2 == 0 or kw % 2 == 0):
        raise ValueError("conv2d: padding SAME needs stride 1 and an odd kernel (the others pad unevenly)")

    @tf.custom_gradient
    def convolve(x, kernel):
        y = tf.nn.conv2d(x, kernel, strides, padding)

        def grad(dy):
            dx = tf.raw_ops.Conv2DBackpropInput(input_sizes=tf.shape(x), filter=kernel, out_backprop=dy,
                                                strides=[1, *strides, 1], padding=padding)
            return dx, kernel_gradient(x, dy, kernel.shape, strides, padding)

        return y, grad

    return convolve(x, kernel)


def kernel_gradient(x: tf.Tensor, dy: tf.Tensor, kernel_shape, strides, padding: str) -> tf.Tensor:
    """d loss / d kernel [kh, kw, Cin, Cout] of a convolution of x [B, H, W, Cin] whose
    output gradient is dy [B, Ho, Wo, Cout]: one matrix product per tap."""
    kh, kw, cin, cout = (int(n) for n in kernel_shape)
    if padding == "SAME":
        x = tf.pad(x, [[0, 0], [(kh - 1) // 2, (kh - 1) // 2], [(kw - 1) // 2, (kw - 1) // 2], [0, 0]])
    ho, wo = int(dy.shape[1]), int(dy.shape[2])
    sh, sw = strides
    flat_dy = tf.reshape(dy, [-1, cout])
    taps = []
    for i in range(kh):
        for j in range(kw):
            read = x[:, i : i + (ho - 1) * sh + 1 : sh, j : j + (wo - 1) * sw + 1 : sw, :]
            taps.append(tf.matmul(tf.reshape(read, [-1, cin]), flat_dy, transpose_a=True))
    return tf.reshape(tf.stack(taps), [kh, kw, cin, cout])
