"""The networks against the paper's and the official code's architecture."""

import math

import keras
import numpy as np
import pytest
import tensorflow as tf

from simsiam_tf import model as model_lib
from simsiam_tf.config import make_config


def _layers(m, kind):
    return [l for l in m.layers if isinstance(l, kind)]


def test_projector_cifar_two_layers():
    proj = model_lib.build_projector(512, dim=2048, layers=2)
    dense = _layers(proj, keras.layers.Dense)
    bns = _layers(proj, keras.layers.BatchNormalization)
    assert [d.units for d in dense] == [2048, 2048]
    assert [d.use_bias for d in dense] == [False, False]
    assert len(bns) == 2 and len(_layers(proj, keras.layers.ReLU)) == 1
    assert bns[0].center and bns[0].scale
    assert not bns[-1].center and not bns[-1].scale  # output BN without affine parameters
    assert proj.layers[-1] is bns[-1]  # no ReLU after the output BN
    assert proj.output.shape[-1] == 2048


def test_projector_imagenet_three_layers():
    proj = model_lib.build_projector(2048, dim=2048, layers=3)
    assert len(_layers(proj, keras.layers.Dense)) == 3
    assert len(_layers(proj, keras.layers.BatchNormalization)) == 3
    assert len(_layers(proj, keras.layers.ReLU)) == 2


def test_projector_hidden_width_apart_from_its_output():
    # The official builder's ResNet-18 projector: 512 -> 512 -> 512 hidden, then the output dim.
    proj = model_lib.build_projector(512, dim=2048, layers=3, hidden=512)
    dense = _layers(proj, keras.layers.Dense)
    assert [(d.kernel.shape[0], d.units) for d in dense] == [(512, 512), (512, 512), (512, 2048)]
    assert [b.gamma.shape[0] for b in _layers(proj, keras.layers.BatchNormalization)[:2]] == [512, 512]
    assert proj.output.shape[-1] == 2048


def test_a_config_builds_its_projectors_hidden_width():
    config = make_config("digits", width=8, proj_dim=64, proj_hidden_dim=24, pred_dim=16)
    projector = model_lib.build_model(config).projector
    assert [(d.kernel.shape[0], d.units) for d in _layers(projector, keras.layers.Dense)] == [(64, 24), (24, 64)]


def test_predictor_bottleneck_without_output_bn():
    pred = model_lib.build_predictor(2048, 512)
    dense = _layers(pred, keras.layers.Dense)
    assert [(d.kernel.shape[0], d.units) for d in dense] == [(2048, 512), (512, 2048)]
    assert [d.use_bias for d in dense] == [False, True]
    assert len(_layers(pred, keras.layers.BatchNormalization)) == 1
    assert pred.layers[-1] is dense[-1]  # output fc: no BN, no ReLU


def test_batchnorm_uses_pytorch_momentum_and_epsilon():
    m = model_lib.build_simsiam(make_config("digits"))
    bns = [l for sub in (m.backbone, m.projector, m.predictor) for l in _layers(sub, keras.layers.BatchNormalization)]
    assert bns and all(b.momentum == 0.9 and b.epsilon == 1e-5 for b in bns)


def test_initialisers_follow_pytorch():
    keras.utils.set_random_seed(0)
    pred = model_lib.build_predictor(2048, 512)
    fc1, fc2 = _layers(pred, keras.layers.Dense)
    bound = 1 / math.sqrt(2048)
    w = fc1.kernel.numpy()
    assert np.abs(w).max() <= bound and np.abs(w).max() > 0.99 * bound  # U(+-1/sqrt(fan_in))
    assert w.std() == pytest.approx(bound / math.sqrt(3), rel=0.02)
    b = fc2.bias.numpy()
    assert np.abs(b).max() <= 1 / math.sqrt(512) and b.std() > 0
    backbone = model_lib.build_backbone("resnet18", 32, width=64)
    conv = backbone.get_layer("stage2_block1_1_conv").kernel.numpy()  # 3x3, 64 -> 128
    fan_out = 3 * 3 * 128
    assert conv.std() == pytest.approx(math.sqrt(2 / fan_out), rel=0.02)


def test_kernels_are_distinct_and_reproducible():
    keras.utils.set_random_seed(3)
    a = model_lib.build_backbone("resnet18", 32, width=8)
    keras.utils.set_random_seed(3)
    b = model_lib.build_backbone("resnet18", 32, width=8)
    for va, vb in zip(a.weights, b.weights):
        np.testing.assert_array_equal(va.numpy(), vb.numpy())
    k1 = a.get_layer("stage1_block1_1_conv").kernel.numpy()
    k2 = a.get_layer("stage1_block2_1_conv").kernel.numpy()
    assert k1.shape == k2.shape and not np.allclose(k1, k2)


@pytest.mark.parametrize("name, last", [("resnet18", "2"), ("resnet50", "3")])
def test_zero_init_residual(name, last):
    # torchvision's zero_init_residual=True: the last BN of every residual block (bn2 of
    # a basic block, bn3 of a bottleneck) starts at gamma 0; every other BN at 1.
    backbone = model_lib.build_backbone(name, 32, width=8)
    bns = _layers(backbone, keras.layers.BatchNormalization)
    zero = [b.name for b in bns if np.all(b.gamma.numpy() == 0)]
    one = [b.name for b in bns if np.all(b.gamma.numpy() == 1)]
    blocks = 8 if name == "resnet18" else 16
    assert len(zero) == blocks and all(n.endswith(f"_{last}_bn") for n in zero)
    assert len(zero) + len(one) == len(bns)


def test_resnet18_cifar_variant_matches_torchvision_parameter_count():
    backbone = model_lib.build_backbone("resnet18", 32, width=64)
    stem = backbone.get_layer("stem_conv")
    assert stem.kernel_size == (3, 3) and stem.strides == (1, 1)
    assert not _layers(backbone, keras.layers.MaxPooling2D)
    assert backbone.output.shape[-1] == 512
    # torchvision resnet18 without fc has 11,176,512 parameters; the CIFAR stem
    # (3x3 instead of 7x7) saves (49 - 9) * 3 * 64 = 7,680.
    trainable = sum(int(np.prod(v.shape)) for v in backbone.trainable_weights)
    assert trainable == 11_176_512 - 7_680
    out = backbone(tf.zeros([2, 32, 32, 3]))
    assert out.shape == (2, 512) and out.dtype == tf.float32


def test_resnet50_matches_torchvision_parameter_count():
    backbone = model_lib.build_backbone("resnet50", 64, width=64)
    assert backbone.output.shape[-1] == 2048
    assert len(_layers(backbone, keras.layers.MaxPooling2D)) == 1
    trainable = sum(int(np.prod(v.shape)) for v in backbone.trainable_weights)
    assert trainable == 23_508_032  # torchvision resnet50 without fc


def _torch_conv(x, kernel, stride, pad, cotangent):
    """PyTorch's Conv2d from its definition, with its gradients: zero-pad `pad` on every
    side, then correlate at `stride` (NumPy, float64, NHWC input, HWIO kernel).
    Returns the output and the gradients of sum(output * cotangent) for x and kernel."""
    xp = np.pad(x.astype(np.float64), [(0, 0), (pad, pad), (pad, pad), (0, 0)])
    kh, kw = kernel.shape[:2]
    oh, ow = (xp.shape[1] - kh) // stride + 1, (xp.shape[2] - kw) // stride + 1
    out = np.zeros((x.shape[0], oh, ow, kernel.shape[3]))
    dx, dk = np.zeros(xp.shape), np.zeros(kernel.shape)
    for i in range(kh):
        for j in range(kw):
            tap = (slice(None), slice(i, i + stride * (oh - 1) + 1, stride), slice(j, j + stride * (ow - 1) + 1, stride))
            out += np.einsum("bhwi,io->bhwo", xp[tap], kernel[i, j])
            if cotangent is not None:
                dk[i, j] = np.einsum("bhwi,bhwo->io", xp[tap], cotangent)
                dx[tap] += np.einsum("bhwo,io->bhwi", cotangent, kernel[i, j])
    return out, dx[:, pad : pad + x.shape[1], pad : pad + x.shape[2], :], dk


@pytest.mark.parametrize(
    "kernel, stride, size, channels",
    [
        (3, 1, 8, 3), (3, 2, 8, 3), (3, 2, 7, 3), (7, 2, 18, 3), (7, 2, 17, 3),  # 7x7/2: ResNet-50's stem
        # 1x1/2 shortcuts: oneDNN's kernel gradient is wrong for these at <= 5 channels
        # on even-sized maps (see Conv2D.convolution_op); 64 is the paper's width.
        (1, 2, 8, 3), (1, 2, 8, 4), (1, 2, 9, 4), (1, 2, 8, 64),
    ],
)
def test_conv_matches_pytorch_values_and_gradients(kernel, stride, size, channels):
    # PyTorch pads kernel // 2 on every side; Keras "same" pads a stride-2 conv after
    # the map only, which shifts every output by one input row. Our Conv2D gives
    # the padding to the kernel ("same" or a one-sided pad, see its docstring): the
    # output and both gradients must be those of PyTorch's definition.
    pad = kernel // 2
    conv = model_lib.Conv2D(2, kernel, strides=stride, padding="valid", pad=pad, use_bias=False)
    rng = np.random.default_rng(kernel * 1000 + stride * 100 + size + channels)
    x = tf.constant(rng.normal(size=(2, size, size, channels)).astype(np.float32))
    conv.build(x.shape)
    conv.kernel.assign(rng.normal(size=conv.kernel.shape).astype(np.float32))
    shape = _torch_conv(x.numpy(), conv.kernel.numpy(), stride, pad, None)[0].shape
    cotangent = rng.normal(size=shape)
    expected, dx, dk = _torch_conv(x.numpy(), conv.kernel.numpy(), stride, pad, cotangent)
    with tf.GradientTape() as tape:
        tape.watch(x)
        y = conv(x)
        loss = tf.reduce_sum(y * tf.constant(cotangent.astype(np.float32)))
    assert tuple(y.shape) == expected.shape == conv.compute_output_shape(tuple(x.shape))
    np.testing.assert_allclose(y.numpy(), expected, rtol=1e-4, atol=1e-4)
    grad_x, grad_k = tape.gradient(loss, [x, conv.kernel])
    np.testing.assert_allclose(grad_x.numpy(), dx, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(grad_k.numpy(), dk, rtol=1e-4, atol=1e-3)


def test_backbone_has_no_padding_layers_and_resnet50_pool_pad_stays():
    # The padding lives in the convolutions (a separate pad layer made oneDNN convolve
    # over the zeros); only ResNet-50's max-pool keeps its own.
    r18 = model_lib.build_backbone("resnet18", 32, width=8)
    r50 = model_lib.build_backbone("resnet50", 64, width=8)
    assert _layers(r18, keras.layers.ZeroPadding2D) == []
    assert [l.name for l in _layers(r50, keras.layers.ZeroPadding2D)] == ["stem_pool_pad"]
    assert {l.pad for l in _layers(r18, keras.layers.Conv2D)} == {0, 1}
    assert r50.get_layer("stem_conv").pad == 3


def test_simsiam_outputs_and_bfloat16_keeps_float32_outputs():
    cfg = make_config("digits", precision="bfloat16")
    m = model_lib.build_simsiam(cfg)
    out = m(tf.zeros([4, 32, 32, 3]))
    assert out["features"].shape == (4, 128) and out["z"].shape == (4, 512) and out["p"].shape == (4, 512)
    assert all(v.dtype == tf.float32 for v in out.values())
    assert m.backbone.get_layer("stem_conv").compute_dtype == "bfloat16"
    assert all(v.dtype == "float32" for v in m.trainable_variables)


@pytest.mark.parametrize("sync", [True, False])
def test_sync_bn_flag(sync):
    # Every BatchNorm of all three networks follows the flag (the predictor's hidden BN
    # too: under MirroredStrategy its statistics must span the global batch as well).
    m = model_lib.build_simsiam(make_config("digits", width=8), sync_bn=sync)
    # ResNet-18: the stem, two per basic block (8 blocks), three downsampling shortcuts;
    # a 2-layer projector: two; the predictor: its hidden BN.
    expected = {"backbone": 1 + 2 * 8 + 3, "projector": 2, "predictor": 1}
    for net in (m.backbone, m.projector, m.predictor):
        bns = _layers(net, keras.layers.BatchNormalization)
        assert len(bns) == expected[net.name], net.name
        assert all(b.synchronized == sync for b in bns), net.name
    every_bn = [l for l in m._flatten_layers() if isinstance(l, keras.layers.BatchNormalization)]
    assert len(every_bn) == sum(expected.values())  # no BatchNorm outside the three networks


def _fc(fan_in, units, bias):
    """Parameters of a fully-connected layer."""
    return fan_in * units + (units if bias else 0)


def _count(variables):
    return sum(int(np.prod(v.shape)) for v in variables)


# Expected parameter counts, computed independently of our code:
# - backbones: torchvision's, printed by `/work/torchvenv/bin/python` (torch 2.14.1,
#   torchvision 0.29.1) with, for ResNet-18's CIFAR variant,
#       m = torchvision.models.resnet18(); m.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
#       m.maxpool = nn.Identity(); m.fc = nn.Identity()
#   and for ResNet-50 `m = torchvision.models.resnet50(); m.fc = nn.Identity()`; then
#   sum(p.numel() for p in m.parameters()) -> 11,168,832 and 23,508,032 (trainable), and
#   the BatchNorm running_mean / running_var buffers (num_batches_tracked excluded; Keras
#   has no counterpart) -> 9,600 and 53,120 (Keras: moving_mean / moving_variance).
# - heads, from their definitions (paper Sec. 3 and App. D; facebookresearch/simsiam
#   builder.py): projection MLP fc-BN-ReLU x (L - 1), then fc-BN without affine
#   parameters, hidden and output 2048-d, L = 2 on CIFAR ("a 2-layer projection MLP"),
#   3 on ImageNet; its fcs have no bias (the official code leaves the last one's bias
#   frozen, requires_grad=False, so it is not trained). Prediction MLP 2048 -> 512 -> 2048:
#   fc (no bias: BN follows) - BN - ReLU - fc with bias, no BN.
_TORCHVISION = {"resnet18": (11_168_832, 9_600), "resnet50": (23_508_032, 53_120)}


@pytest.mark.parametrize("preset, backbone, feat, proj_layers", [("cifar", "resnet18", 512, 2), ("imagenet", "resnet50", 2048, 3)])
def test_build_simsiam_presets_have_the_papers_parameter_counts(preset, backbone, feat, proj_layers):
    # Built small (image size 64 for ImageNet): the number of parameters does not depend on it.
    config = make_config(preset, image_size=32 if preset == "cifar" else 64)
    assert (config.backbone, config.proj_layers, config.proj_dim, config.pred_dim) == (backbone, proj_layers, 2048, 512)
    m = model_lib.build_simsiam(config)
    d, h = 2048, 512
    proj_trainable = _fc(feat, d, False) + (proj_layers - 2) * _fc(d, d, False) + _fc(d, d, False)
    proj_trainable += (proj_layers - 1) * 2 * d  # gamma and beta of the hidden BNs; the output BN has none
    pred_trainable = _fc(d, h, False) + 2 * h + _fc(h, d, True)
    expected = {
        "backbone": _TORCHVISION[backbone],
        "projector": (proj_trainable, proj_layers * 2 * d),  # every BN keeps a mean and a variance
        "predictor": (pred_trainable, 2 * h),
    }
    for net in (m.backbone, m.projector, m.predictor):
        assert (_count(net.trainable_weights), _count(net.non_trainable_weights)) == expected[net.name], net.name
    assert _count(m.trainable_weights) == sum(t for t, _ in expected.values())
    # For the record, the totals these give (ResNet-50 + heads: 38,199,360 trainable).
    totals = {"cifar": 11_168_832 + 5_246_976 + 2_100_224, "imagenet": 23_508_032 + 12_591_104 + 2_100_224}
    assert _count(m.trainable_weights) == totals[preset]


def test_checkpoints_written_with_keras_layers_still_load(tmp_path, monkeypatch):
    # Runs trained before BatchNorm took PyTorch's running-variance update, and before
    # the padding moved into the convolutions, used Keras's own BatchNormalization and
    # Conv2D with ZeroPadding2D layers in front; their checkpoints must load into
    # today's model, every weight and moving statistic in place (Keras names a layer's
    # slot in the file after its class and name; the pad layers held no weights).
    config = make_config("digits", width=8, proj_dim=64, pred_dim=16)

    def keras_conv(self, filters, kernel, stride=1, name=None):
        return keras.layers.Conv2D(
            filters, kernel, strides=stride, padding="valid", use_bias=False,
            kernel_initializer=model_lib.conv_init(), dtype=self.dtype, name=name,
        )

    def padded_conv_bn(self, x, filters, kernel, stride, name, relu=True, gamma_zero=False):
        if kernel // 2:
            x = keras.layers.ZeroPadding2D(kernel // 2, dtype=self.dtype, name=f"{name}_pad")(x)
        x = self.conv(filters, kernel, stride, name=f"{name}_conv")(x)
        x = self.bn(gamma_zero=gamma_zero, name=f"{name}_bn")(x)
        return keras.layers.ReLU(dtype=self.dtype, name=f"{name}_relu")(x) if relu else x

    def keras_bn(self, gamma_zero=False, affine=True, name=None, dtype=None):
        return keras.layers.BatchNormalization(
            momentum=model_lib.BN_MOMENTUM, epsilon=model_lib.BN_EPSILON, center=affine, scale=affine,
            gamma_initializer="zeros" if gamma_zero else "ones", synchronized=self.sync_bn,
            dtype=dtype or self.dtype, name=name,
        )

    with monkeypatch.context() as patch:
        patch.setattr(model_lib._Builder, "bn", keras_bn)
        patch.setattr(model_lib._Builder, "conv", keras_conv)
        patch.setattr(model_lib._Builder, "conv_bn", padded_conv_bn)
        keras.utils.set_random_seed(1)
        old = model_lib.build_simsiam(config)
    for v in old.weights:  # distinct values everywhere, moving statistics included
        v.assign(np.random.default_rng(len(v.path)).normal(size=v.shape).astype(v.dtype))
    path = str(tmp_path / "old.weights.h5")
    old.save_weights(path)
    keras.utils.set_random_seed(2)
    new = model_lib.build_simsiam(config)
    new.load_weights(path)
    assert _layers(old.backbone, keras.layers.ZeroPadding2D) and not _layers(new.backbone, keras.layers.ZeroPadding2D)
    assert len(new.weights) == len(old.weights)
    for a, b in zip(old.weights, new.weights):
        np.testing.assert_array_equal(a.numpy(), b.numpy(), err_msg=b.path)


@pytest.mark.parametrize("shape, affine", [((16, 4, 4, 6), True), ((16, 6), True), ((16, 6), False)])
def test_training_batchnorm_is_pytorchs(shape, affine):
    # Training-mode BN runs as TensorFlow's fused op (one oneDNN primitive); the composed
    # path stays for synchronised BN. Both must be PyTorch's BN: normalise with the
    # biased batch variance, update running_var with the unbiased one, momentum 0.1,
    # and have the same gradients.
    rng = np.random.default_rng(len(shape))
    x = tf.constant((rng.normal(size=shape) * 3 + 1).astype(np.float32))
    cotangent = tf.constant(rng.normal(size=shape).astype(np.float32))
    layers = {}
    for synchronized in (False, True):
        bn = model_lib.BatchNormalization(
            momentum=model_lib.BN_MOMENTUM, epsilon=model_lib.BN_EPSILON, center=affine, scale=affine,
            synchronized=synchronized,
        )
        bn.build(shape)
        if affine:
            bn.gamma.assign(rng.normal(size=shape[-1:]).astype(np.float32))
            bn.beta.assign(rng.normal(size=shape[-1:]).astype(np.float32))
        layers[synchronized] = bn
    layers[True].set_weights(layers[False].get_weights())
    results = {}
    for synchronized, bn in layers.items():
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = bn(x, training=True)
            loss = tf.reduce_sum(y * cotangent)
        results[synchronized] = (y, tape.gradient(loss, [x] + bn.trainable_weights), bn)
    axes = tuple(range(len(shape) - 1))
    xd = x.numpy().astype(np.float64)
    mean, var = xd.mean(axes), xd.var(axes)
    n = xd.size // shape[-1]
    gamma, beta = (layers[False].gamma.numpy(), layers[False].beta.numpy()) if affine else (1.0, 0.0)
    expected = (xd - mean) / np.sqrt(var + model_lib.BN_EPSILON) * gamma + beta
    fused_y, fused_grads, fused = results[False]
    np.testing.assert_allclose(fused_y.numpy(), expected, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(fused.moving_mean.numpy(), 0.1 * mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(fused.moving_variance.numpy(), 0.9 + 0.1 * var * n / (n - 1), rtol=1e-5)
    composed_y, composed_grads, composed = results[True]
    np.testing.assert_allclose(fused_y.numpy(), composed_y.numpy(), rtol=1e-4, atol=1e-4)
    for a, b in zip(fused_grads, composed_grads):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-4, atol=1e-4)
    for a, b in zip(fused.non_trainable_weights, composed.non_trainable_weights):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-5, atol=1e-6)
