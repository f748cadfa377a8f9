"""The SimSiam networks: backbone, projection MLP, prediction MLP and the training step.

Architecture, as in facebookresearch/simsiam `simsiam/builder.py` and the paper:

- Encoder f = backbone + projection MLP. "The projection MLP (in f) has BN applied to
  each fully-connected (fc) layer, including its output fc. Its output fc has no ReLU.
  The hidden fc is 2048-d. This MLP has 3 layers." CIFAR uses 2 layers. The official
  builder makes the hidden width the backbone's feature dimension (2048 for ResNet-50,
  512 for ResNet-18); here it is `proj_hidden_dim`, apart from the output `proj_dim`.
- Predictor h: "The prediction MLP (h) has BN applied to its hidden fc layers. Its
  output fc does not have BN or ReLU. This MLP has 2 layers." 2048 -> 512 -> 2048.

Initialisation, BatchNorm momentum and epsilon follow PyTorch, because the paper's
results were obtained with them and Keras's defaults differ:

- conv: kaiming normal, fan_out, ReLU gain (torchvision ResNet);
- fc: kaiming uniform with a = sqrt(5) (torch.nn.Linear), i.e. U(+-1/sqrt(fan_in)),
  and the same bound for biases;
- BatchNorm: PyTorch momentum 0.1 and eps 1e-5, i.e. Keras momentum 0.9, and PyTorch's
  running variance, updated with the unbiased batch variance (`BatchNormalization`);
- the last BN of each residual block starts at gamma = 0 (`zero_init_residual=True`, as
  the official builder asks of torchvision).

BatchNorm is synchronised across replicas when there are several, so one step on N
replicas equals one step on a single device with the same global batch.
"""

from __future__ import annotations

import math

import keras
import tensorflow as tf

from simsiam_tf import conv_grad, losses
from simsiam_tf.input import batches

BN_MOMENTUM = 0.9
BN_EPSILON = 1e-5


# Initialisers are made per layer: a Keras initialiser instance draws its seed once,
# so sharing one would give every same-shaped kernel identical values. Made after
# keras.utils.set_random_seed, they are reproducible.
def conv_init() -> keras.initializers.Initializer:
    """torchvision ResNet conv init: kaiming normal, fan_out, ReLU gain."""
    return keras.initializers.VarianceScaling(2.0, "fan_out", "untruncated_normal")


def dense_init() -> keras.initializers.Initializer:
    """torch.nn.Linear: kaiming_uniform(a=sqrt(5)) gives U(+-sqrt(1/fan_in)), scale 1/3."""
    return keras.initializers.VarianceScaling(1.0 / 3.0, "fan_in", "uniform")


def dense_bias_init(fan_in: int) -> keras.initializers.Initializer:
    """torch.nn.Linear's bias initialiser: U(+-1/sqrt(fan_in))."""
    bound = 1.0 / math.sqrt(fan_in)
    return keras.initializers.RandomUniform(-bound, bound)


@keras.saving.register_keras_serializable(package="simsiam_tf")
class BatchNormalization(keras.layers.BatchNormalization):
    """BatchNormalization whose moving variance is updated as PyTorch's running_var.

    It keeps Keras's class name on purpose: Keras files a layer's weights in a
    checkpoint under its class name, so checkpoints written with keras.layers'
    BatchNormalization (every run before this class) load unchanged.

    In training mode both normalise with the batch's biased variance, but PyTorch
    updates running_var with the unbiased one, n / (n - 1) times larger (n: values per
    channel in the global batch), and Keras with the biased one: the heads' BN1d
    statistics came out 1 / (n - 1) low in proportion (0.8% at batch 128), a backbone
    BN's 1 / (B * H * W - 1). Found by benchmarks/torch_parity.py. Inference and every
    gradient are unchanged.
    """

    def call(self, inputs, training=None, mask=None):
        if not (training and self.trainable) or mask is not None or self.renorm:
            return super().call(inputs, training=training, mask=mask)
        if not self.synchronized and inputs.shape.rank in (2, 4) and self.axis in (-1, inputs.shape.rank - 1):
            return self._fused_training_call(inputs)
        # keras.layers.BatchNormalization.call's training branch, with the correction.
        x = tf.cast(inputs, keras.backend.result_type(inputs.dtype, "float32"))
        mean, variance = self._moments(x, None)
        count = tf.cast(tf.size(x) // tf.shape(x)[self.axis], x.dtype)
        replica = tf.distribute.get_replica_context()
        if self.synchronized and replica is not None:
            count *= replica.num_replicas_in_sync  # batches split evenly (drop_remainder)
        unbiased = variance * count / tf.maximum(count - 1.0, 1.0)
        m = self.momentum
        self.moving_mean.assign(tf.cast(self.moving_mean, x.dtype) * m + mean * (1.0 - m))
        self.moving_variance.assign(tf.cast(self.moving_variance, x.dtype) * m + unbiased * (1.0 - m))
        outputs = keras.ops.batch_normalization(
            x, mean, variance, axis=self.axis,
            offset=tf.cast(self.beta, x.dtype) if self.center else None,
            scale=tf.cast(self.gamma, x.dtype) if self.scale else None,
            epsilon=self.epsilon,
        )
        return tf.cast(outputs, self.compute_dtype)

    def _fused_training_call(self, inputs):
        """The same training-mode BN in one fused op, which oneDNN runs as one primitive.

        Keras composes BN from a dozen element-wise ops (moments, subtract, multiply,
        ...), each a pass over the activations, forward and backward: about 15% of
        the step's op time on a 2-core AVX2 CPU (docs/performance.md). TensorFlow's fused
        op returns the batch mean and the unbiased batch variance, exactly PyTorch's
        running-stat update. BN1d inputs [B, C] run as [B, 1, 1, C]. Synchronised BN
        keeps the composed path: its moments are all-reduced across replicas.
        """
        x = inputs if inputs.shape.rank == 4 else inputs[:, None, None, :]
        channels = inputs.shape[-1]
        scale = tf.cast(self.gamma, "float32") if self.scale else tf.ones([channels], "float32")
        offset = tf.cast(self.beta, "float32") if self.center else tf.zeros([channels], "float32")
        y, mean, unbiased = tf.compat.v1.nn.fused_batch_norm(
            x, scale, offset, epsilon=self.epsilon, data_format="NHWC", is_training=True
        )
        mean, unbiased = tf.stop_gradient(mean), tf.stop_gradient(unbiased)
        m = self.momentum
        self.moving_mean.assign(self.moving_mean * m + mean * (1.0 - m))
        self.moving_variance.assign(self.moving_variance * m + unbiased * (1.0 - m))
        y = y if inputs.shape.rank == 4 else y[:, 0, 0, :]
        return tf.cast(y, self.compute_dtype)


@keras.saving.register_keras_serializable(package="simsiam_tf")
class Conv2D(keras.layers.Conv2D):
    """Conv2D with PyTorch's padding, `pad` zeros on every side, in the form oneDNN runs fast.

    Keras offers "valid" and "same", and "same" pads stride-2 convolutions on the far
    side only, where PyTorch pads kernel // 2 on each side. How the padding is given
    decides the speed with oneDNN (measured, docs/performance.md):
    - a separate ZeroPadding2D layer (what this model did first) makes oneDNN convolve
      over the zeros as data, forward and in both backward passes: the 4x4 stage-4
      maps become 6x6, and each stage-4 3x3 convolution took 1.25-1.65x as long;
    - TensorFlow's explicit per-side padding reaches oneDNN in the forward pass only:
      both backward passes fall back to a generic kernel, and the step was 1.4x slower;
    - "same" reaches oneDNN in all three passes.
    So: symmetric padding at stride 1 is "same" (identical for odd kernels); otherwise
    the input is padded by what PyTorch's convolution actually reads (for a 3x3,
    stride-2 convolution of an even-sized map, one row and column before it: the row
    PyTorch pads after it is never read), and convolved "valid".

    It keeps Keras's class name for the same reason as `BatchNormalization`.
    """

    def __init__(self, *args, pad: int = 0, **kwargs):
        super().__init__(*args, **kwargs)
        if self.padding != "valid" or self.data_format != "channels_last":
            raise ValueError("Conv2D(pad=...) expects padding='valid' and channels_last")
        self.pad = int(pad)

    def _read_padding(self, size, axis):
        """(before, after) zeros PyTorch's convolution reads along one spatial axis."""
        k = (self.kernel_size[axis] - 1) * self.dilation_rate[axis] + 1
        if size is None:
            return self.pad, self.pad
        out = (size + 2 * self.pad - k) // self.strides[axis] + 1
        last = (out - 1) * self.strides[axis] + k  # padded rows read
        return self.pad, max(0, last - size - self.pad)

    def convolution_op(self, inputs, kernel):
        if self.kernel_size == (1, 1) and self.strides != (1, 1) and not self.pad and inputs.shape[-1] <= 5:
            # The same convolution on the subsampled map. TensorFlow 2.21's oneDNN
            # (v3.7.3, AVX2) computes the kernel gradient of a strided 1x1 convolution
            # wrongly for even-sized maps with at most 5 input channels (the downsampling
            # shortcut at --width 4, say): 30-96% off, while the forward pass and the
            # input gradient are right (tests/test_model.py checks against NumPy). Only
            # there: the subsampling's gradient (StridedSliceGrad) cost 3.5% of the
            # bfloat16 step at width 64, and the strided kernel is right at 64 channels.
            sh, sw = self.strides
            return self._conv(inputs[:, ::sh, ::sw, :], kernel, (1, 1), "VALID")
        if not self.pad:
            return self._conv(inputs, kernel, self.strides, "VALID")
        (top, bottom), (left, right) = (self._read_padding(inputs.shape[1 + a], a) for a in (0, 1))
        if self.strides == (1, 1) and top == bottom == left == right and all(
            (k - 1) * d == 2 * self.pad for k, d in zip(self.kernel_size, self.dilation_rate)
        ):
            return self._conv(inputs, kernel, (1, 1), "SAME")
        x = tf.pad(inputs, [[0, 0], [top, bottom], [left, right], [0, 0]])
        return self._conv(x, kernel, self.strides, "VALID")

    def _conv(self, x, kernel, strides, padding):
        """tf.nn.conv2d; on small bfloat16 maps on CPUs with the kernel gradient of
        simsiam_tf.conv_grad, which TensorFlow's oneDNN computes slowly there."""
        kernel = tf.cast(kernel, x.dtype)
        reach = [(k - 1) * d + 1 for k, d in zip(self.kernel_size, self.dilation_rate)]
        out = [None if n is None else (n - r if padding == "VALID" else n - 1) // s + 1
               for n, r, s in zip(x.shape[1:3], reach, strides)]
        if conv_grad.wanted(x, self.kernel_size, self.dilation_rate, out):
            return conv_grad.conv2d(x, kernel, strides, padding)
        return tf.nn.conv2d(x, kernel, strides, padding, dilations=self.dilation_rate)

    def compute_output_shape(self, input_shape):
        batch, h, w, channels = input_shape
        grow = lambda n: None if n is None else n + 2 * self.pad  # noqa: E731
        return super().compute_output_shape((batch, grow(h), grow(w), channels))

    def get_config(self):
        return {**super().get_config(), "pad": self.pad}


class _Builder:
    """Layer factories sharing the dtype policy and the BatchNorm synchronisation."""

    def __init__(self, dtype: str, sync_bn: bool):
        self.dtype = dtype
        self.sync_bn = sync_bn

    def conv(self, filters, kernel, stride=1, name=None):
        # PyTorch pads kernel // 2 on each side (see Conv2D).
        return Conv2D(
            filters, kernel, strides=stride, padding="valid", pad=kernel // 2, use_bias=False,
            kernel_initializer=conv_init(), dtype=self.dtype, name=name,
        )

    def bn(self, gamma_zero=False, affine=True, name=None, dtype=None):
        return BatchNormalization(
            momentum=BN_MOMENTUM, epsilon=BN_EPSILON, center=affine, scale=affine,
            gamma_initializer="zeros" if gamma_zero else "ones",
            synchronized=self.sync_bn, dtype=dtype or self.dtype, name=name,
        )

    def dense(self, units, fan_in, use_bias, name=None, dtype=None):
        return keras.layers.Dense(
            units, use_bias=use_bias, kernel_initializer=dense_init(),
            bias_initializer=dense_bias_init(fan_in), dtype=dtype or self.dtype, name=name,
        )

    def conv_bn(self, x, filters, kernel, stride, name, relu=True, gamma_zero=False):
        x = self.conv(filters, kernel, stride, name=f"{name}_conv")(x)
        x = self.bn(gamma_zero=gamma_zero, name=f"{name}_bn")(x)
        if relu:
            x = keras.layers.ReLU(dtype=self.dtype, name=f"{name}_relu")(x)
        return x


def _basic_block(b: _Builder, x, filters, stride, name):
    shortcut = x
    y = b.conv_bn(x, filters, 3, stride, f"{name}_1")
    y = b.conv_bn(y, filters, 3, 1, f"{name}_2", relu=False, gamma_zero=True)
    if stride != 1 or x.shape[-1] != filters:
        shortcut = b.conv_bn(x, filters, 1, stride, f"{name}_down", relu=False)
    y = keras.layers.Add(dtype=b.dtype, name=f"{name}_add")([y, shortcut])
    return keras.layers.ReLU(dtype=b.dtype, name=f"{name}_out")(y)


def _bottleneck(b: _Builder, x, filters, stride, name):
    shortcut = x
    y = b.conv_bn(x, filters, 1, 1, f"{name}_1")
    y = b.conv_bn(y, filters, 3, stride, f"{name}_2")  # torchvision v1.5: stride on the 3x3
    y = b.conv_bn(y, filters * 4, 1, 1, f"{name}_3", relu=False, gamma_zero=True)
    if stride != 1 or x.shape[-1] != filters * 4:
        shortcut = b.conv_bn(x, filters * 4, 1, stride, f"{name}_down", relu=False)
    y = keras.layers.Add(dtype=b.dtype, name=f"{name}_add")([y, shortcut])
    return keras.layers.ReLU(dtype=b.dtype, name=f"{name}_out")(y)


def build_backbone(
    name: str, image_size: int, width: int = 64, dtype: str = "float32", sync_bn: bool = False
) -> keras.Model:
    """ResNet backbone: float images [B, S, S, 3] -> float32 features [B, F].

    resnet18: the CIFAR variant (3x3 stride-1 stem, no max-pool), F = 8 * width.
    resnet50: the ImageNet ResNet-50 (7x7 stride-2 stem, max-pool), F = 32 * width.
    """
    b = _Builder(dtype, sync_bn)
    inputs = keras.Input((image_size, image_size, 3), name="images")
    if name == "resnet18":
        x = b.conv_bn(inputs, width, 3, 1, "stem")
        block, depths = _basic_block, (2, 2, 2, 2)
    elif name == "resnet50":
        x = b.conv_bn(inputs, width, 7, 2, "stem")
        # After ReLU, zero padding equals PyTorch's -inf padding for the max-pool.
        x = keras.layers.ZeroPadding2D(1, dtype=dtype, name="stem_pool_pad")(x)
        x = keras.layers.MaxPooling2D(3, 2, dtype=dtype, name="stem_pool")(x)
        block, depths = _bottleneck, (3, 4, 6, 3)
    else:
        raise ValueError(f"unknown backbone {name!r}; expected resnet18 or resnet50")
    for stage, depth in enumerate(depths):
        for i in range(depth):
            stride = 2 if stage > 0 and i == 0 else 1
            x = block(b, x, width * 2**stage, stride, f"stage{stage + 1}_block{i + 1}")
    x = keras.layers.GlobalAveragePooling2D(dtype=dtype, name="pool")(x)
    features = keras.layers.Activation("linear", dtype="float32", name="features")(x)
    return keras.Model(inputs, features, name="backbone")


def build_projector(
    in_dim: int, dim: int = 2048, layers: int = 2, dtype: str = "float32", sync_bn: bool = False,
    hidden: int | None = None,
) -> keras.Model:
    """Projection MLP: fc-BN-ReLU x (layers - 1), then fc-BN without affine parameters.

    Hidden fcs are `hidden` wide (`dim` when None; 2048 in the paper), the output fc
    `dim`. Output float32.
    """
    hidden = dim if hidden is None else hidden
    b = _Builder(dtype, sync_bn)
    inputs = keras.Input((in_dim,), name="features")
    x, fan_in = inputs, in_dim
    for i in range(layers - 1):
        x = b.dense(hidden, fan_in, use_bias=False, name=f"fc{i + 1}")(x)
        x = b.bn(name=f"bn{i + 1}")(x)
        x = keras.layers.ReLU(dtype=dtype, name=f"relu{i + 1}")(x)
        fan_in = hidden
    # The official code freezes this fc's bias because BN follows; it is left out here.
    x = b.dense(dim, fan_in, use_bias=False, name=f"fc{layers}")(x)
    z = b.bn(affine=False, name=f"bn{layers}", dtype="float32")(x)
    return keras.Model(inputs, z, name="projector")


def build_predictor(
    dim: int = 2048, hidden: int = 512, dtype: str = "float32", sync_bn: bool = False
) -> keras.Model:
    """Prediction MLP: fc(dim -> hidden)-BN-ReLU, fc(hidden -> dim) with bias, no BN."""
    b = _Builder(dtype, sync_bn)
    inputs = keras.Input((dim,), name="z")
    x = b.dense(hidden, dim, use_bias=False, name="fc1")(inputs)
    x = b.bn(name="bn1")(x)
    x = keras.layers.ReLU(dtype=dtype, name="relu1")(x)
    p = b.dense(dim, hidden, use_bias=True, name="fc2", dtype="float32")(x)
    return keras.Model(inputs, p, name="predictor")


def normalize_uint8(images: tf.Tensor) -> tf.Tensor:
    """uint8 images -> the model's float32 input, as `augment.normalize(x / 255)` (kept
    here: `augment` imports keras-cv, which this module loads only when it must)."""
    mean = tf.constant((0.485, 0.456, 0.406), tf.float32)  # augment.IMAGENET_MEAN
    std = tf.constant((0.229, 0.224, 0.225), tf.float32)  # augment.IMAGENET_STD
    return (tf.cast(images, tf.float32) / 255.0 - mean) / std


class TwoViewModel(keras.Model):
    """What SimSiam and its contrastive baseline share: the training step around a loss.

    `train_step` takes a batch in the input's one format (`input.batches`: uint8 views
    of the same images, stacked on channels), finishes their augmentation where
    `--augment-on device` asks (`view_augment`), normalises them, and minimises
    `pair_loss(x1, x2)`,
    which the method defines; everything else (the update, the replica scaling, the
    logged loss, z_std and lr) is the same for every method, so that two runs differ
    only in the method. Subclasses: `SimSiam`, `SimCLR`.
    """

    def __init__(self, backbone, projector, view_augment=None, augment_seed=0, **kwargs):
        super().__init__(**kwargs)
        self.backbone = backbone
        self.projector = projector
        # --augment-on device: the batches hold uint8 crops, and this layer (an
        # `augment.ViewAugment`) finishes each view on the replica's device, with
        # stateless seeds from (augment_seed, step, replica).
        self.view_augment = view_augment
        self.augment_seed = augment_seed
        self.loss_tracker = keras.metrics.Mean(name="loss")
        self.z_std_tracker = keras.metrics.Mean(name="z_std")
        # MultiWorkerMirroredStrategy + fit() reduces the logged scalars along axis 0
        # and fails on rank-0 values (keras-team/keras#20585); set by training code.
        self.rank1_logs = False
        # --micro-batch: each step accumulates the gradients of this many micro-batches
        # (`_accumulated_gradients`); set by training code.
        self.accumulation_steps = 1

    @property
    def metrics(self):
        return [self.loss_tracker, self.z_std_tracker]

    def pair_loss(self, x1, x2):
        """(loss on this replica's batch, z1): the method's objective for two views."""
        raise NotImplementedError

    def augment_views(self, x1, x2, micro=None):
        """Flip, colour jitter, grayscale, blur and normalise two batches of uint8 crops.

        Seeds differ per step, per replica and per view (and per micro-batch when the
        step accumulates), so no two replicas (or workers) draw the same parameters for
        their images.
        """
        replica = tf.distribute.get_replica_context().replica_id_in_sync_group
        seed = tf.stack([tf.constant(self.augment_seed, tf.int64), tf.cast(self.optimizer.iterations, tf.int64)])
        seed = tf.random.experimental.stateless_fold_in(seed, tf.cast(replica, tf.int64))
        if micro is not None:
            seed = tf.random.experimental.stateless_fold_in(seed, tf.cast(micro, tf.int64))
        seed1, seed2 = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
        return self.view_augment(x1, seed=seed1), self.view_augment(x2, seed=seed2)

    def train_step(self, data):
        x1, x2 = batches.unpack(data)
        replicas = tf.distribute.get_strategy().num_replicas_in_sync
        if self.accumulation_steps == 1:
            loss, z1, grads = self._gradients(x1, x2, 1.0 / replicas)
        else:
            loss, z1, grads = self._accumulated_gradients(x1, x2, replicas)
        lr = self.current_lr()  # the rate this step applies (the schedule reads iterations)
        scaling = isinstance(self.optimizer, keras.optimizers.LossScaleOptimizer)
        if scaling and replicas > 1:
            grads = _agree_on_overflow(grads)
        self.optimizer.apply_gradients(zip(grads, self.trainable_variables))
        self.loss_tracker.update_state(loss)
        self.z_std_tracker.update_state(losses.global_z_std(z1))
        logs = {
            "loss": self.loss_tracker.result(),
            "z_std": self.z_std_tracker.result(),
            "lr": lr,
        }
        if scaling:  # after this step's update: halved if it overflowed
            logs["loss_scale"] = tf.cast(self.optimizer.dynamic_scale, tf.float32)
        if self.rank1_logs:
            logs = {k: tf.reshape(v, [1]) for k, v in logs.items()}
        return logs

    def _gradients(self, x1, x2, weight, micro=None):
        """(loss, z1, gradients of weight x loss) for two batches of uint8 views.

        Keras does not scale a hand-written loss, and gradients are summed across
        replicas (and micro-batches), so `weight` is this batch's share of the global
        batch: 1 / (replicas x micro-batches). Under float16 the optimizer multiplies
        it by its loss scale, so that small gradients survive float16, and divides the
        summed gradients by it again (elsewhere scale_loss returns the loss unchanged).
        """
        if self.view_augment is not None:  # --augment-on device: the views are the crops
            x1, x2 = self.augment_views(x1, x2, micro)
        else:  # augmented on the host: normalised here, on the replica's device
            x1, x2 = normalize_uint8(x1), normalize_uint8(x2)
        with tf.GradientTape() as tape:
            loss, z1 = self.pair_loss(x1, x2)
            scaled = self.optimizer.scale_loss(loss * weight)
        return loss, z1, tape.gradient(scaled, self.trainable_variables)

    def _accumulated_gradients(self, x1, x2, replicas):
        """The gradients of this replica's batch, summed over `accumulation_steps`
        micro-batches taken one after another (`--micro-batch`): the memory of one
        micro-batch's activations, the update of the whole batch.

        A `tf.while_loop` with parallel_iterations=1, so micro-batches never overlap
        and the step is traced once whatever their number. BatchNorm normalises each
        micro-batch by its own statistics and updates its moving averages once per
        micro-batch, as K replicas with unsynchronised BatchNorm would (the official
        code's per-GPU BN); the loss and z_std are of the whole batch.
        """
        steps = self.accumulation_steps
        shape = tf.concat([[steps, -1], tf.shape(x1)[1:]], axis=0)
        x1, x2 = tf.reshape(x1, shape), tf.reshape(x2, shape)
        variables = self.trainable_variables
        weight = 1.0 / (replicas * steps)

        def body(i, loss_sum, zs, *sums):
            loss, z1, grads = self._gradients(x1[i], x2[i], weight, micro=i)
            zs = zs.write(i, tf.cast(z1, tf.float32))
            return (i + 1, loss_sum + tf.cast(loss, tf.float32), zs, *(s + tf.cast(g, s.dtype) for s, g in zip(sums, grads)))

        start = (
            tf.constant(0), tf.constant(0.0), tf.TensorArray(tf.float32, size=steps, infer_shape=False),
            *(tf.zeros(v.shape, v.dtype) for v in variables),
        )
        _, loss_sum, zs, *grads = tf.while_loop(lambda i, *_: i < steps, body, start, parallel_iterations=1)
        return loss_sum / steps, zs.concat(), grads

    def current_lr(self) -> tf.Tensor:
        # A loss-scale wrapper hands on its inner optimizer's rate.
        lr = self.optimizer.learning_rate
        return tf.cast(lr, tf.float32)


def _agree_on_overflow(grads):
    """Each replica's gradients, made non-finite on every replica if they are on any.

    Keras's LossScaleOptimizer decides whether to skip a step from the gradients it is
    given, which here are each replica's own, before the optimizer sums them across
    replicas: under `merge_call` it takes the first replica's verdict (and would apply
    an overflow from another replica's share), without it each replica would branch on
    its own (and the summation, inside one branch, would wait for replicas in the
    other). One all-reduced count of non-finite replicas makes the verdict the same
    everywhere; adding 0 to a finite gradient leaves it exactly as it was.
    """
    present = [g for g in grads if g is not None]
    finite = tf.reduce_all([tf.reduce_all(tf.math.is_finite(g)) for g in present])
    overflowed = tf.distribute.get_replica_context().all_reduce(
        tf.distribute.ReduceOp.SUM, tf.cast(tf.logical_not(finite), tf.float32)
    )
    poison = tf.where(overflowed > 0, tf.constant(float("inf")), tf.constant(0.0))
    first = next(i for i, g in enumerate(grads) if g is not None)
    grads = list(grads)
    grads[first] = grads[first] + tf.cast(poison, grads[first].dtype)
    return grads


# The Keras dtype policy of each --precision: float32 variables everywhere; the heads'
# last layers (and so the loss) compute in float32 whatever the policy.
DTYPE_POLICIES = {"float32": "float32", "bfloat16": "mixed_bfloat16", "float16": "mixed_float16"}


class SimSiam(TwoViewModel):
    """SimSiam (Chen & He, 2021): encoder f = projector(backbone(x)), predictor h.

    Its `pair_loss` is L = D(p1, stopgrad(z2)) / 2 + D(p2, stopgrad(z1)) / 2 (see
    `losses`). Calling the model returns {"features", "z", "p"} for one batch of views.

    Build it with `build_simsiam`, inside the distribution strategy's scope.
    """

    def __init__(self, backbone, projector, predictor, stop_gradient=True, view_augment=None, augment_seed=0, **kwargs):
        super().__init__(backbone, projector, view_augment=view_augment, augment_seed=augment_seed, **kwargs)
        self.predictor = predictor
        self.stop_gradient = stop_gradient

    def call(self, x, training=False):
        features = self.backbone(x, training=training)
        z = self.projector(features, training=training)
        return {"features": features, "z": z, "p": self.predictor(z, training=training)}

    def forward_pair(self, x1, x2, training=True):
        """p1, p2, z1, z2 for two views, each view normalised by its own BN statistics."""
        z1 = self.projector(self.backbone(x1, training=training), training=training)
        z2 = self.projector(self.backbone(x2, training=training), training=training)
        p1 = self.predictor(z1, training=training)
        p2 = self.predictor(z2, training=training)
        return p1, p2, z1, z2

    def pair_loss(self, x1, x2):
        p1, p2, z1, z2 = self.forward_pair(x1, x2, training=True)
        return losses.simsiam_loss(p1, p2, z1, z2, stop_gradient=self.stop_gradient), z1


class SimCLR(TwoViewModel):
    """The contrastive baseline (Chen et al., 2020) in SimSiam's harness.

    The same backbone and projection MLP as SimSiam, no predictor, no stop-gradient,
    and the NT-Xent loss at `temperature` with the negatives of the whole global batch
    (`losses.nt_xent`). Calling the model returns {"features", "z"}.
    """

    def __init__(self, backbone, projector, temperature=0.5, view_augment=None, augment_seed=0, **kwargs):
        super().__init__(backbone, projector, view_augment=view_augment, augment_seed=augment_seed, **kwargs)
        self.temperature = temperature

    def call(self, x, training=False):
        features = self.backbone(x, training=training)
        return {"features": features, "z": self.projector(features, training=training)}

    def pair_loss(self, x1, x2):
        z1 = self.projector(self.backbone(x1, training=True), training=True)
        z2 = self.projector(self.backbone(x2, training=True), training=True)
        return losses.nt_xent(z1, z2, self.temperature), z1


def _view_augment(config):
    if config.augment_on != "device":
        return None
    from simsiam_tf import augment as aug  # keras-cv: only when it is used

    view_augment = aug.ViewAugment(aug.AugmentSpec.for_image_size(config.image_size))
    view_augment.build((None, config.image_size, config.image_size, 3))  # no weights; marks it built
    return view_augment


def build_simsiam(config, sync_bn: bool = False) -> SimSiam:
    """The SimSiam model described by a `TrainConfig`, built (variables created)."""
    dtype = DTYPE_POLICIES[config.precision]
    backbone = build_backbone(config.backbone, config.image_size, config.width, dtype, sync_bn)
    feat_dim = backbone.output.shape[-1]
    projector = build_projector(feat_dim, config.proj_dim, config.proj_layers, dtype, sync_bn, config.proj_hidden_dim)
    predictor = build_predictor(config.proj_dim, config.pred_dim, dtype, sync_bn)
    model = SimSiam(
        backbone, projector, predictor, stop_gradient=config.stop_gradient,
        view_augment=_view_augment(config), augment_seed=config.seed, name="simsiam",
    )
    model(tf.zeros([2, config.image_size, config.image_size, 3]))
    return model


def build_simclr(config, sync_bn: bool = False) -> SimCLR:
    """The SimCLR baseline described by a `TrainConfig`: SimSiam's backbone and
    projector, built the same way (so with the same seed they start from the same
    weights), without the predictor."""
    dtype = DTYPE_POLICIES[config.precision]
    backbone = build_backbone(config.backbone, config.image_size, config.width, dtype, sync_bn)
    projector = build_projector(
        backbone.output.shape[-1], config.proj_dim, config.proj_layers, dtype, sync_bn, config.proj_hidden_dim
    )
    model = SimCLR(
        backbone, projector, temperature=config.temperature,
        view_augment=_view_augment(config), augment_seed=config.seed, name="simclr",
    )
    model(tf.zeros([2, config.image_size, config.image_size, 3]))
    return model


def build_model(config, sync_bn: bool = False) -> TwoViewModel:
    """The model `config.method` names: `build_simsiam` or `build_simclr`."""
    builders = {"simsiam": build_simsiam, "simclr": build_simclr}
    return builders[config.method](config, sync_bn)
