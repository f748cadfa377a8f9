"""Step-level parity with PyTorch: our SimSiam training step against the official one.

The same SimSiam (CIFAR ResNet-18 + the cifar preset's heads) is built twice: ours with
`build_simsiam` and `make_optimizer`, trained by the model's own `train_step` through
`fit()`; and PyTorch's, from torchvision's ResNet-18 (3x3 stride-1 stem, no max-pool,
fc = Identity) and the heads of `simsiam_tf/model.py` (fc-BN-ReLU, fc-BN without affine
parameters; fc-BN-ReLU, fc with bias), trained as facebookresearch/simsiam's
`main_simsiam.py` trains: `torch.optim.SGD(momentum, weight_decay)` on every parameter,
the per-epoch cosine `adjust_learning_rate`, `lr = base_lr * batch / 256`,
`-(cos(p1, z2.detach()).mean() + cos(p2, z1.detach()).mean()) / 2`. PyTorch starts from
our initial weights (conv kernels HWIO -> OIHW, dense kernels transposed, BatchNorm gamma,
beta, running mean and variance; momentum and epsilon checked equal), and both take the
same steps on the same fixed batches of random uint8 views (the augmentation is not part
of this comparison), on the CPU: ours in the batch format every input delivers (uint8
[B, 2, S, S, 3], both views), which its `train_step` unpacks and normalises itself;
PyTorch the same views normalised here exactly as `simsiam_tf.model.normalize_uint8`
does, (x / 255 - mean) / std in float32 with ImageNet's mean and std. The views our
step actually normalised are recorded and must match PyTorch's inputs to float32
round-off (judged, INPUT_TOLERANCE).

Two references, at every step:

- PyTorch's own float32 run of the same steps. Compared: learning rate, loss, z and p,
  weights after the step, BatchNorm running statistics (judged); gradients, momentum
  buffers and w_t - w_0 (shown only: a ReLU input within round-off of 0 falls on either
  side of it in two float32 computations, and that one sample-channel can move a
  gradient tensor by percents and, through z, every gradient before it; at full size
  this happens in most steps).
- The exact step at our state: PyTorch in float64, from our weights, BatchNorm
  statistics and momentum buffers before the step, taking the ReLU decisions our forward
  took (which inputs counted as positive). All of the above is judged against it, every
  gradient and momentum buffer included; the report counts the ReLU inputs whose sign
  in float64 differs from ours (and how close to 0 they are).

Per group (backbone convs, backbone BN, projector, predictor, running mean, running
variance), max abs and max relative difference, the latter per tensor as
max|ours - theirs| / scale with scale = max|theirs| (entrywise ratios blow up near 0),
except: BN gamma and beta against max(1, their size) (they act on unit-scale normalised
activations, and betas start at 0), running means against the channel spread, the loss
absolutely (it lies in [-1, 1]).

Our gradients are the ones `train_step` hands to `optimizer.apply_gradients`; z, p and
the loss the tensors it passes to `losses.simsiam_loss`; the ReLU decisions the outputs
of its ReLU layers; its normalised views the outputs of `model.normalize_uint8`;
momentum buffers are read from the optimiser. All are recorded by wrapping those calls
for the run (the wrappers copy tensors into variables and call the originals
unchanged); nothing of the step is re-implemented here.

Two halves talk through an .npz file. This one runs in the project's Python: it trains
ours, writes the initial weights, the batches and our per-step results, then runs the
PyTorch half (this same file with `--torch-half`, which imports neither TensorFlow nor
simsiam_tf) under `--torch-python`. PyTorch is not a dependency of the project; install
it in a separate virtual environment (VENV: any folder outside the repository; on this
project's machines pip takes these from files already on disk, elsewhere it downloads
CUDA builds of several GB):

    python -m venv VENV && VENV/bin/pip install torch==2.14.1 torchvision==0.29.1

then

    export SIMSIAM_TORCH_PYTHON=VENV/bin/python
    python benchmarks/torch_parity.py                                                  # full size
    python benchmarks/torch_parity.py --width 8 --batch 16 --size 32 --torch-threads 1 # small

Full size is the paper's CIFAR network (width 64, 2048-d projector, 512-d predictor
bottleneck) at batch 128, 5 steps: about 15 minutes on 2 cores, most of it the float64
steps. `--torch-python` defaults to this interpreter if it can import torch, else to
$SIMSIAM_TORCH_PYTHON.

Prints a table per step, one JSON line with every number, and a final verdict line.
Exit status: 0 when every judged difference is within its tolerance (float32 round-off),
1 when one is not (the verdict line names it) or the PyTorch half fails, 2 for bad
arguments or no PyTorch.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import re
import subprocess
import sys
import tempfile
import time

import numpy as np

INSTALL = "python -m venv VENV && VENV/bin/pip install torch==2.14.1 torchvision==0.29.1"
# simsiam_tf.model.normalize_uint8's constants (ImageNet's), as float32 like its tensors.
IMAGENET_MEAN = np.array((0.485, 0.456, 0.406), np.float32)
IMAGENET_STD = np.array((0.229, 0.224, 0.225), np.float32)
# Largest difference allowed between the views our train_step normalised and PyTorch's
# inputs: a few units in the last place of float32 at |x| < 3. They are not bit-equal:
# in train_step's graph TensorFlow's constant folding turns the two divisions by
# constants into multiplications by their reciprocals (measured: at most 7.2e-7 over all
# 256 levels of each channel).
INPUT_TOLERANCE = 2e-6
PARAM_GROUPS = ("backbone conv", "backbone BN", "projector", "predictor")
STAT_GROUPS = ("running mean", "running var")
# Max relative difference allowed, by quantity (see the docstring for the scales).
# Measured round-off is one to two orders of magnitude below (docs/evaluation.md).
TOLERANCE = {
    "lr": 1e-6,
    "loss": 1e-4,
    "z": 1e-4,
    "p": 1e-4,
    "grad": 1e-3,
    "momentum": 1e-3,
    "weight": 1e-4,
    "update": None,
    "stat": 1e-4,
}


# ----------------------------------------------------------------------------------
# Choosing the PyTorch interpreter


class Usage(Exception):
    """A problem the user fixes: printed as one line, exit status 2."""


def resolve_torch_python(given: str | None) -> str:
    """The interpreter that runs the PyTorch half: --torch-python, this one if it has
    torch, else $SIMSIAM_TORCH_PYTHON. Raises Usage with the install command otherwise."""
    if given:
        candidate, source = given, "--torch-python"
    elif importlib.util.find_spec("torch") is not None:
        return sys.executable
    elif os.environ.get("SIMSIAM_TORCH_PYTHON"):
        candidate, source = os.environ["SIMSIAM_TORCH_PYTHON"], "SIMSIAM_TORCH_PYTHON"
    else:
        raise Usage(
            "no PyTorch: this Python cannot import torch and SIMSIAM_TORCH_PYTHON is not set; install it in "
            f"a separate venv ({INSTALL}) and pass --torch-python VENV/bin/python or set SIMSIAM_TORCH_PYTHON"
        )
    if not (os.path.isfile(candidate) and os.access(candidate, os.X_OK)):
        raise Usage(f"{source}={candidate!r} is not an executable Python interpreter")
    probe = subprocess.run(
        [candidate, "-c", "import torch, torchvision, numpy"], capture_output=True, text=True, timeout=300
    )
    if probe.returncode != 0:
        last = (probe.stderr.strip().splitlines() or ["?"])[-1]
        raise Usage(f"{source}={candidate} cannot import torch, torchvision and numpy ({last}); {INSTALL}")
    return candidate


# ----------------------------------------------------------------------------------
# Our half: TensorFlow, simsiam_tf


def keras_to_torch(model) -> list:
    """[(variable, torch state_dict name, layout)] for every weight of our model.

    Layout "conv": HWIO -> OIHW; "dense": [in, out] -> [out, in]; "same" otherwise.
    The layer names are the ones `simsiam_tf.model` gives; every weight must map to
    exactly one torch name, or this raises.
    """
    import keras

    block = re.compile(r"stage(\d)_block(\d+)_(1|2|down)_(conv|bn)")
    part = {
        ("1", "conv"): "conv1", ("1", "bn"): "bn1", ("2", "conv"): "conv2", ("2", "bn"): "bn2",
        ("down", "conv"): "downsample.0", ("down", "bn"): "downsample.1",
    }
    out = []

    def module_name(prefix, name):
        if prefix == "backbone":
            if name in ("stem_conv", "stem_bn"):
                return "backbone." + ("conv1" if name == "stem_conv" else "bn1")
            m = block.fullmatch(name)
            if m:
                stage, index, which, kind = m.groups()
                return f"backbone.layer{stage}.{int(index) - 1}.{part[(which, kind)]}"
        else:
            # nn.Sequential of [Linear, BatchNorm1d, ReLU] per hidden layer: fc{i} is
            # entry 3(i-1), bn{i} entry 3(i-1)+1 (the predictor's fc2 is entry 3).
            m = re.fullmatch(r"(fc|bn)(\d+)", name)
            if m:
                return f"{prefix}.{3 * (int(m.group(2)) - 1) + (m.group(1) == 'bn')}"
        raise ValueError(f"no PyTorch counterpart for {prefix} layer {name!r}")

    for prefix, sub in (("backbone", model.backbone), ("projector", model.projector), ("predictor", model.predictor)):
        for layer in sub.layers:
            if not layer.weights:
                continue
            base = module_name(prefix, layer.name)
            if isinstance(layer, keras.layers.Conv2D):
                out.append((layer.kernel, f"{base}.weight", "conv"))
            elif isinstance(layer, keras.layers.Dense):
                out.append((layer.kernel, f"{base}.weight", "dense"))
                if layer.use_bias:
                    out.append((layer.bias, f"{base}.bias", "same"))
            elif isinstance(layer, keras.layers.BatchNormalization):
                if layer.scale:
                    out.append((layer.gamma, f"{base}.weight", "same"))
                if layer.center:
                    out.append((layer.beta, f"{base}.bias", "same"))
                out.append((layer.moving_mean, f"{base}.running_mean", "same"))
                out.append((layer.moving_variance, f"{base}.running_var", "same"))
            else:
                raise ValueError(f"unexpected layer with weights: {layer.name} ({type(layer).__name__})")
    mapped = {id(v) for v, _, _ in out}
    every = [v for sub in (model.backbone, model.projector, model.predictor) for v in sub.weights]
    if len(mapped) != len(out) or mapped != {id(v) for v in every}:
        raise ValueError("the Keras -> PyTorch mapping does not cover every weight exactly once")
    return out


def relu_key(prefix: str, name: str) -> str:
    """The PyTorch ReLU call a Keras ReLU layer corresponds to: "module#call".

    torchvision's BasicBlock calls one ReLU module twice: after bn1 (call 0) and after
    the residual sum (call 1).
    """
    if prefix == "backbone":
        if name == "stem_relu":
            return "backbone.relu#0"
        m = re.fullmatch(r"stage(\d)_block(\d+)_(1_relu|out)", name)
        if m:
            return f"backbone.layer{m.group(1)}.{int(m.group(2)) - 1}.relu#{0 if m.group(3) == '1_relu' else 1}"
    else:
        m = re.fullmatch(r"relu(\d+)", name)
        if m:
            return f"{prefix}.{3 * (int(m.group(1)) - 1) + 2}#0"
    raise ValueError(f"no PyTorch counterpart for {prefix} ReLU {name!r}")


def pack_mask(mask: np.ndarray) -> np.ndarray:
    """A boolean mask (NHWC or [B, C]) as PyTorch lays it out (NCHW), bit-packed."""
    if mask.ndim == 4:
        mask = mask.transpose(0, 3, 1, 2)
    return np.packbits(mask.reshape(-1))


def to_torch_layout(value: np.ndarray, layout: str) -> np.ndarray:
    if layout == "conv":
        return np.ascontiguousarray(value.transpose(3, 2, 0, 1))
    if layout == "dense":
        return np.ascontiguousarray(value.T)
    return value


def normalize(views: np.ndarray) -> np.ndarray:
    """uint8 views -> float32, as `simsiam_tf.model.normalize_uint8` computes them."""
    return (views.astype(np.float32) / np.float32(255.0) - IMAGENET_MEAN) / IMAGENET_STD


def run_ours(args, batches: np.ndarray, inputs: tuple[np.ndarray, np.ndarray]) -> tuple[dict, dict]:
    """Our model trained `args.steps` steps by its own train_step on the fixed batches.

    Returns (arrays for the .npz, facts about our side). `batches` are uint8 [steps, B,
    2, S, S, 3] (the batch format); `inputs` the float32 views PyTorch gets, [steps, B, S, S,
    3] each, which the views our train_step normalises are compared with.
    """
    import keras
    import tensorflow as tf

    from simsiam_tf import losses
    from simsiam_tf import model as model_lib
    from simsiam_tf.config import make_config
    from simsiam_tf.model import build_simsiam
    from simsiam_tf.optim import make_optimizer

    config = make_config(
        "cifar", precision="float32", batch_size=args.batch, image_size=args.size, width=args.width,
        proj_dim=args.dim, pred_dim=args.pred_dim, epochs=args.epochs, seed=args.seed,
        **({"base_lr": args.base_lr} if args.base_lr is not None else {}),
        **({"weight_decay": args.weight_decay} if args.weight_decay is not None else {}),
    )
    keras.utils.set_random_seed(config.seed)
    model = build_simsiam(config)
    model.compile(optimizer=make_optimizer(model, config, args.steps_per_epoch), jit_compile=False)
    mapping = keras_to_torch(model)
    names = {id(v): name for v, name, _ in mapping}
    layouts = {id(v): layout for v, _, layout in mapping}
    arrays = {f"init/{name}": to_torch_layout(v.numpy(), layout) for v, name, layout in mapping}

    # Recorders: train_step's own tensors, copied into variables as the step runs.
    trainable = model.trainable_variables
    grad_slots = {id(v): tf.Variable(tf.zeros(v.shape, v.dtype), trainable=False) for v in trainable}
    dim = config.proj_dim
    out_slots = {k: tf.Variable(tf.zeros([args.batch, dim]), trainable=False) for k in ("p1", "p2", "z1", "z2")}
    loss_slot = tf.Variable(0.0, trainable=False)
    view_slots = [tf.Variable(tf.zeros([args.batch, args.size, args.size, 3]), trainable=False) for _ in range(2)]
    calls = {"apply_gradients": 0, "normalize_uint8": 0}
    optimizer = model.optimizer
    original_apply = optimizer.apply_gradients
    original_loss = losses.simsiam_loss
    original_normalize = model_lib.normalize_uint8

    def recorded_apply(grads_and_vars):
        pairs = list(grads_and_vars)
        if [id(v) for _, v in pairs] != [id(v) for v in trainable]:
            raise RuntimeError("train_step applied gradients to other variables than model.trainable_variables")
        calls["apply_gradients"] += 1  # counts traces, not steps
        for g, v in pairs:
            grad_slots[id(v)].assign(g)
        return original_apply(pairs)

    def recorded_normalize(images):
        # train_step normalises view 1, then view 2: each trace writes them in that order.
        out = original_normalize(images)
        view_slots[calls["normalize_uint8"] % 2].assign(out)
        calls["normalize_uint8"] += 1  # counts traces, not steps
        return out

    def recorded_loss(p1, p2, z1, z2, stop_gradient=True):
        loss = original_loss(p1, p2, z1, z2, stop_gradient=stop_gradient)
        for key, t in zip(("p1", "p2", "z1", "z2"), (p1, p2, z1, z2)):
            out_slots[key].assign(tf.cast(t, tf.float32))
        loss_slot.assign(loss)
        return loss

    # Which side of 0 every ReLU input fell on in train_step's forward, per view: each
    # ReLU layer runs twice per step (view 1, then view 2), and its wrapped call writes
    # `output > 0` into that view's slot. (The torch half recomputes the step exactly
    # with these decisions, so ReLU kinks do not blur the comparison.)
    relus = [(prefix, layer) for prefix, sub in (("backbone", model.backbone), ("projector", model.projector),
                                                 ("predictor", model.predictor))
             for layer in sub.layers if isinstance(layer, keras.layers.ReLU)]
    relu_slots = {}
    for prefix, layer in relus:
        shape = [args.batch, *layer.output.shape[1:]]
        key = relu_key(prefix, layer.name)
        relu_slots[key] = [tf.Variable(tf.zeros(shape, tf.bool), trainable=False) for _ in range(2)]

        def recorded_call(inputs, *a, _call=layer.call, _slots=relu_slots[key], _count=[0], **k):
            outputs = _call(inputs, *a, **k)
            _slots[_count[0] % 2].assign(outputs > 0)
            _count[0] += 1
            return outputs

        layer.call = recorded_call

    steps_seen = []
    input_diff = []  # per step: max |the views train_step normalised - PyTorch's inputs|

    class Record(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            s = len(steps_seen)
            steps_seen.append(int(optimizer.iterations.numpy()))
            arrays[f"ours/{s}/lr"] = np.float64(np.asarray(logs["lr"]))
            arrays[f"ours/{s}/loss"] = np.float64(loss_slot.numpy())
            input_diff.append(max(max_abs(slot.numpy() - given[s]) for slot, given in zip(view_slots, inputs)))
            for key, slot in out_slots.items():
                arrays[f"ours/{s}/{key}"] = slot.numpy()
            for v, name, layout in mapping:
                arrays[f"ours/{s}/state/{name}"] = to_torch_layout(v.numpy(), layout)
            for v in trainable:
                arrays[f"ours/{s}/grad/{names[id(v)]}"] = to_torch_layout(grad_slots[id(v)].numpy(), layouts[id(v)])
                buf = optimizer.momentums[optimizer._get_variable_index(v)]  # as TorchSGD.update_step finds it
                arrays[f"ours/{s}/momentum/{names[id(v)]}"] = to_torch_layout(buf.numpy(), layouts[id(v)])
            for key, slots in relu_slots.items():
                for view, slot in enumerate(slots, 1):
                    arrays[f"ours/{s}/relu/{view}/{key}"] = pack_mask(slot.numpy())

    dataset = tf.data.Dataset.from_tensor_slices(batches)  # one element = one step's uint8 [B, 2, S, S, 3]
    optimizer.apply_gradients = recorded_apply
    losses.simsiam_loss = recorded_loss
    model_lib.normalize_uint8 = recorded_normalize
    started = time.perf_counter()
    try:
        model.fit(dataset, epochs=1, verbose=0, shuffle=False, callbacks=[Record()])
    finally:
        losses.simsiam_loss = original_loss
        model_lib.normalize_uint8 = original_normalize
        del optimizer.apply_gradients
        for _, layer in relus:
            del layer.call
    seconds = time.perf_counter() - started
    if steps_seen != list(range(1, args.steps + 1)):
        raise RuntimeError(f"expected {args.steps} steps, fit() ran optimizer iterations {steps_seen}")
    if not calls["apply_gradients"]:
        raise RuntimeError("train_step never called optimizer.apply_gradients: its gradients were not recorded")
    if not calls["normalize_uint8"] or calls["normalize_uint8"] % 2:
        raise RuntimeError(f"train_step called model.normalize_uint8 {calls['normalize_uint8']} times in its traces "
                           "(expected once per view): its normalised views were not recorded")
    bns = [l for sub in (model.backbone, model.projector, model.predictor) for l in sub.layers
           if isinstance(l, keras.layers.BatchNormalization)]
    ours = {
        "init_lr": config.lr,
        "base_lr": config.base_lr,
        "weight_decay": config.weight_decay,
        "momentum": config.momentum,
        "fix_pred_lr": config.fix_pred_lr,
        "epochs": config.epochs,
        "trainable_variables": len(trainable),
        "weights": len(mapping),
        "parameters": int(sum(np.prod(v.shape) for v in trainable)),
        "relu_inputs_per_view": int(sum(np.prod(slots[0].shape) for slots in relu_slots.values())),
        "relu_calls": len(relu_slots),
        # The views train_step normalised against PyTorch's inputs, worst over the steps.
        "input_max_abs_diff": max(input_diff),
        # Keras momentum m keeps m of the old statistic; PyTorch's momentum is 1 - m.
        "bn": {names[id(l.moving_mean)].rsplit(".", 1)[0]: [1.0 - float(l.momentum), float(l.epsilon)] for l in bns},
        "fit_seconds": seconds,
    }
    return arrays, ours


# ----------------------------------------------------------------------------------
# The PyTorch half (no TensorFlow, no simsiam_tf)


def torch_simsiam(width: int, dim: int, pred_dim: int, proj_layers: int):
    """torchvision ResNet-18, CIFAR stem, fc = Identity; heads as simsiam_tf/model.py."""
    import torch.nn as nn
    import torchvision
    from torchvision.models.resnet import BasicBlock, ResNet

    if width == 64:
        backbone = torchvision.models.resnet18()
    else:
        class NarrowResNet18(ResNet):
            """torchvision's ResNet-18 with stage widths w, 2w, 4w, 8w instead of 64...512."""

            def _make_layer(self, block, planes, blocks, stride=1, dilate=False):
                if planes == 64:
                    self.inplanes = width
                return super()._make_layer(block, planes // 64 * width, blocks, stride, dilate)

        backbone = NarrowResNet18(BasicBlock, [2, 2, 2, 2])
    backbone.conv1 = nn.Conv2d(3, width, kernel_size=3, stride=1, padding=1, bias=False)
    backbone.bn1 = nn.BatchNorm2d(width)
    backbone.maxpool = nn.Identity()
    backbone.fc = nn.Identity()

    layers, fan_in = [], 8 * width
    for _ in range(proj_layers - 1):
        layers += [nn.Linear(fan_in, dim, bias=False), nn.BatchNorm1d(dim), nn.ReLU(inplace=True)]
        fan_in = dim
    layers += [nn.Linear(fan_in, dim, bias=False), nn.BatchNorm1d(dim, affine=False)]
    model = nn.Module()
    model.backbone = backbone
    model.projector = nn.Sequential(*layers)
    model.predictor = nn.Sequential(
        nn.Linear(dim, pred_dim, bias=False), nn.BatchNorm1d(pred_dim), nn.ReLU(inplace=True), nn.Linear(pred_dim, dim)
    )
    return model


def group_of(name: str, ndim: int) -> str:
    if name.endswith(".running_mean"):
        return "running mean"
    if name.endswith(".running_var"):
        return "running var"
    if name.startswith("backbone."):
        return "backbone conv" if ndim == 4 else "backbone BN"
    return name.split(".", 1)[0]  # projector, predictor


def max_abs(x) -> float:
    return float(np.max(np.abs(np.asarray(x, np.float64)))) if np.size(x) else 0.0


def relative(a, b, scale=None) -> tuple[float, float]:
    """(max |a - b|, that over `scale`, by default max |b|); 0/0 counts as 0."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    d = max_abs(a - b)
    scale = max_abs(b) if scale is None else scale
    return d, (d / scale if scale > 0 else (0.0 if d == 0 else math.inf))


class Rows:
    """Per (quantity, group): tensors compared, and for each reference ("run": PyTorch's
    float32 run; "exact": the float64 step from our state) the max abs and max rel
    difference of ours and the tensor where the rel one is largest."""

    def __init__(self):
        self.rows = {}

    def add(self, ref, what, group, name, ours, theirs, scale=None):
        abs_diff, rel_diff = relative(ours, theirs, scale)
        row = self.rows.setdefault((what, group), {"what": what, "group": group, "tensors": {}})
        row["tensors"][ref] = row["tensors"].get(ref, 0) + 1
        a, r, w = f"{ref}_abs", f"{ref}_rel", f"{ref}_worst"
        row[a] = max(row.get(a, 0.0), abs_diff)
        if rel_diff >= row.get(r, 0.0):
            row[r], row[w] = rel_diff, name

    def list(self):
        return [dict(r, tensors=max(r["tensors"].values())) for r in self.rows.values()]


def compare_step(rows: Rows, ref: str, ours: dict, theirs: dict, init: dict, bn_names: set) -> None:
    """Add one step's differences between our results and a PyTorch step's to `rows`."""
    rows.add(ref, "lr", "", "lr", ours["lr"], theirs["lr"])
    rows.add(ref, "loss", "", "loss", ours["loss"], theirs["loss"], scale=1.0)  # L lies in [-1, 1]
    for key in ("z1", "z2", "p1", "p2"):
        rows.add(ref, key[0], "", key, ours[key], theirs[key])
    for n, g in theirs["grad"].items():
        group = group_of(n, g.ndim)
        rows.add(ref, "grad", group, n, ours["grad"][n], g)
        rows.add(ref, "momentum", group, n, ours["momentum"][n], theirs["momentum"][n])
    state = theirs["state"]
    for n, value in state.items():
        group = group_of(n, value.ndim)
        if group == "running mean":
            # A BN whose input has batch mean ~0 (the predictor's, after the projector's
            # output BN) holds only round-off here; a running mean matters in units of
            # the channel's spread, as normalisation uses it.
            scale = max(math.sqrt(max_abs(state[n[: -len("mean")] + "var"])), max_abs(value))
            rows.add(ref, "stat", group, n, ours["state"][n], value, scale)
        elif group == "running var":
            rows.add(ref, "stat", group, n, ours["state"][n], value)
        else:
            # BN gamma and beta act on normalised activations of unit scale: measured
            # against max(1, their size) (betas and zero-initialised gammas start at 0).
            is_bn = n.rsplit(".", 1)[0] in bn_names
            rows.add(ref, "weight", group, n, ours["state"][n], value, max(1.0, max_abs(value)) if is_bn else None)
            if ref == "run":
                # Against how far the tensor moved: shown, not judged. Each step rounds
                # the stored weight to float32, so this cannot fall below about one unit
                # in the last place of the weight over the update (a weight of 0.04 is
                # stored to 3.7e-9, and one small step moves it by about 1e-5).
                rows.add(ref, "update", group, n, ours["state"][n], value, max_abs(value - init[n]))


class ReluDecisions:
    """Makes every ReLU of a PyTorch SimSiam apply given decisions (which inputs count
    as positive) instead of the signs of its own inputs, and counts where they differ."""

    def __init__(self, model):
        import torch.nn as nn

        self.masks, self.calls, self.differ, self.worst, self.inputs = {}, {}, 0, 0.0, 0
        outer = self

        class DecidedReLU(nn.Module):
            def __init__(self, name):
                super().__init__()
                self.name = name

            def forward(self, x):
                key = f"{self.name}#{outer.calls.get(self.name, 0)}"
                outer.calls[self.name] = outer.calls.get(self.name, 0) + 1
                mask = outer.masks[key][: x.numel()].reshape(x.shape)  # unpacked bits are padded to bytes
                other = mask != (x > 0)
                outer.inputs += x.numel()
                if bool(other.any()):
                    outer.differ += int(other.sum())
                    spread = float(x.detach().std()) or 1.0
                    outer.worst = max(outer.worst, float(x.detach()[other].abs().max()) / spread)
                return x * mask

        for name, module in list(model.named_modules()):
            for child_name, child in list(module.named_children()):
                if isinstance(child, nn.ReLU):
                    setattr(module, child_name, DecidedReLU(f"{name}.{child_name}" if name else child_name))

    def use(self, masks: dict) -> None:
        """The decisions of one view's forward: {"module#call": bool tensor}."""
        self.masks, self.calls = masks, {}


def official_step(model, optimizer, criterion, x1, x2, lr, init_lr, view=None) -> dict:
    """One step of facebookresearch/simsiam's main_simsiam.py train loop; its results.

    `view(i)`, when given, is called before each part of the forward that sees view i.
    """
    view = view or (lambda i: None)
    for group in optimizer.param_groups:  # adjust_learning_rate (the predictor keeps init_lr with fix_lr)
        group["lr"] = init_lr if group.get("fix_lr") else lr
    view(1)
    z1 = model.projector(model.backbone(x1))
    view(2)
    z2 = model.projector(model.backbone(x2))
    view(1)
    p1 = model.predictor(z1)
    view(2)
    p2 = model.predictor(z2)
    loss = -(criterion(p1, z2.detach()).mean() + criterion(p2, z1.detach()).mean()) * 0.5
    optimizer.zero_grad()
    loss.backward()
    params = dict(model.named_parameters())
    grads = {n: p.grad.detach().numpy().copy() for n, p in params.items()}
    optimizer.step()
    return {
        "loss": loss.item(), "lr": lr,
        **{k: t.detach().numpy().copy() for k, t in (("z1", z1), ("z2", z2), ("p1", p1), ("p2", p2))},
        "grad": grads,
        "momentum": {n: optimizer.state[p]["momentum_buffer"].numpy().copy() for n, p in params.items()},
        "state": {k: v.detach().numpy().copy() for k, v in model.state_dict().items()
                  if not k.endswith("num_batches_tracked")},
    }


def torch_half(npz_path: str, json_path: str, threads: int) -> None:
    """PyTorch's side: a float32 run from our initial weights on the same batches, and
    at every step the exact (float64) step from our state with our ReLU decisions."""
    import copy

    import torch

    torch.set_num_threads(threads)
    data = np.load(npz_path)
    meta = json.loads(str(data["meta"]))
    model = torch_simsiam(meta["width"], meta["dim"], meta["pred_dim"], meta["proj_layers"])
    init = {k[len("init/"):]: data[k] for k in data.files if k.startswith("init/")}
    missing, unexpected = model.load_state_dict({k: torch.from_numpy(v) for k, v in init.items()}, strict=False)
    missing = [k for k in missing if not k.endswith("num_batches_tracked")]
    if missing or unexpected:
        raise RuntimeError(
            f"state mismatch: torch names without our weights {missing}, ours without torch {unexpected}")
    model.train()
    exact = copy.deepcopy(model).double()
    decisions = ReluDecisions(exact)

    bn_modules = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)}
    bn_mismatch = [
        f"{n}: ours momentum {meta['bn'][n][0]:.6g} eps {meta['bn'][n][1]:.3g}, torch {m.momentum:.6g} {m.eps:.3g}"
        for n, m in bn_modules.items()
        if n not in meta["bn"] or not (math.isclose(meta["bn"][n][0], m.momentum, rel_tol=1e-6)
                                        and math.isclose(meta["bn"][n][1], m.eps, rel_tol=1e-6))
    ]
    if set(meta["bn"]) != set(bn_modules):
        bn_mismatch.append(f"BatchNorm layers differ: ours {len(meta['bn'])}, torch {len(bn_modules)}")

    # main_simsiam.py: SGD on every parameter (the predictor in its own group with
    # --fix-pred-lr), lr = base_lr * batch / 256, set per epoch by adjust_learning_rate.
    init_lr = meta["base_lr"] * meta["batch"] / 256

    def sgd(m):
        if meta["fix_pred_lr"]:
            groups = [{"params": list(m.backbone.parameters()) + list(m.projector.parameters()), "fix_lr": False},
                      {"params": m.predictor.parameters(), "fix_lr": True}]
        else:
            groups = m.parameters()
        return torch.optim.SGD(groups, init_lr, momentum=meta["momentum"], weight_decay=meta["weight_decay"])

    optimizer = sgd(model)
    criterion = torch.nn.CosineSimilarity(dim=1)
    names = [n for n, _ in model.named_parameters()]
    state_names = [k for k in model.state_dict() if not k.endswith("num_batches_tracked")]
    relu_keys = sorted(k[len("ours/0/relu/1/"):] for k in data.files if k.startswith("ours/0/relu/1/"))

    def ours_at(s):
        return {
            "lr": float(data[f"ours/{s}/lr"]), "loss": float(data[f"ours/{s}/loss"]),
            **{k: data[f"ours/{s}/{k}"] for k in ("z1", "z2", "p1", "p2")},
            "grad": {n: data[f"ours/{s}/grad/{n}"] for n in names},
            "momentum": {n: data[f"ours/{s}/momentum/{n}"] for n in names},
            "state": {n: data[f"ours/{s}/state/{n}"] for n in state_names},
        }

    steps, seconds = [], {"float32 run": 0.0, "float64 at our state": 0.0}
    previous = {"ours": init, "torch": init}
    before = None  # our state before the step
    for s in range(meta["steps"]):
        epoch = s // meta["steps_per_epoch"]
        lr = init_lr * 0.5 * (1.0 + math.cos(math.pi * epoch / meta["epochs"]))  # adjust_learning_rate
        x1, x2 = torch.from_numpy(data["x1"][s]), torch.from_numpy(data["x2"][s])
        started = time.perf_counter()
        run = official_step(model, optimizer, criterion, x1, x2, lr, init_lr)
        seconds["float32 run"] += time.perf_counter() - started

        # The exact step from our state (weights, BatchNorm statistics, momentum
        # buffers), with the ReLU decisions our forward took: what our step computes,
        # in float64, with nothing left to round-off but our own float32.
        started = time.perf_counter()
        exact.load_state_dict({k: torch.from_numpy(v).double() for k, v in (before or init).items()}, strict=False)
        exact_optimizer = sgd(exact)
        if before is not None:
            for n, p in exact.named_parameters():
                buf = data[f"ours/{s - 1}/momentum/{n}"]
                exact_optimizer.state[p]["momentum_buffer"] = torch.from_numpy(buf).double()
        masks = {view: {k: torch.from_numpy(np.unpackbits(data[f"ours/{s}/relu/{view}/{k}"]).astype(bool))
                        for k in relu_keys} for view in (1, 2)}
        decisions.differ, decisions.worst, decisions.inputs = 0, 0.0, 0
        exact_step = official_step(exact, exact_optimizer, criterion, x1.double(), x2.double(), lr, init_lr,
                                   view=lambda i: decisions.use(masks[i]))
        seconds["float64 at our state"] += time.perf_counter() - started

        ours = ours_at(s)
        rows = Rows()
        compare_step(rows, "run", ours, run, init, set(bn_modules))
        compare_step(rows, "exact", ours, exact_step, init, set(bn_modules))
        # The smallest change of any tensor in this step, per side and group: > 0 means
        # every tensor of the group moved.
        moved = {}
        for side, now in (("ours", ours["state"]), ("torch", run["state"])):
            for n, value in now.items():
                key = f"{side} {group_of(n, value.ndim)}"
                moved[key] = min(moved.get(key, math.inf), max_abs(value.astype(np.float64) - previous[side][n]))
            previous[side] = now
        before = ours["state"]
        steps.append({
            "step": s + 1, "epoch": epoch,
            "lr": {"ours": ours["lr"], "torch": lr},
            "loss": {"ours": ours["loss"], "torch": run["loss"], "exact": exact_step["loss"]},
            "relu": {"inputs": decisions.inputs, "other_side": decisions.differ, "max_abs_over_std": decisions.worst},
            "rows": rows.list(),
            "min_tensor_change": moved,
        })
    result = {
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "torch_seconds": seconds,
        "torch_parameters": len(names),
        "torch_parameter_count": int(sum(p.numel() for p in model.parameters())),
        "torch_state_tensors": len(state_names),
        "parameters_matched": sum(1 for n in names if f"ours/0/grad/{n}" in data.files),
        "relu_calls_matched": len(relu_keys),
        "bn_layers": len(bn_modules),
        "bn_mismatch": bn_mismatch,
        "steps": steps,
    }
    with open(json_path, "w") as f:
        json.dump(result, f)


# ----------------------------------------------------------------------------------
# Report


def _e(x: float) -> str:
    return f"{x:.1e}" if math.isfinite(x) else str(x)


# What each comparison judges. Against PyTorch's own float32 run, gradients (and the
# momentum buffers that sum them) are shown, not judged: a ReLU input within round-off
# of 0 lands on either side in two float32 computations, and that one sample-channel can
# move a gradient by percents and, through z, every gradient before it. Against the
# exact step from our state with our ReLU decisions, everything is judged.
JUDGED = {
    "run": ("lr", "loss", "z", "p", "weight", "stat"),
    "exact": ("lr", "loss", "z", "p", "grad", "momentum", "weight", "stat"),
}
REFERENCES = {"run": "PyTorch float32 run", "exact": "exact step at our state"}
ORDER = ["lr", "loss", "z", "p", "grad", "momentum", "weight", "update", "stat"]
LABEL = {"lr": "lr", "loss": "loss", "z": "z (z1, z2)", "p": "p (p1, p2)", "grad": "gradient",
         "momentum": "momentum buffer", "weight": "weight after step", "update": "w_t - w_0 (info)",
         "stat": "running stat"}


def judge(result: dict, ours: dict) -> list[str]:
    """Every failure, one phrase each; empty when the steps agree."""
    failures = [f"BatchNorm hyperparameters differ: {m}" for m in result["bn_mismatch"]]
    if not (result["parameters_matched"] == result["torch_parameters"] == ours["trainable_variables"]):
        failures.append(
            f"parameters matched {result['parameters_matched']}, torch parameters {result['torch_parameters']}, "
            f"our trainable variables {ours['trainable_variables']}"
        )
    if not ours["input_max_abs_diff"] <= INPUT_TOLERANCE:
        failures.append(f"the views our train_step normalised differ from PyTorch's inputs by up to "
                        f"{_e(ours['input_max_abs_diff'])} (> {INPUT_TOLERANCE:g})")
    if result["relu_calls_matched"] != ours["relu_calls"]:
        failures.append(f"ReLU calls matched {result['relu_calls_matched']} of our {ours['relu_calls']}")
    for step in result["steps"]:
        relu = step["relu"]
        # Round-off flips a handful of the millions of ReLU inputs; many more means our
        # decisions were matched to the wrong layer or view.
        if relu["inputs"] != 2 * ours["relu_inputs_per_view"] or relu["other_side"] > 1e-4 * relu["inputs"]:
            failures.append(f"step {step['step']}: {relu['other_side']} of {relu['inputs']} ReLU inputs took the "
                            f"other side of 0 in float64 (of {2 * ours['relu_inputs_per_view']} of ours)")
        for ref, judged in JUDGED.items():
            for row in step["rows"]:
                tol = TOLERANCE[row["what"]]
                if row["what"] in judged and f"{ref}_rel" in row and not row[f"{ref}_rel"] <= tol:
                    failures.append(
                        f"step {step['step']} {row['what']} {row['group'] or row[f'{ref}_worst']} against the "
                        f"{REFERENCES[ref]}: max rel {_e(row[f'{ref}_rel'])} > {tol:g} "
                        f"(max abs {_e(row[f'{ref}_abs'])}, worst {row[f'{ref}_worst']})"
                    )
    return failures


def print_report(result: dict) -> None:
    groups = PARAM_GROUPS + STAT_GROUPS + ("",)
    for step in result["steps"]:
        relu = step["relu"]
        print(f"step {step['step']} (epoch {step['epoch']}): lr ours {step['lr']['ours']:.9g} torch "
              f"{step['lr']['torch']:.9g}; loss ours {step['loss']['ours']:.9f}, PyTorch float32 run "
              f"{step['loss']['torch']:.9f}, exact at our state {step['loss']['exact']:.9f}; ReLU inputs on the "
              f"other side of 0 in float64: {relu['other_side']} of {relu['inputs']:,}"
              + (f", all within {relu['max_abs_over_std']:.1e} std of 0" if relu["other_side"] else ""))
        print(f"  {'':<18} {'':<14} {'':>7}  {'vs PyTorch float32 run':^19}  {'vs exact':^9}")
        print(f"  {'quantity':<18} {'group':<14} {'tensors':>7}  {'max abs':>9} {'max rel':>9}  {'max rel':>9} "
              f"{'tol':>7}  worst tensor (run)")
        for r in sorted(step["rows"], key=lambda r: (ORDER.index(r["what"]), groups.index(r["group"]))):
            if r["what"] in ("lr", "loss"):
                continue
            tol = TOLERANCE[r["what"]]
            exceeds = [ref for ref, judged in JUDGED.items()
                       if r["what"] in judged and f"{ref}_rel" in r and not r[f"{ref}_rel"] <= tol]
            run_rel = _e(r["run_rel"]) + ("" if r["what"] in JUDGED["run"] else "*")
            print(f"  {LABEL[r['what']]:<18} {r['group']:<14} {r['tensors']:>7}  {_e(r['run_abs']):>9} {run_rel:>9}  "
                  f"{_e(r['exact_rel']) if 'exact_rel' in r else '-':>9} {'-' if tol is None else f'{tol:g}':>7}  "
                  f"{r['run_worst']}" + (f"  <-- exceeds ({', '.join(exceeds)})" if exceeds else ""))
    print("  (* not judged: ReLU inputs within round-off of 0 fall on either side in two float32 runs; the same "
          "quantity at our state, with our ReLU decisions, is)")


def summary(result: dict) -> list[dict]:
    """Per quantity and group: the worst max rel over all steps against each reference."""
    worst = {}
    for step in result["steps"]:
        for r in step["rows"]:
            w = worst.setdefault((r["what"], r["group"]), {"what": r["what"], "group": r["group"],
                                                           "tolerance": TOLERANCE[r["what"]]})
            for ref in JUDGED:
                if f"{ref}_rel" in r and r[f"{ref}_rel"] >= w.get(f"{ref}_rel", -1.0):
                    w[f"{ref}_rel"], w[f"{ref}_abs"] = r[f"{ref}_rel"], r[f"{ref}_abs"]
                    w[f"{ref}_step"], w[f"{ref}_worst"] = step["step"], r[f"{ref}_worst"]
    return list(worst.values())


# ----------------------------------------------------------------------------------


def parse_args(argv):
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from common import Parser  # noqa: E402  (no TensorFlow: the torch half imports it too)

    p = Parser(description=__doc__)

    def positive(text):
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
        if value < 1:
            raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
        return value

    p.add_argument("--width", type=positive, default=64, help="backbone first-stage width (64 = ResNet-18)")
    p.add_argument("--dim", type=positive, default=2048, help="projector width (cifar preset: 2048)")
    p.add_argument("--pred-dim", type=positive, default=512, help="predictor bottleneck (cifar preset: 512)")
    p.add_argument("--batch", type=positive, default=128, help="batch size (lr = base lr x batch / 256)")
    p.add_argument("--size", type=positive, default=32, help="image size in pixels (16-1024)")
    p.add_argument("--steps", type=positive, default=5, help="training steps compared")
    p.add_argument("--steps-per-epoch", type=positive, default=2,
                   help="steps per epoch of the schedule (2: the cosine lr changes within the 5 steps)")
    p.add_argument("--epochs", type=positive, default=4, help="epochs of the cosine schedule")
    p.add_argument("--base-lr", type=float, default=None, help="base lr (default: the cifar preset's, 0.03)")
    p.add_argument("--weight-decay", type=float, default=None, help="default: the cifar preset's, 5e-4")
    p.add_argument("--seed", type=int, default=0, help="initial weights and batches")
    p.add_argument("--torch-python", default=None,
                   help="Python with torch and torchvision (default: this one if it has torch, "
                        "else $SIMSIAM_TORCH_PYTHON)")
    p.add_argument("--torch-threads", type=positive, default=os.cpu_count() or 1,
                   help="PyTorch's threads (default: all cores; 1 is far faster for small sizes on a busy machine)")
    p.add_argument("--keep", default=None, metavar="DIR", help="keep the exchanged .npz and .json in DIR")
    p.add_argument("--torch-half", nargs=2, metavar=("NPZ", "JSON"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.torch_half:
        return args
    if not 16 <= args.size <= 1024:
        p.error(f"--size must be in [16, 1024], got {args.size}")
    if args.batch < 2:
        p.error(f"--batch must be at least 2 (BatchNorm needs a batch), got {args.batch}")
    if args.base_lr is not None and not 0 < args.base_lr < 100:
        p.error(f"--base-lr must be in (0, 100), got {args.base_lr}")
    if args.weight_decay is not None and args.weight_decay < 0:
        p.error(f"--weight-decay must be >= 0, got {args.weight_decay}")
    if args.seed < 0:
        p.error(f"--seed must be >= 0, got {args.seed}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.torch_half:
        torch_half(*args.torch_half, args.torch_threads)
        return 0
    try:
        torch_python = resolve_torch_python(args.torch_python)
    except Usage as e:
        print(f"torch_parity: {e}", file=sys.stderr)
        return 2

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from common import machine  # noqa: E402  (adds the repository to sys.path; quiets TF's C++ logs)

    # Random uint8 views in the batch format ([:, :, 0] the first view, [:, :, 1] the second);
    # PyTorch gets them normalised as our train_step normalises them.
    rng = np.random.default_rng(args.seed)
    batches = rng.integers(0, 256, (args.steps, args.batch, 2, args.size, args.size, 3), dtype=np.uint8)
    views1, views2 = normalize(batches[:, :, 0]), normalize(batches[:, :, 1])
    arrays, ours = run_ours(args, batches, (views1, views2))
    meta = {
        "width": args.width, "dim": args.dim, "pred_dim": args.pred_dim, "proj_layers": 2, "batch": args.batch,
        "steps": args.steps, "steps_per_epoch": args.steps_per_epoch, "epochs": ours["epochs"],
        "base_lr": ours["base_lr"], "weight_decay": ours["weight_decay"], "momentum": ours["momentum"],
        "fix_pred_lr": ours["fix_pred_lr"], "bn": ours["bn"],
    }
    arrays["meta"] = np.array(json.dumps(meta))
    arrays["x1"] = np.ascontiguousarray(views1.transpose(0, 1, 4, 2, 3))  # NHWC -> NCHW
    arrays["x2"] = np.ascontiguousarray(views2.transpose(0, 1, 4, 2, 3))

    workdir = args.keep or tempfile.mkdtemp(prefix="torch-parity-")
    os.makedirs(workdir, exist_ok=True)
    npz_path, json_path = os.path.join(workdir, "exchange.npz"), os.path.join(workdir, "torch.json")
    try:
        np.savez(npz_path, **arrays)
        del arrays
        command = [torch_python, os.path.abspath(__file__), "--torch-half", npz_path, json_path,
                   "--torch-threads", str(args.torch_threads)]
        env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # the torch half needs nothing of ours
        done = subprocess.run(command, capture_output=True, text=True, env=env)
        if done.returncode != 0:
            last = (done.stderr.strip().splitlines() or ["no output"])[-1]
            print(f"torch_parity: the PyTorch half failed under {torch_python}: {last}", file=sys.stderr)
            return 1
        with open(json_path) as f:
            result = json.load(f)
    finally:
        if not args.keep:
            for path in (npz_path, json_path):
                if os.path.exists(path):
                    os.unlink(path)
            os.rmdir(workdir)

    seconds = result["torch_seconds"]
    print(f"ours: simsiam_tf's train_step via fit(), {ours['trainable_variables']} trainable variables "
          f"({ours['parameters']:,} parameters), {args.steps} steps in {ours['fit_seconds']:.1f} s; PyTorch "
          f"{result['torch']}: {result['torch_parameters']} parameters ({result['torch_parameter_count']:,}), "
          f"{result['torch_state_tensors']} state tensors, {result['relu_calls_matched']} ReLU calls; float32 run "
          f"{seconds['float32 run']:.1f} s, float64 steps {seconds['float64 at our state']:.1f} s; inputs: the "
          f"same uint8 views, normalised by our train_step and for PyTorch {ours['input_max_abs_diff']:.1e} apart")
    print_report(result)
    failures = judge(result, ours)
    worst = summary(result)
    size = f"width {args.width}, heads {args.dim}/{args.pred_dim}, batch {args.batch}, {args.size} px"
    print(json.dumps({
        "benchmark": "torch_parity", "machine": machine(), "size": size, "args": {
            k: v for k, v in vars(args).items() if k not in ("torch_half", "keep")},
        "ours": {k: v for k, v in ours.items() if k != "bn"},
        "torch": {k: v for k, v in result.items() if k != "steps"},
        "tolerance": TOLERANCE, "judged": JUDGED, "worst": worst, "steps": result["steps"], "failures": failures,
    }))
    if failures:
        more = f" (and {len(failures) - 1} more)" if len(failures) > 1 else ""
        print(f"FAIL: {size}: {failures[0]}{more}")
        return 1

    def most(ref, *quantities):
        return _e(max(w[f"{ref}_rel"] for w in worst if w["what"] in quantities))

    print(f"PASS: {size}: {args.steps} steps agree with PyTorch within float32 round-off (max rel: z and p "
          f"{most('run', 'z', 'p')}, weights {most('run', 'weight')}, running statistics {most('run', 'stat')} "
          f"against PyTorch's float32 run; gradients and momentum buffers {most('exact', 'grad', 'momentum')}, "
          f"weights {most('exact', 'weight')} against the exact step at our state)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
