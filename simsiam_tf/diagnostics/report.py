"""A report of one or more runs: report.md plus PNG plots, runs overlaid.

Runs of both methods overlay: a SimSiam run and a SimCLR run (`--method simclr`) share
every plot but the loss, which gets one panel per method (the two losses are on
different scales), and the predictor curves, which SimCLR does not have.

Reads what training writes into each run directory: config.json, summary.json (the
per-epoch `history`: loss, z_std of the training batches, kNN), diagnostics.jsonl (the
probe-set diagnostics, `simsiam_tf.diagnostics.probe`) and, if present,
evaluation.json (`evaluate.py`). Plots use Matplotlib's Agg backend (no display).
"""

from __future__ import annotations

import dataclasses
import json
import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from simsiam_tf.config import UsageError  # noqa: E402

FIGSIZE = (6.0, 3.6)
DPI = 72  # small PNGs: the docs commit them


@dataclasses.dataclass
class Run:
    """What a run directory holds, as read by `load_run`."""

    path: str
    label: str
    config: dict
    summary: dict
    diagnostics: list[dict]
    evaluation: dict | None

    @property
    def history(self) -> list[dict]:
        return self.summary.get("history", [])

    @property
    def method(self) -> str:
        return self.config.get("method", "simsiam")  # runs from before --method were SimSiam's


def _read_json(path: str):
    with open(path) as f:
        return json.load(f)


def load_run(path: str, label: str | None = None) -> Run:
    """Read a run directory.

    Raises:
        UsageError: not a directory, or no config.json / summary.json.
    """
    if not os.path.isdir(path):
        raise UsageError(f"--run {path!r} is not a directory")
    for name in ("config.json", "summary.json"):
        if not os.path.exists(os.path.join(path, name)):
            raise UsageError(f"--run {path!r} has no {name}; pass a run directory written by train.py")
    try:
        config = _read_json(os.path.join(path, "config.json"))
        summary = _read_json(os.path.join(path, "summary.json"))
    except json.JSONDecodeError as e:
        raise UsageError(f"--run {path!r}: a JSON file is damaged ({e})")
    evaluation_path = os.path.join(path, "evaluation.json")
    evaluation = _read_json(evaluation_path) if os.path.exists(evaluation_path) else None
    label = label or os.path.basename(os.path.normpath(path))
    from simsiam_tf.diagnostics.probe import read_records  # imports TensorFlow: only for a valid run

    return Run(path, label, config, summary, read_records(path), evaluation)


def unique_labels(paths: list[str]) -> list[str]:
    """Run labels: the directory names, with parents added until they differ."""
    parts = [os.path.normpath(os.path.abspath(p)).split(os.sep) for p in paths]
    for depth in range(1, max(len(p) for p in parts) + 1):
        labels = ["/".join(p[-depth:]) for p in parts]
        if len(set(labels)) == len(labels):
            return labels
    return [os.path.normpath(p) for p in paths]


def _series(records: list[dict], key: str) -> tuple[list, list]:
    pairs = [(r["epoch"], r[key]) for r in records if r.get(key) is not None]
    return [p[0] for p in pairs], [p[1] for p in pairs]


def _figure(title: str, ylabel: str, panels: int = 1):
    fig, axes = plt.subplots(1, panels, figsize=(FIGSIZE[0] * (1 if panels == 1 else 0.85 * panels), FIGSIZE[1]))
    axes = np.atleast_1d(axes)
    for ax in axes:
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel(ylabel)
    fig.suptitle(title, fontsize=11)
    return fig, axes


def _save(fig, out_dir: str, name: str) -> str:
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, name), dpi=DPI)
    plt.close(fig)
    return name


def _legend(ax, **kwargs):
    """A legend, when the axis has labelled lines (a run without diagnostics has none)."""
    if ax.get_legend_handles_labels()[0]:
        ax.legend(**kwargs)


def _colors(runs):
    cycle = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    return [cycle[i % len(cycle)] for i in range(len(runs))]


def plot_loss(runs: list[Run], out_dir: str) -> str:
    """One panel per method: SimSiam's loss (minimum -1) and SimCLR's NT-Xent, whose
    chance level log(2N - 1) (every view equally similar to all others) is drawn."""
    methods = [m for m in ("simsiam", "simclr") if any(run.method == m for run in runs)] or ["simsiam"]
    fig, axes = _figure("Loss (training batches)", "loss", panels=len(methods))
    colors = dict(zip((run.label for run in runs), _colors(runs)))
    for ax, method in zip(axes, methods):
        ax.set_title("SimSiam: symmetric negative cosine" if method == "simsiam" else "SimCLR: NT-Xent", fontsize=9)
        chance = set()
        for run in runs:
            if run.method == method:
                ax.plot(*_series(run.history, "loss"), color=colors[run.label], label=run.label)
                if method == "simclr":
                    chance.add(run.config.get("batch_size"))
        if method == "simsiam":
            ax.axhline(-1, color="grey", lw=0.8, ls=":", label="minimum -1")
        for n in sorted(b for b in chance if b):
            ax.axhline(np.log(2 * n - 1), color="grey", lw=0.8, ls=":", label=f"chance log(2N - 1), N = {n}")
        _legend(ax, fontsize=7)
    return _save(fig, out_dir, "loss.png")


def plot_z_std(runs: list[Run], out_dir: str) -> str:
    fig, (ax,) = _figure("z_std: std of l2-normalised z per channel", "z_std")
    references = set()
    for run, color in zip(runs, _colors(runs)):
        ax.plot(*_series(run.history, "z_std"), color=color, label=f"{run.label} (training batches)")
        if run.diagnostics:
            ax.plot(*_series(run.diagnostics, "z_std"), color=color, ls="--", marker=".", label=f"{run.label} (probe set)")
        references.add(run.config.get("proj_dim"))
    for d in sorted(r for r in references if r):
        ax.axhline(1 / np.sqrt(d), color="black", lw=1, ls=":", label=f"1/sqrt(d), d = {d}")
    ax.set_ylim(bottom=0)
    _legend(ax, fontsize=7)
    return _save(fig, out_dir, "z_std.png")


def plot_knn(runs: list[Run], out_dir: str) -> str:
    fig, (ax,) = _figure("kNN top-1 (k = 200, T = 0.1): test (solid), validation (dashed), ★ chosen", "top-1")
    for run, color in zip(runs, _colors(runs)):
        epochs, values = _series(run.history, "knn_top1")
        if run.summary.get("knn_top1_init") is not None:
            epochs, values = [0, *epochs], [run.summary["knn_top1_init"], *values]
        ax.plot(epochs, values, color=color, marker="o", ms=3, label=run.label)
        val_epochs, val = _series(run.history, "knn_val_top1")
        if val_epochs:
            ax.plot(val_epochs, val, color=color, ls="--", lw=1)
        best, chosen = run.summary.get("knn_best_epoch"), run.summary.get("knn_top1_val_selected")
        if best is not None and chosen is not None:
            ax.plot([best], [chosen], color=color, marker="*", ms=12, ls="none")
    _legend(ax, fontsize=8)
    return _save(fig, out_dir, "knn.png")


def plot_spectrum(runs: list[Run], out_dir: str) -> str:
    fig, (ax,) = _figure("Singular values of the mean representations f̄ (last evaluation)", "σ_i / Σ σ")
    ax.set_xlabel("index i")
    for run, color in zip(runs, _colors(runs)):
        if not run.diagnostics:
            continue
        last = run.diagnostics[-1]
        s = np.asarray(last["singular_values"], float)
        if s.sum() > 0:
            ax.semilogy(np.arange(1, len(s) + 1), s / s.sum(), color=color, label=f"{run.label}, epoch {last['epoch']}")
    _legend(ax, fontsize=8)
    return _save(fig, out_dir, "spectrum.png")


def plot_rank(runs: list[Run], out_dir: str) -> str:
    fig, (ax,) = _figure("Effective rank of the mean representations f̄", "effective rank")
    for run, color in zip(runs, _colors(runs)):
        ax.plot(*_series(run.diagnostics, "effective_rank"), color=color, marker=".", label=run.label)
    ax.set_ylim(bottom=0)
    _legend(ax, fontsize=8)
    return _save(fig, out_dir, "effective_rank.png")


def plot_shards_and_predictor(runs: list[Run], out_dir: str) -> str:
    fig, (left, right) = _figure("Shards and predictor optimality (probe set)", "within-image / total variance", panels=2)
    right.set_ylabel("mean cos(h(z), ĥ*(z))")
    views = set()
    for run, color in zip(runs, _colors(runs)):
        left.plot(*_series(run.diagnostics, "shard_ratio"), color=color, marker=".", label=run.label)
        if run.method != "simclr":  # no predictor
            right.plot(*_series(run.diagnostics, "predictor_cosine"), color=color, marker=".", label=f"{run.label}: h")
            right.plot(
                *_series(run.diagnostics, "predictor_identity_cosine"), color=color, ls="--", label=f"{run.label}: identity"
            )
        views.add(run.config.get("diag_views"))
    for v in sorted(x for x in views if x):
        left.axhline(1 - 1 / v, color="black", lw=1, ls=":", label=f"no image information (1 - 1/{v})")
    left.set_ylim(0, 1)
    _legend(left, fontsize=7)
    _legend(right, fontsize=7)
    return _save(fig, out_dir, "shards_predictor.png")


def _side_by_side(runs: list[Run], title: str, left_key: str, left_label: str, right_key: str, right_label: str):
    """Two diagnostics per epoch in two panels, one line per run in each."""
    fig, (left, right) = _figure(title, left_label, panels=2)
    right.set_ylabel(right_label)
    for run, color in zip(runs, _colors(runs)):
        left.plot(*_series(run.diagnostics, left_key), color=color, marker=".", label=run.label)
        right.plot(*_series(run.diagnostics, right_key), color=color, marker=".", label=run.label)
    return fig, left, right


def plot_volume(runs: list[Run], out_dir: str) -> str:
    fig, left, right = _side_by_side(
        runs, "Within-image volume (probe set)",
        "within_log_volume", "mean log-variance in the views' span",
        "within_log_volume_gap", "gap to groups of different images",
    )
    right.axhline(0, color="black", lw=1, ls=":", label="no image information")
    _legend(left, fontsize=8)
    _legend(right, fontsize=7)
    return _save(fig, out_dir, "volume.png")


def plot_alignment_uniformity(runs: list[Run], out_dir: str) -> str:
    fig, left, _ = _side_by_side(
        runs, "Alignment and uniformity (Wang & Isola, 2020)",
        "alignment", "alignment (lower: views agree)",
        "uniformity", "uniformity (lower: more spread)",
    )
    _legend(left, fontsize=8)
    return _save(fig, out_dir, "alignment_uniformity.png")


PLOTS = (
    ("Loss", plot_loss),
    ("Collapse: z_std", plot_z_std),
    ("kNN accuracy", plot_knn),
    ("Singular-value spectrum", plot_spectrum),
    ("Effective rank", plot_rank),
    ("Shards and predictor optimality", plot_shards_and_predictor),
    ("Within-image volume", plot_volume),
    ("Alignment and uniformity", plot_alignment_uniformity),
)


def _fmt(value, spec=".4f"):
    return "–" if value is None else format(value, spec)


def _overview(runs: list[Run]) -> list[str]:
    lines = [
        "| run | method | dataset | stop-grad | epochs | loss | z_std train / probe (1/√d) "
        "| test kNN init → last (val-selected) | eff. rank | shard ratio | log-volume (gap) "
        "| pred. cos (identity) | diag. time | evaluate.py kNN / linear |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for run in runs:
        s, c = run.summary, run.config
        last = run.diagnostics[-1] if run.diagnostics else {}
        share = None
        if last.get("wall_seconds"):
            share = last["diag_seconds_total"] / last["wall_seconds"]
        ev = run.evaluation
        evaluated = (
            f"{ev['knn']['top1']:.4f} / {ev['linear_probe']['top1']:.4f}" if ev else "–"
        )
        ref = 1 / np.sqrt(c["proj_dim"]) if c.get("proj_dim") else None
        lines.append(
            f"| {run.label} | {run.method} | {c.get('dataset')} | {c.get('stop_gradient')} | {s.get('epochs_completed')} "
            f"| {_fmt(s.get('loss'))} | {_fmt(s.get('z_std'))} / {_fmt(last.get('z_std'))} ({_fmt(ref)}) "
            f"| {_fmt(s.get('knn_top1_init'))} → {_fmt(s.get('knn_top1'))} ({_fmt(s.get('knn_top1_val_selected'))}) "
            f"| {_fmt(last.get('effective_rank'), '.1f')} | {_fmt(last.get('shard_ratio'), '.3f')} "
            f"| {_fmt(last.get('within_log_volume'), '.2f')} ({_fmt(last.get('within_log_volume_gap'), '+.2f')}) "
            f"| {_predictor(run, last)} "
            f"| {_fmt(share, '.1%')} | {evaluated} |"
        )
    return lines


def _predictor(run: Run, record: dict) -> str:
    if run.method == "simclr":
        return "no predictor"
    return f"{_fmt(record.get('predictor_cosine'), '.3f')} ({_fmt(record.get('predictor_identity_cosine'), '.3f')})"


def _per_epoch(run: Run) -> list[str]:
    diag = {r["epoch"]: r for r in run.diagnostics}
    hist = {h["epoch"]: h for h in run.history}
    lines = [
        "| epoch | loss | z_std train | z_std probe | eff. rank | shard ratio | within trace | log-volume | gap "
        "| pred. cos | identity cos | align | uniform | kNN |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for epoch in sorted(set(diag) | set(hist)):
        h, d = hist.get(epoch, {}), diag.get(epoch, {})
        lines.append(
            f"| {epoch} | {_fmt(h.get('loss'))} | {_fmt(h.get('z_std'))} | {_fmt(d.get('z_std'))} "
            f"| {_fmt(d.get('effective_rank'), '.2f')} | {_fmt(d.get('shard_ratio'), '.3f')} "
            f"| {_fmt(d.get('within_trace'), '.4f')} | {_fmt(d.get('within_log_volume'), '.2f')} "
            f"| {_fmt(d.get('within_log_volume_gap'), '+.2f')} "
            f"| {_fmt(d.get('predictor_cosine'), '.3f')} | {_fmt(d.get('predictor_identity_cosine'), '.3f')} "
            f"| {_fmt(d.get('alignment'), '.3f')} | {_fmt(d.get('uniformity'), '.3f')} | {_fmt(h.get('knn_top1'))} |"
        )
    return lines


def write_report(runs: list[Run], out_dir: str) -> str:
    """Render the plots and report.md into `out_dir`; returns the path of report.md."""
    os.makedirs(out_dir, exist_ok=True)
    lines = ["# Run report", "", *_overview(runs), ""]
    lines += [
        "z_std train: the training step's batches (train-mode BatchNorm), last epoch. Probe columns: "
        "the fixed probe set in inference mode (`simsiam_tf/diagnostics/probe.py`), last evaluation. "
        "log-volume: mean log-variance of each image's views within their span; gap: minus the same for "
        "groups of views of different images (0 = views carry no image information). "
        "Predictor columns: SimCLR has no predictor. "
        "diag. time: share of the run's wall time spent on the probe diagnostics. "
        "Definitions: docs/evaluation.md.",
        "",
    ]
    for title, plot in PLOTS:
        name = plot(runs, out_dir)
        lines += [f"## {title}", "", f"![{title}]({name})", ""]
    for run in runs:
        lines += [f"## Per epoch: {run.label}", "", f"`{run.path}`", "", *_per_epoch(run), ""]
    path = os.path.join(out_dir, "report.md")
    with open(path, "w") as f:
        f.write("\n".join(lines))
    return path
