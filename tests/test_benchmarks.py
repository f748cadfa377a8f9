"""The benchmark scripts behind docs/performance.md still run and report what it quotes.

Each script runs at a tiny size (the numbers are meaningless here and are not judged;
performance is read from the scripts' own output on an idle machine). What is checked:
exit code 0, one JSON line with the fields the docs quote, and values that are
internally consistent (rates > 0, a wait fraction in [0, 1], one RSS row per epoch).
"""

import json
import math
import os
import platform
import subprocess

import pytest
from conftest import REPO


def _run(python, script, *args):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    result = subprocess.run(
        [python, os.path.join(REPO, "benchmarks", script), *args],
        capture_output=True, text=True, env=env, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    last = result.stdout.strip().splitlines()[-1]
    out = json.loads(last)
    assert out["machine"]["cores"] >= 1
    return out


def _positive(x):
    return isinstance(x, float) and math.isfinite(x) and x > 0


def test_profile_step_names_where_the_time_goes(python):
    # The TensorFlow profiler's op types for one training step: the convolutions and the
    # fused BatchNorm the model uses in training, shares summing to one.
    tiny = ("--batch", "4", "--width", "4", "--steps", "1", "--warmup", "1")
    out = _run(python, "profile_step.py", *tiny)
    ops = {r["op"]: r for r in out["tensorflow_ops"]}
    assert any("Conv2DBackpropFilter" in op for op in ops), sorted(ops)
    assert any("FusedBatchNorm" in op for op in ops), sorted(ops)
    assert math.isclose(sum(r["share"] for r in ops.values()), 1.0, rel_tol=1e-6)
    if platform.machine().lower() in ("x86_64", "amd64"):  # oneDNN is on there (simsiam_tf/__init__.py)
        out = _run(python, "profile_step.py", *tiny, "--onednn")
        kinds = {r["primitive"].split()[0] for r in out["ours"]}
        assert {"convolution", "batch_normalization"} <= kinds, kinds
        assert all(_positive(r["ms_per_step"]) for r in out["ours"])


def test_input_pipeline_reports_all_pipelines(python, cifar_dir):
    out = _run(python, "input_pipeline.py", "--quick", "--sizes", "32", "--photos", "40", "--batch", "8")
    assert out["benchmark"] == "input_pipeline"
    small = [r for r in out["rows"] if r["size"] == 32]
    assert {r["pipeline"] for r in small} == {"memory", "batched keras-cv layer", "jpeg", "naive keras-cv"}
    photos = {(r["pipeline"], r["work"]) for r in out["rows"] if r["size"] == 224}
    assert photos == {(p, w) for p in ("memory", "stream folder", "stream tfrecord") for w in ("full", "crops")}
    for r in out["rows"]:
        assert _positive(r["pairs_per_s"])
        assert math.isclose(r["pairs_per_s_per_core"] * out["machine"]["cores"], r["pairs_per_s"])
    assert _positive(out["memory_over_naive_32px"]) and _positive(out["cached_over_naive_32px"])
    assert out["photo_size"] == "500x375"


def test_stream_epoch_reports_rate_and_peak_memory(python, cifar_dir):
    # --augment-on device: decode, crop and resize only, without the colour steps' XLA
    # kernels to compile. stream_epoch.py only passes the placement on to the stream,
    # whose host augmentation at 224 px test_input_pipeline_reports_all_pipelines runs
    # ("stream tfrecord", "full").
    out = _run(python, "stream_epoch.py", "--images", "40", "--batch", "8", "--source", "tfrecord",
               "--augment-on", "device")
    (row,) = out["rows"]
    assert row["augment_on"] == "device"
    assert row["pairs"] == 40 and _positive(row["pairs_per_s_per_core"]) and _positive(row["peak_rss_mb"])
    assert math.isclose(row["in_memory_would_need_mb"], 40 * 224 * 224 * 3 / 2**20)


def test_data_service_reports_in_process_and_service_rates(python, cifar_dir):
    out = _run(python, "data_service.py", "--quick", "--photos", "32", "--batches", "1", "--batch", "8",
               "--size", "32")
    assert {r["way"] for r in out["rows"]} == {"in process", "service, 1 worker", "service, 2 workers"}
    for r in out["rows"]:
        assert _positive(r["pairs_per_s"]) and _positive(r["trainer_cpu_us_per_pair"])
    assert set(out["overhead_per_pair"]) == {"service, 1 worker", "service, 2 workers"}


def test_train_step_reports_both_precisions_with_and_without_xla(python):
    # Two runs instead of the four-row grid. Both precisions without XLA, with the
    # direct step, the backbone and the ratios; then bfloat16 with XLA and --fit-only:
    # one XLA compile (the fit step) instead of three (fit, direct step, backbone: 35-45
    # s on a 2-core CPU). With XLA the direct step and the backbone run the code checked
    # above with jit_compile=True, and fit's compiled step is the same train_step; float32
    # under XLA is the train step tests/test_xla.py compiles and compares.
    tiny = ("--batch", "8", "--steps", "1", "--width", "4")
    out = _run(python, "train_step.py", *tiny, "--xla", "off")
    rows = {(r["precision"], r["xla"]): r for r in out["rows"]}
    assert set(rows) == {("float32", False), ("bfloat16", False)}
    assert math.isclose(
        out["bf16_over_fp32_no_xla"],
        rows[("bfloat16", False)]["step_pairs_per_s"] / rows[("float32", False)]["step_pairs_per_s"],
        abs_tol=1e-3,
    )
    for r in rows.values():
        for key in ("step_pairs_per_s", "direct_step_pairs_per_s", "backbone_pairs_per_s"):
            assert _positive(r[key]), (key, r)
        assert math.isclose(r["step_over_backbone"], r["backbone_pairs_per_s"] / r["step_pairs_per_s"], rel_tol=1e-6)
    jit = _run(python, "train_step.py", *tiny, "--xla", "on", "--precision", "bfloat16", "--fit-only")
    (row,) = jit["rows"]
    assert (row["precision"], row["xla"]) == ("bfloat16", True) and _positive(row["step_pairs_per_s"]), row
    assert "direct_step_pairs_per_s" not in row and "bf16_over_fp32_no_xla" not in jit  # fit step only


def test_end_to_end_reports_input_wait_and_memory_per_epoch(python, cifar_dir):
    out = _run(python, "end_to_end.py", "--epochs", "2", "--steps", "2", "--batch", "16", "--width", "4")
    values = {r["measure"]: r["value"] for r in out["rows"]}
    assert 0.0 <= values["input wait (1 - constant/real)"] <= 1.0
    assert _positive(values["pairs/s, real pipeline"])
    assert [m for m in values if m.startswith("RSS after epoch")] == ["RSS after epoch 1 (MiB)", "RSS after epoch 2 (MiB)"]
    assert values["peak RSS (MiB)"] >= values["RSS after epoch 2 (MiB)"] > 0
    assert out["precision"] == "float32" and out["epochs"] == 2


def _fake_run(directory, precision, seed, knn, linear):
    directory.mkdir()
    (directory / "config.json").write_text(json.dumps({"precision": precision, "seed": seed}))
    (directory / "evaluation.json").write_text(json.dumps({"knn": {"top1": knn}, "linear_probe": {"top1": linear}}))
    return str(directory)


def test_compare_runs_permutation_p_and_means(tmp_path, python):
    # Three runs against three: of the C(6,3) = 20 relabellings only the observed split
    # and its mirror image reach a difference of 0.3, so the exact two-sided p is 2/20.
    a = [_fake_run(tmp_path / f"a{i}", "float32", i, 0.5 + 0.01 * i, 0.9) for i in range(3)]
    b = [_fake_run(tmp_path / f"b{i}", "bfloat16", i, 0.8 + 0.01 * i, 0.9) for i in range(3)]
    out = _run(python, "compare_runs.py", "--a", *a, "--b", *b)
    knn, linear = out["rows"]
    assert math.isclose(knn["a_mean"], 0.51) and math.isclose(knn["b_mean"], 0.81)
    assert math.isclose(knn["b_minus_a"], 0.3) and math.isclose(knn["a_std"], 0.01)
    assert math.isclose(knn["p"], 0.1)
    assert linear["b_minus_a"] == 0 and linear["p"] == 1.0  # identical groups: every split ties
    assert [r["seed"] for r in out["b"]] == [0, 1, 2]


def test_compare_runs_adds_the_last_diagnostics_every_run_has(tmp_path, python):
    def run(name, volumes, shard=None):
        path = _fake_run(tmp_path / name, "float32", 0, 0.5, 0.9)
        records = [{"epoch": 5 * (i + 1), "within_log_volume": v, "shard_ratio": shard} for i, v in enumerate(volumes)]
        with open(os.path.join(path, "diagnostics.jsonl"), "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in records)
        return path

    # The last record counts; a key some run lacks (None here) gets no row.
    a = [run("a0", [0.0, -4.0], 0.3), run("a1", [0.0, -6.0])]
    b = [run("b0", [-9.0, -3.0], 0.4), run("b1", [-9.0, -1.0], 0.5)]
    out = _run(python, "compare_runs.py", "--a", *a, "--b", *b)
    rows = {r["metric"]: r for r in out["rows"]}
    assert set(rows) == {"kNN top-1", "linear probe top-1", "within-image log-volume"}
    volume = rows["within-image log-volume"]
    assert volume["a_mean"] == -5.0 and volume["b_mean"] == -2.0 and volume["b_minus_a"] == 3.0
    assert volume["a_range"] == "-6.000 to -4.000"
    assert out["a"][0]["diagnostics_epoch"] == 10


def test_compare_runs_names_the_missing_evaluation(tmp_path, python):
    run = tmp_path / "run"
    run.mkdir()
    result = subprocess.run(
        [python, os.path.join(REPO, "benchmarks", "compare_runs.py"), "--a", str(run), "--b", str(run)],
        capture_output=True, text=True,
    )
    assert result.returncode != 0
    assert f"python evaluate.py --run {run} --checkpoint last" in result.stderr


BAD_ARGUMENTS = [
    ("train_step.py", ["--batch", "0"], "argument --batch: expected a whole number >= 2, got 0"),
    ("stream_epoch.py", ["--images", "-5"], "argument --images: expected a whole number >= 1, got -5"),
    ("input_pipeline.py", ["--photos", "-3"], "argument --photos: expected a whole number >= 0, got -3"),
    ("compare_runs.py", ["--a", "/nonexistent/run", "--b", "/nonexistent/run"], "argument --a: '/nonexistent/run' does not exist"),
    ("serving_latency.py", ["--model-base-path", "/nonexistent/exports"], "argument --model-base-path: '/nonexistent/exports' does not exist"),
    ("serving_load.py", ["--requests", "0"], "argument --requests: expected a whole number >= 1, got 0"),
    ("torch_parity.py", ["--steps", "0"], "argument --steps: expected a positive integer, got 0"),
    ("end_to_end.py", ["--epochs", "two"], "argument --epochs: expected a whole number, got 'two'"),
    ("gpu_check.py", ["--budget", "soon"], "argument --budget: expected a number, got 'soon'"),
    ("train_step.py", ["--rewrite", "--precision", "float32"], "--rewrite is a way to compute in bfloat16: pass --precision bfloat16"),
    ("bf16_options.py", ["--options", "policy,faster"], "unknown option faster; choose from policy,rewrite,"),
]


# Runs each script's main as `python script args` would, in one process: every script
# imports TensorFlow before it parses, 3-5 s per process on a 2-core CPU. The exit code
# is SystemExit's, what a process would exit with; stdout and stderr are captured per script.
_ONE_PROCESS = """
import contextlib, io, json, os, runpy, sys, traceback
repo, cases = sys.argv[1], json.loads(sys.argv[2])
sys.path.insert(0, os.path.join(repo, "benchmarks"))
results = []
for script, args in cases:
    sys.argv = [os.path.join(repo, "benchmarks", script), *args]
    out, err, code = io.StringIO(), io.StringIO(), 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            runpy.run_path(sys.argv[0], run_name="__main__")
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 1
        except BaseException:
            traceback.print_exc()
            code = 1
    results.append({"script": script, "code": code, "stdout": out.getvalue(), "stderr": err.getvalue()})
print(json.dumps(results))
"""


def _run_each(python, cases, **env):
    """(script, args) cases run in one process: [{script, code, stdout, stderr}]."""
    done = subprocess.run([python, "-c", _ONE_PROCESS, REPO, json.dumps(cases)], capture_output=True, text=True,
                          env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", **env), timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_bad_benchmark_arguments_are_one_line_and_exit_2(python, tmp_path):
    # A representative set (the rest share benchmarks/common.Parser and its types), and
    # a CIFAR-10 folder that is missing: the one line names how to make it.
    missing = str(tmp_path / "no-cifar")
    cases = [(script, args) for script, args, _ in BAD_ARGUMENTS] + [("input_pipeline.py", ["--sizes", "32"])]
    messages = [message for _, _, message in BAD_ARGUMENTS] + [
        f"no CIFAR-10 folder at {missing} ($SIMSIAM_CIFAR10): make it with "
        "`python make_cifar10_folder.py --out data/cifar10`"]
    results = _run_each(python, cases, SIMSIAM_CIFAR10=missing)
    assert [r["script"] for r in results] == [script for script, _ in cases]
    for r, message in zip(results, messages):
        script = r["script"]
        lines = [l for l in r["stderr"].splitlines() if "error:" in l]
        assert r["code"] == 2 and len(lines) == 1 and "Traceback" not in r["stderr"], r
        assert lines[0].startswith(f"{script}: error: {message}"), lines[0]
        assert r["stdout"] == "", script


def test_benchmarks_read_data_cifar10_by_default(python):
    # Without SIMSIAM_CIFAR10 the benchmarks read data/cifar10 in the repository, where
    # `python make_cifar10_folder.py --out data/cifar10` writes it.
    if os.path.isdir(os.path.join(REPO, "data", "cifar10", "train")):
        pytest.skip("data/cifar10 exists in this checkout: the benchmarks would read it")
    env = {k: v for k, v in os.environ.items() if k != "SIMSIAM_CIFAR10"}
    done = subprocess.run([python, os.path.join(REPO, "benchmarks", "end_to_end.py")], cwd=REPO,
                          capture_output=True, text=True, env=dict(env, TF_CPP_MIN_LOG_LEVEL="3"), timeout=300)
    lines = [l for l in done.stderr.splitlines() if "error:" in l]
    assert done.returncode == 2 and lines == [
        "end_to_end.py: error: no CIFAR-10 folder at data/cifar10: make it with `python make_cifar10_folder.py "
        "--out data/cifar10` (run in the repository), or set SIMSIAM_CIFAR10 to a folder train|test/<class>/*.jpg"
    ], done.stderr[-2000:]


LIBRARY_MODULES = ("common.py", "step_clock.py", "emulated_hosts.py")  # imported by scripts and tests, no command line


def test_benchmarks_parse_with_the_shared_parser():
    folder = os.path.join(REPO, "benchmarks")
    scripts = sorted(n for n in os.listdir(folder) if n.endswith(".py") and n not in LIBRARY_MODULES)
    assert len(scripts) >= 13
    for name in scripts:
        text = open(os.path.join(folder, name)).read()
        assert "argparse.ArgumentParser(" not in text, f"{name}: use common.Parser (one-line errors, exit 2)"
        assert "type=int" not in text or name == "torch_parity.py", f"{name}: use common's checked types"


def test_cluster_table_multiplies_the_measured_figures_per_pair(python, tmp_path):
    # A service_wire.py result with round numbers: the projection is arithmetic on them.
    def wire(make_ms, uint8_bytes, jpeg_bytes):
        costs = {"make_ms_per_pair": make_ms, "cores_busy": 0.8, "uint8": {"worker_ms_per_pair": 0.0, "trainer_ms_per_pair": 0.0},
                 "snappy": {"worker_ms_per_pair": 0.1, "trainer_ms_per_pair": 0.1},
                 "jpeg": {"worker_ms_per_pair": 1.0, "trainer_ms_per_pair": 0.5}}
        rows = [{"cap_mbit": "unlimited", "augment_on": "device", "wire": "uint8", "bytes_per_pair": uint8_bytes,
                 "trainer_cpu_ms_per_pair": 0.25},
                {"cap_mbit": "unlimited", "augment_on": "device", "wire": "jpeg", "bytes_per_pair": jpeg_bytes,
                 "trainer_cpu_ms_per_pair": 1.0},
                {"cap_mbit": 100.0, "augment_on": "device", "wire": "uint8", "bytes_per_pair": 1e9,
                 "trainer_cpu_ms_per_pair": 9.0}]  # a capped row: not read
        return "table...\n" + json.dumps({"cpu_ms_per_pair": {"device": costs}, "rows": rows}) + "\n"

    (tmp_path / "224.txt").write_text(wire(4.0, 300_000, 30_000))
    (tmp_path / "32.txt").write_text(wire(1.0, 6_000, 2_000))
    result = subprocess.run([python, os.path.join(REPO, "benchmarks", "cluster_table.py"), "--wire-224",
                             str(tmp_path / "224.txt"), "--wire-32", str(tmp_path / "32.txt"),
                             "--gpu-pairs-224", "2500"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    rows = json.loads(result.stdout.strip().splitlines()[-1])["rows"]
    r50x8 = next(r for r in rows if r["model"].startswith("ResNet-50") and r["gpus"] == 8)
    assert r50x8["pairs_per_s"] == 20_000
    # 80 cores' CPU time makes the pairs, kept 80% busy: 100 cores; 25 more encode them as JPEG.
    assert math.isclose(r50x8["worker_cores_uint8"], 20_000 * 4.0 / 1e3 / 0.8)
    assert math.isclose(r50x8["worker_cores_jpeg"], 20_000 * 5.0 / 1e3 / 0.8)
    assert math.isclose(r50x8["gbit_uint8"], 20_000 * 300_000 * 8 / 1e9)  # 48 Gbit/s
    assert math.isclose(r50x8["trainer_cores_jpeg"], 20.0)
    # 48 Gbit/s fits no 10 or 25 Gbit/s NIC at 70%; jpeg's 4.8 fits both; uint8 fits 100.
    assert (r50x8["nic_10"], r50x8["nic_25"], r50x8["nic_100"]) == ("jpeg", "jpeg", "uint8")
    r18x1 = next(r for r in rows if r["model"].startswith("ResNet-18") and r["gpus"] == 1)
    assert r18x1["pairs_per_s"] == 19_300 and r18x1["nic_10"] == "uint8"  # 0.93 Gbit/s
    # And the files must hold a result.
    (tmp_path / "empty.txt").write_text("no json here\n")
    bad = subprocess.run([python, os.path.join(REPO, "benchmarks", "cluster_table.py"), "--wire-224",
                          str(tmp_path / "empty.txt"), "--wire-32", str(tmp_path / "32.txt")],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode != 0 and "holds no JSON line of service_wire.py" in bad.stderr


def test_service_wire_cpu_costs_per_pair(python):
    # The in-process half of service_wire.py (the hosts half runs in test_emulated_hosts.py).
    out = _run(python, "service_wire.py", "--quick", "--cpu-only", "--augment", "device")
    costs = out["cpu_ms_per_pair"]["device"]
    assert _positive(costs["make_ms_per_pair"]) and 0 < costs["cores_busy"] <= 1.05
    assert costs["uint8"]["worker_ms_per_pair"] == 0 and costs["uint8"]["payload_bytes_per_pair"] == 2 * 3 * 64 * 64
    for wire in ("snappy", "jpeg"):
        assert _positive(costs[wire]["worker_ms_per_pair"]) and _positive(costs[wire]["trainer_ms_per_pair"])
    assert 0 < costs["jpeg"]["payload_bytes_per_pair"] < costs["uint8"]["payload_bytes_per_pair"] / 3
    assert out["rows"] == []  # no hosts asked for
