"""Step-level parity with PyTorch: our SimSiam training step against the official one.

The same SimSiam (CIFAR ResNet-18 + the cifar preset's heads) is built twice: ours with
`build_simsiam` and `make_optimizer`, trained by the model's own `train_step` through
`fit()`; and PyTorch's, from torchvision's ResNet-18 (3x3 stride-1 stem, no max-pool,
fc = Identity) and the heads of `simsiam_tf/model.py` (fc-BN-ReLU, fc-BN without affine
parameters; fc-BN-ReLU, fc with bias), trained as facebookresearch/simsiam's
`main_simsiam.py` trains: `torch.optim.SGD(momentum, weight_decay)` on every parameter,
the per-epoch cosine `adjust_learning_rate`, `lr = base_lr * batch / 256`,
`-(cos(p1, z2.detach()).mean() + cos(p2, z1.detach()).mean()) / 2`.
PyTorch starts from our initial weights (conv kernels HWIO -> OIHW, dense kernels
transposed, BatchNorm gamma, beta, running mean and variance), and both take the same
steps on the same fixed batches of random float32 views (already normalised: the
augmentation is not part of this comparison), in float32, on the CPU.

Compared at every step: the learning rate, the loss, z and p of both views, the
gradient of every parameter, every parameter after the update (and the update itself,
w_t - w_0), and the BatchNorm running statistics. Per group (backbone convs, backbone
BN, projector, predictor, running mean, running variance): max abs difference and max
relative difference, the latter per tensor as max|ours - torch| / max|torch| (a
tensor's error relative to its largest entry; entrywise ratios blow up near zero) and
the worst tensor of the group shown.

Our gradients are the ones `train_step` computes and hands to
`optimizer.apply_gradients`; z, p and the loss are the tensors `train_step` passes to
`losses.simsiam_loss`. Both are recorded by wrapping those two calls for the run
(the wrappers copy the tensors into variables and call the originals unchanged);
nothing of the step is re-implemented here.

Two halves talk through an .npz file. This one runs in the project's Python: it trains
ours, writes the initial weights, the batches and our per-step results, then runs the
PyTorch half (this same file with `--torch-half`, which imports neither TensorFlow nor
simsiam_tf) under `--torch-python`. PyTorch is not a dependency of the project; install
it in a separate virtual environment (VENV: any folder outside the repository; on this
project's machines pip takes these from files already on disk, elsewhere it downloads
CUDA builds of several GB):

    python -m venv VENV && VENV/bin/pip install torch==2.14.1 torchvision==0.29.1

then

    SIMSIAM_TORCH_PYTHON=VENV/bin/python python benchmarks/torch_parity.py                                  # full size
    SIMSIAM_TORCH_PYTHON=VENV/bin/python python benchmarks/torch_parity.py --width 8 --batch 16 --size 32   # small

Full size is the paper's CIFAR network (width 64, 2048-d projector, 512-d predictor
bottleneck) at batch 128 (the preset's 512 also runs; it takes about 4x as long).
`--torch-python` defaults to this interpreter if it can import torch, else to
$SIMSIAM_TORCH_PYTHON.

Prints a table per step, one JSON line with every number, and a final verdict line.
Exit status: 0 when every group is within its tolerance (float32 round-off), 1 when one
is not (the verdict line names it), 2 for bad arguments or no PyTorch.
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
PARAM_GROUPS = ("backbone conv", "backbone BN", "projector", "predictor")
STAT_GROUPS = ("running mean", "running var")
# Max relative difference allowed (max|ours - torch| / max|torch| per tensor, worst
# tensor of the group), by quantity. "weight": the parameters after the step, against
# their own size; "update": the same difference against how far the weights moved
# (w_t - w_0), the stricter test after a few small steps. float32 round-off in these
# networks stays one to two orders of magnitude below (docs/evaluation.md).
TOLERANCE = {
    "lr": 1e-6,
    "loss": 1e-4,
    "z": 1e-4,
    "p": 1e-4,
    "grad": 1e-3,
    "weight": 1e-4,
    "update": 1e-3,
    "stat": 1e-4,
    "stat update": 1e-3,
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


def to_torch_layout(value: np.ndarray, layout: str) -> np.ndarray:
    if layout == "conv":
        return np.ascontiguousarray(value.transpose(3, 2, 0, 1))
    if layout == "dense":
        return np.ascontiguousarray(value.T)
    return value


def run_ours(args, views1: np.ndarray, views2: np.ndarray) -> tuple[dict, dict]:
    """Our model trained `args.steps` steps by its own train_step on the fixed batches.

    Returns (arrays for the .npz, facts about our side). Views are [steps, B, S, S, 3].
    """
    import keras
    import tensorflow as tf

    from simsiam_tf import losses
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
    arrays = {f"init/{name}": to_torch_layout(v.numpy(), layout) for v, name, layout in mapping}

    # Recorders: train_step's own tensors, copied into variables as the step runs.
    trainable = model.trainable_variables
    grad_slots = {id(v): tf.Variable(tf.zeros(v.shape, v.dtype), trainable=False) for v in trainable}
    dim = config.proj_dim
    out_slots = {k: tf.Variable(tf.zeros([args.batch, dim]), trainable=False) for k in ("p1", "p2", "z1", "z2")}
    loss_slot = tf.Variable(0.0, trainable=False)
    calls = {"apply_gradients": 0}
    optimizer = model.optimizer
    original_apply = optimizer.apply_gradients
    original_loss = losses.simsiam_loss

    def recorded_apply(grads_and_vars):
        pairs = list(grads_and_vars)
        if [id(v) for _, v in pairs] != [id(v) for v in trainable]:
            raise RuntimeError("train_step applied gradients to other variables than model.trainable_variables")
        calls["apply_gradients"] += 1  # counts traces, not steps
        for g, v in pairs:
            grad_slots[id(v)].assign(g)
        return original_apply(pairs)

    def recorded_loss(p1, p2, z1, z2, stop_gradient=True):
        loss = original_loss(p1, p2, z1, z2, stop_gradient=stop_gradient)
        for key, t in zip(("p1", "p2", "z1", "z2"), (p1, p2, z1, z2)):
            out_slots[key].assign(tf.cast(t, tf.float32))
        loss_slot.assign(loss)
        return loss

    steps_seen = []

    class Record(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            s = len(steps_seen)
            steps_seen.append(int(optimizer.iterations.numpy()))
            arrays[f"ours/{s}/lr"] = np.float64(np.asarray(logs["lr"]))
            arrays[f"ours/{s}/loss"] = np.float64(loss_slot.numpy())
            for key, slot in out_slots.items():
                arrays[f"ours/{s}/{key}"] = slot.numpy()
            for v, name, layout in mapping:
                arrays[f"ours/{s}/state/{name}"] = to_torch_layout(v.numpy(), layout)
            for v in trainable:
                layout = next(lay for w, _, lay in mapping if w is v)
                arrays[f"ours/{s}/grad/{names[id(v)]}"] = to_torch_layout(grad_slots[id(v)].numpy(), layout)

    dataset = tf.data.Dataset.from_tensor_slices((views1, views2))  # one element = one step's (x1, x2)
    optimizer.apply_gradients = recorded_apply
    losses.simsiam_loss = recorded_loss
    started = time.perf_counter()
    try:
        model.fit(dataset, epochs=1, verbose=0, callbacks=[Record()])
    finally:
        losses.simsiam_loss = original_loss
        del optimizer.apply_gradients
    seconds = time.perf_counter() - started
    if steps_seen != list(range(1, args.steps + 1)):
        raise RuntimeError(f"expected {args.steps} steps, fit() ran optimizer iterations {steps_seen}")
    if not calls["apply_gradients"]:
        raise RuntimeError("train_step never called optimizer.apply_gradients: its gradients were not recorded")
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


def difference(ours: np.ndarray, theirs: np.ndarray, scale: float | None = None) -> tuple[float, float]:
    """(max |ours - theirs|, that over `scale`, by default max |theirs|); 0/0 counts as 0."""
    diff = float(np.max(np.abs(ours.astype(np.float64) - theirs.astype(np.float64)))) if ours.size else 0.0
    if scale is None:
        scale = float(np.max(np.abs(theirs.astype(np.float64)))) if theirs.size else 0.0
    return diff, (diff / scale if scale > 0 else (0.0 if diff == 0 else math.inf))


class Rows:
    """Per (quantity, group): tensors compared, max abs, max rel and the worst tensor."""

    def __init__(self):
        self.rows = {}

    def add(self, what, group, name, abs_diff, rel_diff):
        row = self.rows.setdefault((what, group), {"what": what, "group": group, "tensors": 0,
                                                   "max_abs": 0.0, "max_rel": 0.0, "worst": ""})
        row["tensors"] += 1
        row["max_abs"] = max(row["max_abs"], abs_diff)
        if rel_diff >= row["max_rel"]:
            row["max_rel"], row["worst"] = rel_diff, name

    def list(self):
        return list(self.rows.values())


def torch_half(npz_path: str, json_path: str, wrong_weight_decay: float | None) -> None:
    """Train the PyTorch SimSiam on the same batches from our initial weights; compare."""
    import torch
    import torch.nn.functional as F

    torch.set_num_threads(os.cpu_count() or 1)
    data = np.load(npz_path)
    meta = json.loads(str(data["meta"]))
    model = torch_simsiam(meta["width"], meta["dim"], meta["pred_dim"], meta["proj_layers"])
    init = {k[len("init/"):]: data[k] for k in data.files if k.startswith("init/")}
    missing, unexpected = model.load_state_dict({k: torch.from_numpy(v) for k, v in init.items()}, strict=False)
    missing = [k for k in missing if not k.endswith("num_batches_tracked")]
    if missing or unexpected:
        raise RuntimeError(f"state mismatch: torch names without our weights {missing}, ours without torch {unexpected}")
    model.train()

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
    weight_decay = meta["weight_decay"] if wrong_weight_decay is None else wrong_weight_decay
    if meta["fix_pred_lr"]:
        groups = [{"params": list(model.backbone.parameters()) + list(model.projector.parameters()), "fix_lr": False},
                  {"params": model.predictor.parameters(), "fix_lr": True}]
    else:
        groups = model.parameters()
    optimizer = torch.optim.SGD(groups, init_lr, momentum=meta["momentum"], weight_decay=weight_decay)
    params = dict(model.named_parameters())
    criterion = torch.nn.CosineSimilarity(dim=1)

    def state():
        return {k: v.detach().numpy().copy() for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}

    x1s, x2s = data["x1"], data["x2"]
    steps, previous_ours, previous_torch = [], init, state()
    started = time.perf_counter()
    for s in range(meta["steps"]):
        epoch = s // meta["steps_per_epoch"]
        lr = init_lr * 0.5 * (1.0 + math.cos(math.pi * epoch / meta["epochs"]))  # adjust_learning_rate
        for group in optimizer.param_groups:
            group["lr"] = init_lr if group.get("fix_lr") else lr
        x1, x2 = torch.from_numpy(x1s[s]), torch.from_numpy(x2s[s])
        z1 = model.projector(model.backbone(x1))
        z2 = model.projector(model.backbone(x2))
        p1, p2 = model.predictor(z1), model.predictor(z2)
        loss = -(criterion(p1, z2.detach()).mean() + criterion(p2, z1.detach()).mean()) * 0.5
        optimizer.zero_grad()
        loss.backward()
        grads = {n: p.grad.numpy().copy() for n, p in params.items()}
        optimizer.step()
        after = state()

        rows = Rows()
        ours_lr, ours_loss = float(data[f"ours/{s}/lr"]), float(data[f"ours/{s}/loss"])
        rows.add("lr", "", "lr", *difference(np.array(ours_lr), np.array(lr)))
        rows.add("loss", "", "loss", *difference(np.array(ours_loss), np.array(loss.item())))
        for key, t in (("z1", z1), ("z2", z2), ("p1", p1), ("p2", p2)):
            rows.add(key[0], "", key, *difference(data[f"ours/{s}/{key}"], t.detach().numpy()))
        for n, g in grads.items():
            rows.add("grad", group_of(n, g.ndim), n, *difference(data[f"ours/{s}/grad/{n}"], g))
        moved = {}
        for n, theirs in after.items():
            ours = data[f"ours/{s}/state/{n}"]
            group = group_of(n, theirs.ndim)
            stat = group in STAT_GROUPS
            rows.add("stat" if stat else "weight", group, n, *difference(ours, theirs))
            # Against how far the tensor moved since the start: the strict view of a
            # few small steps (the weights themselves barely change).
            change = float(np.max(np.abs(theirs.astype(np.float64) - init[n]))) if theirs.size else 0.0
            rows.add("stat update" if stat else "update", group, n, *difference(ours, theirs, scale=change))
            for side, prev, now in (("ours", previous_ours[n], ours), ("torch", previous_torch[n], theirs)):
                step_change = float(np.max(np.abs(now.astype(np.float64) - prev))) if now.size else 0.0
                key = (side, group)
                moved[key] = min(moved.get(key, math.inf), step_change) if n in params or stat else moved.get(key, math.inf)
        previous_ours = {n: data[f"ours/{s}/state/{n}"] for n in after}
        previous_torch = after
        steps.append({
            "step": s + 1, "epoch": epoch, "lr": {"ours": ours_lr, "torch": lr},
            "loss": {"ours": ours_loss, "torch": loss.item()},
            "rows": rows.list(),
            # the smallest per-tensor change of this step in each group: > 0 means
            # every tensor of the group moved
            "min_tensor_change": {f"{side} {group}": v for (side, group), v in moved.items()},
        })
    result = {
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "torch_seconds": time.perf_counter() - started,
        "torch_parameters": len(params),
        "torch_parameter_count": int(sum(p.numel() for p in params.values())),
        "torch_state_tensors": len(previous_torch),
        "parameters_matched": sum(1 for n in params if f"ours/0/grad/{n}" in data.files),
        "bn_layers": len(bn_modules),
        "bn_mismatch": bn_mismatch,
        "weight_decay_used": weight_decay,
        "steps": steps,
    }
    with open(json_path, "w") as f:
        json.dump(result, f)


# ----------------------------------------------------------------------------------
# Report


def _e(x: float) -> str:
    return f"{x:.1e}" if math.isfinite(x) else str(x)


def judge(result: dict, ours: dict) -> list[str]:
    """Every failure, one phrase each; empty when the two steps agree."""
    failures = [f"BatchNorm hyperparameters differ: {m}" for m in result["bn_mismatch"]]
    if not (result["parameters_matched"] == result["torch_parameters"] == ours["trainable_variables"]):
        failures.append(
            f"parameters matched {result['parameters_matched']}, torch parameters {result['torch_parameters']}, "
            f"our trainable variables {ours['trainable_variables']}"
        )
    for step in result["steps"]:
        for row in step["rows"]:
            tol = TOLERANCE[row["what"]]
            if not row["max_rel"] <= tol:
                failures.append(
                    f"step {step['step']} {row['what']} {row['group'] or row['worst']}: max rel {_e(row['max_rel'])} "
                    f"> {tol:g} (max abs {_e(row['max_abs'])}, worst {row['worst']})"
                )
    return failures


def print_report(result: dict, ours: dict) -> None:
    order = ["lr", "loss", "z", "p", "grad", "weight", "update", "stat", "stat update"]
    label = {"lr": "lr", "loss": "loss", "z": "z (z1, z2)", "p": "p (p1, p2)", "grad": "gradient",
             "weight": "weight after step", "update": "update w_t - w_0", "stat": "running stat",
             "stat update": "stat change"}
    for step in result["steps"]:
        print(f"step {step['step']} (epoch {step['epoch']}): lr ours {step['lr']['ours']:.9g} torch "
              f"{step['lr']['torch']:.9g}; loss ours {step['loss']['ours']:.9f} torch {step['loss']['torch']:.9f}")
        print(f"  {'quantity':<18} {'group':<14} {'tensors':>7} {'max abs':>9} {'max rel':>9} {'tol':>7}  worst tensor")
        rows = sorted(step["rows"], key=lambda r: (order.index(r["what"]),
                                                   (PARAM_GROUPS + STAT_GROUPS + ("",)).index(r["group"])))
        for r in rows:
            if r["what"] in ("lr", "loss"):
                continue
            flag = "" if r["max_rel"] <= TOLERANCE[r["what"]] else "  <-- exceeds"
            print(f"  {label[r['what']]:<18} {r['group']:<14} {r['tensors']:>7} {_e(r['max_abs']):>9} "
                  f"{_e(r['max_rel']):>9} {TOLERANCE[r['what']]:>7g}  {r['worst']}{flag}")


def summary(result: dict) -> dict:
    """Worst max rel over all steps, per quantity and group."""
    worst = {}
    for step in result["steps"]:
        for r in step["rows"]:
            key = f"{r['what']} {r['group']}".strip()
            worst[key] = max(worst.get(key, 0.0), r["max_rel"])
    return worst


# ----------------------------------------------------------------------------------


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)

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
                   help="Python with torch and torchvision (default: this one if it has torch, else $SIMSIAM_TORCH_PYTHON)")
    p.add_argument("--keep", default=None, metavar="DIR", help="keep the exchanged .npz and .json in DIR")
    p.add_argument("--torch-half", nargs=2, metavar=("NPZ", "JSON"), help=argparse.SUPPRESS)
    p.add_argument("--wrong-weight-decay", type=float, default=None, help=argparse.SUPPRESS)  # sanity check only
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
        torch_half(*args.torch_half, args.wrong_weight_decay)
        return 0
    try:
        torch_python = resolve_torch_python(args.torch_python)
    except Usage as e:
        print(f"torch_parity: {e}", file=sys.stderr)
        return 2

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from common import machine  # noqa: E402  (adds the repository to sys.path; quiets TF's C++ logs)

    rng = np.random.default_rng(args.seed)
    shape = (args.steps, args.batch, args.size, args.size, 3)
    views1 = rng.standard_normal(shape, dtype=np.float32)
    views2 = rng.standard_normal(shape, dtype=np.float32)
    arrays, ours = run_ours(args, views1, views2)
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
        command = [torch_python, os.path.abspath(__file__), "--torch-half", npz_path, json_path]
        if args.wrong_weight_decay is not None:
            command += ["--wrong-weight-decay", str(args.wrong_weight_decay)]
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

    print(f"our step: simsiam_tf train_step via fit(), {ours['trainable_variables']} trainable variables "
          f"({ours['parameters']:,} parameters), {args.steps} steps in {ours['fit_seconds']:.1f} s; PyTorch "
          f"{result['torch']}: {result['torch_parameters']} parameters ({result['torch_parameter_count']:,}), "
          f"{result['torch_state_tensors']} state tensors, {result['torch_seconds']:.1f} s")
    print_report(result, ours)
    failures = judge(result, ours)
    worst = summary(result)
    size = f"width {args.width}, heads {args.dim}/{args.pred_dim}, batch {args.batch}, {args.size} px"
    print(json.dumps({
        "benchmark": "torch_parity", "machine": machine(), "size": size, "args": {
            k: v for k, v in vars(args).items() if k not in ("torch_half", "keep")},
        "ours": {k: v for k, v in ours.items() if k != "bn"}, "torch": {k: v for k, v in result.items() if k != "steps"},
        "tolerance": TOLERANCE, "worst_max_rel": worst, "steps": result["steps"], "failures": failures,
    }))
    if failures:
        more = f" (and {len(failures) - 1} more)" if len(failures) > 1 else ""
        print(f"FAIL: {size}: {failures[0]}{more}")
        return 1
    top = max(worst.items(), key=lambda kv: kv[1] / TOLERANCE[kv[0].split(' ')[0] if not kv[0].startswith('stat update') else 'stat update'])
    print(f"PASS: {size}: {args.steps} steps agree with PyTorch within float32 round-off; "
          f"worst weight rel {_e(max(v for k, v in worst.items() if k.startswith('weight ')))}, "
          f"worst relative to its tolerance: {top[0]} {_e(top[1])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
