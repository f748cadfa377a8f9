"""SGD with PyTorch's semantics and the SimSiam learning-rate schedule.

The official code (facebookresearch/simsiam `main_simsiam.py`) uses
`torch.optim.SGD(params, lr, momentum=0.9, weight_decay=wd)` on every parameter, sets
`lr = base_lr * batch_size / 256`, and at the start of each epoch sets
`lr = init_lr * 0.5 * (1 + cos(pi * epoch / epochs))`; with `--fix-pred-lr` the
predictor keeps `init_lr`. Keras's SGD differs in two ways that matter here: its
`weight_decay` is decoupled (AdamW-style), and an `l2` regulariser doubles the decay.
`TorchSGD` reproduces PyTorch's update exactly:

    g <- g + wd * w;   buf <- momentum * buf + g;   w <- w - lr * buf
"""

from __future__ import annotations

import math

import keras
import tensorflow as tf


class EpochCosine(keras.optimizers.schedules.LearningRateSchedule):
    """lr(step) = init_lr * 0.5 * (1 + cos(pi * epoch / epochs)), epoch = step // steps_per_epoch."""

    def __init__(self, init_lr: float, steps_per_epoch: int, epochs: int):
        self.init_lr = float(init_lr)
        self.steps_per_epoch = int(steps_per_epoch)
        self.epochs = int(epochs)

    def __call__(self, step):
        epoch = tf.math.floordiv(tf.cast(step, tf.int64), self.steps_per_epoch)
        epoch = tf.cast(tf.minimum(epoch, self.epochs), tf.float32)
        return self.init_lr * 0.5 * (1.0 + tf.cos(math.pi * epoch / self.epochs))

    def get_config(self):
        return {"init_lr": self.init_lr, "steps_per_epoch": self.steps_per_epoch, "epochs": self.epochs}


class TorchSGD(keras.optimizers.Optimizer):
    """torch.optim.SGD (momentum, coupled weight decay, no dampening, no Nesterov).

    Args:
        learning_rate: float or schedule.
        momentum: PyTorch's momentum.
        weight_decay: PyTorch's weight_decay (added to the gradient, decays all variables).
        fixed_lr_variables: variables updated with `fixed_lr` instead of the schedule
            (SimSiam's `--fix-pred-lr` for the predictor). Selected by object, not name.
        fixed_lr: the constant learning rate for those variables.
    """

    def __init__(
        self,
        learning_rate=0.01,
        momentum=0.9,
        weight_decay=0.0,
        fixed_lr_variables=(),
        fixed_lr=None,
        name="torch_sgd",
        **kwargs,
    ):
        super().__init__(learning_rate=learning_rate, name=name, **kwargs)
        self.momentum = float(momentum)
        self.torch_weight_decay = float(weight_decay)
        self._fixed_lr_variables = list(fixed_lr_variables)
        self.fixed_lr = fixed_lr
        if self._fixed_lr_variables and fixed_lr is None:
            raise ValueError("fixed_lr_variables needs fixed_lr")
        self._fixed_indices = frozenset()

    def build(self, variables):
        if self.built:
            return
        super().build(variables)
        self.momentums = self.add_optimizer_variables(variables, "momentum")
        self._fixed_indices = frozenset(self._get_variable_index(v) for v in self._fixed_lr_variables)

    def update_step(self, gradient, variable, learning_rate):
        index = self._get_variable_index(variable)
        if index in self._fixed_indices:
            learning_rate = self.fixed_lr
        lr = tf.cast(learning_rate, variable.dtype)
        g = tf.cast(gradient, variable.dtype)
        if self.torch_weight_decay:
            g = g + self.torch_weight_decay * variable
        buf = self.momentums[index]
        self.assign(buf, self.momentum * buf + g)
        self.assign_sub(variable, lr * buf)

    def get_config(self):
        config = super().get_config()
        config.update(
            {"momentum": self.momentum, "weight_decay": self.torch_weight_decay, "fixed_lr": self.fixed_lr}
        )
        return config


class LossScaleOptimizer(keras.optimizers.LossScaleOptimizer):
    """Keras's dynamic loss scaling, for `--precision float16`, with every step counted.

    Keras's wrapper (keras/src/optimizers/loss_scale_optimizer.py, 3.15) divides the
    gradients by the scale and applies them when all are finite, doubling the scale
    after `dynamic_growth_steps` such steps; when any is not, it skips the update
    (weights and momentum untouched) and halves the scale. Its `iterations` are the
    inner optimizer's, which a skipped step leaves as they were. Here a skipped step
    advances them too: they count the batches trained on, which the per-epoch
    schedule, the stateless augmentation seeds, the logged step numbers and
    `--resume` (epoch x steps) all take them for.
    """

    def _stateful_handle_non_finite_grads(self):
        super()._stateful_handle_non_finite_grads()
        self.inner_optimizer.iterations.assign_add(1)


def base_optimizer(optimizer: keras.optimizers.Optimizer) -> keras.optimizers.Optimizer:
    """The optimizer that updates the weights: `optimizer`, or the one a loss-scale
    wrapper holds (its momentum buffers, `fixed_lr` and so on live there)."""
    return getattr(optimizer, "inner_optimizer", optimizer)


def make_optimizer(model, config, steps_per_epoch: int) -> keras.optimizers.Optimizer:
    """The optimiser for a SimSiam model under `config` (lr scaled by the global batch):
    `TorchSGD`, wrapped in `LossScaleOptimizer` for `--precision float16`, whose
    gradients would otherwise underflow float16 (bfloat16 has float32's range and
    needs no scaling)."""
    schedule = EpochCosine(config.lr, steps_per_epoch, config.epochs)
    fixed = model.predictor.trainable_variables if config.fix_pred_lr else ()
    sgd = TorchSGD(
        learning_rate=schedule,
        momentum=config.momentum,
        weight_decay=config.weight_decay,
        fixed_lr_variables=fixed,
        fixed_lr=config.lr if config.fix_pred_lr else None,
    )
    return LossScaleOptimizer(sgd) if config.precision == "float16" else sgd
