"""A 2-D convolution whose kernel gradient is a forward convolution, for small bfloat16 maps on CPUs.

TensorFlow 2.21 links oneDNN v3.7.3, whose bfloat16 kernel-gradient convolution
(`jit_bf16`) runs the small, deep maps of a CIFAR ResNet-18 at a fraction of its
forward convolution's speed (`brg_conv_fwd`), and 1.5-2.6x slower than PyTorch's
newer oneDNN on the same shapes: 64.8 ms for a 3x3, 512-channel convolution on 4 x 4
maps at batch 128, against 27.9 ms for the same gradient as one forward convolution
and 24.6 ms in PyTorch (`benchmarks/kernel_gradient.py`, docs/performance.md; 2-core
AMD EPYC, AVX512-BF16). On 16 x 16 maps and larger TensorFlow's kernel is the faster.

`conv2d` is `tf.nn.conv2d` with the same forward pass and the same input gradient
(TensorFlow's own kernels: Conv2D, Conv2DBackpropInput). Only the kernel gradient
differs: `kernel_gradient` sums the same products in another order, as a forward
convolution; in bfloat16 both ways sum in float32 and round once
(tests/test_conv_grad.py). simsiam_tf.model.Conv2D uses it where `wanted` says so.
"""

from __future__ import annotations

import tensorflow as tf

SMALL_MAP = 8  # output maps at most this high and wide take the transposed kernel gradient


def wanted(inputs: tf.Tensor, kernel_size, dilation_rate, output_hw) -> bool:
    """Whether `conv2d` pays for a convolution: bfloat16 on a machine without GPUs, a
    kernel larger than 1 x 1, no dilation, a known output map of at most SMALL_MAP x
    SMALL_MAP. Measured per layer (benchmarks/kernel_gradient.py) at widths 16, 32 and
    64, batch 64 and 128: 1.2-3.0x faster on 8 x 8 and 4 x 4 maps but for one 0.92x
    (width 16, stage 3's strided convolution); slower on 16 x 16 and 32 x 32 maps and
    for the 1x1 shortcuts. In the ResNet-18 fit step (bfloat16, batch 128, 2-core AMD
    EPYC with AVX512-BF16) 6.4% faster than the previous stage-4 rule; at width 16 the
    same speed."""
    return (inputs.dtype == tf.bfloat16 and tuple(dilation_rate) == (1, 1) and max(kernel_size) > 1
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
    output gradient is dy [B, Ho, Wo, Cout], as one forward convolution: x with batch
    and channels swapped ([Cin, H, W, B]: Cin images of B channels), dy as its kernel
    ([Ho, Wo, B, Cout]), dilated by the stride. Output [Cin, kh, kw, Cout]: tap (i, j)
    sums x[b, i + s*h, j + s*w, c] * dy[b, h, w, o] over b, h, w, the definition."""
    kh, kw, cin, cout = (int(n) for n in kernel_shape)
    (sh, sw), ho, wo = strides, int(dy.shape[1]), int(dy.shape[2])
    if padding == "SAME":  # stride 1, odd kernel: the convolution pads x itself (a padded copy cost 12-30%)
        pad = [[0, 0], [(kh - 1) // 2] * 2, [(kw - 1) // 2] * 2, [0, 0]]
    else:
        read_h, read_w = (ho - 1) * sh + kh, (wo - 1) * sw + kw
        if (read_h, read_w) != tuple(x.shape[1:3]):  # a strided VALID convolution may leave rows unread
            x = x[:, :read_h, :read_w, :]
        pad = "VALID"
    grad = tf.nn.conv2d(tf.transpose(x, [3, 1, 2, 0]), tf.transpose(dy, [1, 2, 0, 3]), strides=1,
                        padding=pad, dilations=(sh, sw))
    return tf.transpose(grad, [1, 2, 0, 3])
