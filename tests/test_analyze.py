"""analyze.py: report.md and plots from run directories, runs overlaid."""

import json
import os

import numpy as np
import pytest
from PIL import Image

import analyze
from simsiam_tf import training
from simsiam_tf.config import make_config
from simsiam_tf.diagnostics import report

PLOT_FILES = {
    "loss.png", "z_std.png", "knn.png", "spectrum.png", "effective_rank.png",
    "shards_predictor.png", "volume.png", "alignment_uniformity.png",
}


def _fake_run(root, name, stop_gradient, proj_dim=512, views=8, epochs=4, scale=1.0, method="simsiam"):
    """A run directory in the format training writes, with numbers chosen by hand."""
    path = root / name
    path.mkdir(parents=True)
    config = make_config(
        "digits", stop_gradient=stop_gradient, proj_dim=proj_dim, diag_views=views, epochs=epochs, method=method
    )
    simclr = method == "simclr"
    (path / "config.json").write_text(json.dumps(config.to_dict()))
    history = [
        {"epoch": e, "loss": (5.0 - 0.1 * e) if simclr else -0.1 * e * scale, "z_std": 0.04 / (e if not stop_gradient else 1), "lr": 0.1,
         **({"knn_top1": 0.5 + 0.05 * e} if e % 2 == 0 else {})}
        for e in range(1, epochs + 1)
    ]
    summary = {"epochs_completed": epochs, "loss": history[-1]["loss"], "z_std": history[-1]["z_std"],
               "knn_top1_init": 0.55, "knn_top1": 0.7, "knn_top1_val_selected": 0.7, "history": history}
    (path / "summary.json").write_text(json.dumps(summary))
    records = [
        {"epoch": e, "step": 10 * e, "z_std": 0.03 * scale, "z_std_reference": 1 / np.sqrt(proj_dim),
         "effective_rank": 10.0 * e * scale, "singular_values": list(np.linspace(5, 1, 16) ** e),
         "shard_ratio": 0.8 - 0.1 * e * scale, "within_trace": 0.1 * scale, "within_log_volume": -3.0 - e * scale,
         "within_log_volume_gap": -0.5 * e,
         "predictor_cosine": None if simclr else 0.5 + 0.1 * e, "predictor_identity_cosine": None if simclr else 0.6,
         "bandwidth": None if simclr else 0.1, "alignment": 0.5, "uniformity": -2.0, "seconds": 1.0,
         "wall_seconds": 100.0 * e, "diag_seconds_total": 5.0 * e}
        for e in range(1, epochs + 1)
    ]
    (path / "diagnostics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_report_overlays_runs_and_tabulates_every_epoch(tmp_path, capsys):
    a = _fake_run(tmp_path / "x", "sg", True)
    b = _fake_run(tmp_path / "x", "nosg", False, scale=0.5)
    out = tmp_path / "report"
    assert analyze.main(["--run", str(a), "--run", str(b), "--out", str(out)]) == 0
    assert "wrote" in capsys.readouterr().out
    assert PLOT_FILES <= set(os.listdir(out))
    for name in PLOT_FILES:
        with Image.open(out / name) as image:
            assert image.format == "PNG" and image.size[0] > 300
    text = (out / "report.md").read_text()
    for name in PLOT_FILES:
        assert f"]({name})" in text
    overview = [line for line in text.splitlines() if line.startswith("| sg |") or line.startswith("| nosg |")]
    assert len(overview) == 2
    sg = overview[0]
    assert "| simsiam |" in sg and "| True |" in sg and "0.0300 (0.0442)" in sg and "| 40.0 |" in sg
    assert "| -7.00 (-2.00) |" in sg and "| 5.0% |" in sg
    # Per-epoch tables: one row per epoch and run, numbers from history and diagnostics.
    assert "| 3 | -0.3000 | 0.0400 | 0.0300 | 30.00 | 0.500 | 0.1000 | -6.00 | -1.50 | 0.800 | 0.600 | 0.500 | -2.000 | – |" in text
    assert "| 2 | -0.1000 | 0.0200 | 0.0150 | 10.00 | 0.700 | 0.0500 | -4.00 | -1.00 | 0.700 | 0.600 | 0.500 | -2.000 | 0.6000 |" in text


def test_simsiam_and_simclr_runs_overlay(tmp_path, monkeypatch):
    simsiam = _fake_run(tmp_path, "simsiam", True)
    simclr = _fake_run(tmp_path, "simclr", True, method="simclr")
    out = tmp_path / "report"
    assert analyze.main(["--run", str(simsiam), "--run", str(simclr), "--out", str(out)]) == 0
    text = (out / "report.md").read_text()
    row = next(line for line in text.splitlines() if line.startswith("| simclr |"))
    assert "| simclr | digits |" in row and "| no predictor |" in row and "| -7.00 (-2.00) |" in row
    runs = [report.load_run(str(simsiam)), report.load_run(str(simclr))]
    # The loss: one panel per method, each with its own reference line.
    simsiam_ax, simclr_ax = _lines(monkeypatch, report.plot_loss, runs, tmp_path)
    assert {label for label, _, _ in simsiam_ax} == {"simsiam", "minimum -1"}
    simclr_lines = {label: y for label, _, y in simclr_ax}
    assert simclr_lines["simclr"] == pytest.approx([4.9, 4.8, 4.7, 4.6])
    assert simclr_lines["chance log(2N - 1), N = 128"] == [pytest.approx(np.log(255))] * 2
    # Shards and volume for both; the predictor only for SimSiam.
    shard_ax, predictor_ax = _lines(monkeypatch, report.plot_shards_and_predictor, runs, tmp_path)
    assert {"simsiam", "simclr"} <= {label for label, _, _ in shard_ax}
    assert {label for label, _, _ in predictor_ax} == {"simsiam: h", "simsiam: identity"}
    volume_ax, gap_ax = _lines(monkeypatch, report.plot_volume, runs, tmp_path)
    assert {label: y for label, _, y in volume_ax}["simclr"] == pytest.approx([-4.0, -5.0, -6.0, -7.0])
    assert {label: y for label, _, y in gap_ax}["no image information"] == [0.0, 0.0]


def _lines(monkeypatch, plot, runs, tmp_path):
    """The Matplotlib lines a plot function draws, by axis."""
    captured = {}

    def keep(fig, out_dir, name):
        captured["axes"] = fig.axes
        return name

    monkeypatch.setattr(report, "_save", keep)
    plot(runs, str(tmp_path))
    return [[(line.get_label(), list(line.get_xdata()), list(line.get_ydata())) for line in ax.lines] for ax in captured["axes"]]


def test_plots_draw_each_run_and_the_reference_lines(tmp_path, monkeypatch):
    runs = [
        report.load_run(str(_fake_run(tmp_path, "d512", True, proj_dim=512))),
        report.load_run(str(_fake_run(tmp_path, "d128", False, proj_dim=128, views=4))),
    ]
    (z_ax,) = _lines(monkeypatch, report.plot_z_std, runs, tmp_path)
    labels = {label: (x, y) for label, x, y in z_ax}
    assert labels["d512 (training batches)"] == ([1, 2, 3, 4], [0.04] * 4)
    assert labels["d128 (probe set)"][1] == [0.03] * 4
    assert labels["1/sqrt(d), d = 512"][1] == [pytest.approx(1 / np.sqrt(512))] * 2
    assert labels["1/sqrt(d), d = 128"][1] == [pytest.approx(1 / np.sqrt(128))] * 2

    shard_ax, predictor_ax = _lines(monkeypatch, report.plot_shards_and_predictor, runs, tmp_path)
    shard = {label: y for label, _, y in shard_ax}
    assert shard["no image information (1 - 1/8)"] == [pytest.approx(7 / 8)] * 2
    assert shard["no image information (1 - 1/4)"] == [pytest.approx(3 / 4)] * 2
    assert shard["d512"] == pytest.approx([0.7, 0.6, 0.5, 0.4])
    assert {label for label, _, _ in predictor_ax} == {"d512: h", "d512: identity", "d128: h", "d128: identity"}

    (knn_ax,) = _lines(monkeypatch, report.plot_knn, runs, tmp_path)
    assert knn_ax[0][1:] == ([0, 2, 4], [0.55, 0.6, 0.7])  # epoch 0 is the random-init kNN

    (spectrum_ax,) = _lines(monkeypatch, report.plot_spectrum, runs, tmp_path)
    s = np.linspace(5, 1, 16) ** 4
    assert spectrum_ax[0][2] == pytest.approx(list(s / s.sum()))


def test_labels_disambiguate_runs_with_the_same_name():
    assert report.unique_labels(["a/run", "b/run"]) == ["a/run", "b/run"]
    assert report.unique_labels(["x/sg", "x/nosg"]) == ["sg", "nosg"]


def test_a_real_run_renders_into_its_own_report_directory(tmp_path):
    run_dir = str(tmp_path / "run")
    config = make_config(
        "digits", width=8, proj_dim=64, pred_dim=16, batch_size=32, epochs=2, train_limit=64,
        knn_every=1, knn_k=20, diag_every=1, diag_images=16, diag_views=2, projector_images=0,
    )
    training.run(config, run_dir, verbose=0)
    assert analyze.main(["--run", run_dir]) == 0
    text = open(os.path.join(run_dir, "report", "report.md")).read()
    rows = [line for line in text.splitlines() if line.startswith("| 1 |") or line.startswith("| 2 |")]
    assert len(rows) == 2 and all("–" not in row for row in rows)  # every column filled
    assert PLOT_FILES <= set(os.listdir(os.path.join(run_dir, "report")))


def test_a_run_without_diagnostics_still_renders(tmp_path):
    path = _fake_run(tmp_path, "plain", True)
    (path / "diagnostics.jsonl").unlink()
    assert analyze.main(["--run", str(path), "--out", str(tmp_path / "out")]) == 0
    assert "| plain |" in (tmp_path / "out" / "report.md").read_text()


@pytest.mark.parametrize(
    "args, message",
    [
        ([], "the following arguments are required: --run"),
        (["--run", "NOWHERE"], "is not a directory"),
        (["--run", "EMPTY"], "has no config.json"),
    ],
)
def test_bad_input_exits_2_with_one_line(tmp_path, capsys, args, message):
    (tmp_path / "EMPTY").mkdir()
    args = [a.replace("NOWHERE", str(tmp_path / "nowhere")).replace("EMPTY", str(tmp_path / "EMPTY")) for a in args]
    try:
        code = analyze.main(args)
    except SystemExit as e:
        code = e.code
    err = capsys.readouterr().err
    lines = [l for l in err.splitlines() if "error:" in l]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("analyze.py: error:"), err
    assert message in lines[0]
