"""The approximate index for large collections (serving/index.py, serving/similar.py
--index, benchmarks/ann_search.py). usearch and faiss-cpu are an optional extra: these
tests skip without them, naming the install command, except in CI (the variable CI
set), where a missing library fails them."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from serving import index as ann
from serving import similar
from serving.client import ClientError, read_embeddings

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
INSTALL = "pip install -r requirements-search.txt"


def need(module: str):
    """Import `module` (usearch.index, faiss), or skip naming the install command; fail under CI."""
    try:
        return __import__(module)
    except ImportError:
        if os.environ.get("CI"):
            pytest.fail(f"{module} is not installed in CI; .ci/run must run {INSTALL}")
        pytest.skip(f"{module} is not installed: {INSTALL}")


LIBRARY = {"usearch": "usearch.index", "faiss": "faiss"}


@pytest.fixture(params=ann.LIBRARIES)
def library(request):
    need(LIBRARY[request.param])
    return request.param


def clustered(count, dim=16, clusters=8, seed=0):
    """Unit vectors around `clusters` centres; names <cluster>/<i>.jpg."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, dim))
    labels = rng.integers(clusters, size=count)
    x = centres[labels] + 0.3 * rng.standard_normal((count, dim))
    return [f"c{c}/{i:04d}.jpg" for i, c in enumerate(labels)], (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def write_jsonl(path, names, vectors, version=1):
    with open(path, "w") as f:
        for n, v in zip(names, vectors):
            f.write(json.dumps({"image": n, "model_version": version, "embedding": [float(x) for x in v]}) + "\n")
    return str(path)


def test_the_streaming_reader_gives_the_client_reader_s_records(tmp_path):
    names, vectors = clustered(10)
    path = write_jsonl(tmp_path / "e.jsonl", names, vectors)
    with open(path, "a") as f:
        f.write('{"image": "half-writ')  # a killed client's last line: not a record
    batches = list(ann.iter_batches(path, size=4))
    assert [len(n) for n, _, _ in batches] == [4, 4, 2]
    records, _ = read_embeddings(path)
    assert sum((n for n, _, _ in batches), []) == [r["image"] for r in records] == names
    np.testing.assert_array_equal(np.concatenate([v for _, v, _ in batches]),
                                  np.array([r["embedding"] for r in records], np.float32))
    assert {v for _, _, v in batches} == {1}


def test_the_reader_streams_records_before_a_bad_line(tmp_path):
    # A reader of the whole file would fail before giving anything: this one gives lines 1-3 first.
    names, vectors = clustered(3)
    path = write_jsonl(tmp_path / "e.jsonl", names, vectors)
    with open(path, "a") as f:
        f.write("not json\n")
    seen = []
    with pytest.raises(ClientError, match=r"e.jsonl, line 4: not an embeddings record"):
        for number, record in ann.iter_records(path):
            seen.append(number)
    assert seen == [1, 2, 3]


def test_the_reader_refuses_mixed_dimensions_and_versions(tmp_path):
    names, vectors = clustered(4)
    path = write_jsonl(tmp_path / "e.jsonl", names, vectors)
    with open(path, "a") as f:
        f.write(json.dumps({"image": "x.jpg", "model_version": 1, "embedding": [0.5] * 3}) + "\n")
    with pytest.raises(ClientError, match="line 5: 3 dimensions after 16"):
        list(ann.iter_batches(path))
    path = write_jsonl(tmp_path / "v.jsonl", names, vectors)
    with open(path, "a") as f:
        f.write(json.dumps({"image": "x.jpg", "model_version": 2, "embedding": [0.5] * 16}) + "\n")
    with pytest.raises(ClientError, match="line 5: model version 2 after 1"):
        list(ann.iter_batches(path))


def test_build_save_load_finds_what_exact_search_finds(library, tmp_path):
    names, vectors = clustered(600)
    path = write_jsonl(tmp_path / "e.jsonl", names, vectors, version=3)
    out = str(tmp_path / "bank.idx")
    ann.build(path, out, library)
    assert sorted(os.listdir(tmp_path)) == ["bank.idx", "bank.idx.names", "e.jsonl"]  # no temporary file left
    index, stored, header = ann.open_index(out)
    assert stored == names and len(index) == 600
    assert header["library"] == library and header["dim"] == 16 and header["model_version"] == 3
    queries = clustered(50, seed=1)[1]
    ids, sims = index.search(queries, 10)
    exact, exact_sims = similar.top_k(queries, vectors, 10)
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(ids, exact)])
    assert recall >= 0.95, recall
    np.testing.assert_allclose(sims[:, 0], exact_sims[:, 0], atol=2e-3)  # float16 vectors: cosines to ~1e-3
    assert np.all(np.diff(sims, axis=1) <= 0)  # most similar first


def test_a_stored_vector_finds_itself_unless_excluded(library, tmp_path):
    names, vectors = clustered(200)
    out = str(tmp_path / "bank.idx")
    ann.build(write_jsonl(tmp_path / "e.jsonl", names, vectors), out, library)
    index, _, _ = ann.open_index(out)
    np.testing.assert_allclose(index.vector(7), vectors[7], atol=1e-3)
    ids, _ = index.search(vectors[:20], 5)
    assert list(ids[:, 0]) == list(range(20))
    ids, _ = index.search(vectors[:20], 5, exclude=np.arange(20))
    assert ids.shape == (20, 5) and not np.any(ids == np.arange(20)[:, None]) and np.all(ids >= 0)


def test_a_failed_build_keeps_the_old_index_and_leaves_no_temporary_file(tmp_path):
    need(LIBRARY[ann.LIBRARIES[0]])  # the default library
    names, vectors = clustered(50)
    out = str(tmp_path / "bank.idx")
    ann.build(write_jsonl(tmp_path / "e.jsonl", names, vectors), out)
    before = open(out, "rb").read(), open(out + ".names").read()
    bad = write_jsonl(tmp_path / "bad.jsonl", names, vectors)
    with open(bad, "a") as f:
        f.write("{}\n")
    with pytest.raises(ClientError, match="line 51"):
        ann.build(bad, out)
    assert (open(out, "rb").read(), open(out + ".names").read()) == before
    assert sorted(os.listdir(tmp_path)) == ["bad.jsonl", "bank.idx", "bank.idx.names", "e.jsonl"]


def test_an_index_and_names_that_disagree_are_refused(tmp_path):
    need(LIBRARY[ann.LIBRARIES[0]])  # the default library
    names, vectors = clustered(30)
    out = str(tmp_path / "bank.idx")
    ann.build(write_jsonl(tmp_path / "e.jsonl", names, vectors), out)
    with open(out + ".names") as f:
        lines = f.readlines()
    with open(out + ".names", "w") as f:
        f.writelines(lines[:-1])
    with pytest.raises(ClientError, match="holds 30 vectors but .* 29 names; rebuild both"):
        ann.open_index(out)


def test_similar_with_index_prints_what_exact_search_prints(library, tmp_path, capsys):
    names, vectors = clustered(300)
    emb = write_jsonl(tmp_path / "e.jsonl", names, vectors)
    out = str(tmp_path / "bank.idx")
    ann.build(emb, out, library)
    queries = write_jsonl(tmp_path / "q.jsonl", *clustered(40, seed=2))
    assert similar.main(["--embeddings", emb, "--queries-from", queries, "--precision-at", "5"]) == 0
    exact = capsys.readouterr().out
    assert similar.main(["--index", out, "--queries-from", queries, "--precision-at", "5"]) == 0
    approximate = capsys.readouterr().out
    assert f"approximate search, {library} HNSW f16" in approximate and "exact cosine search" in exact
    assert approximate.split(" (")[0] == exact.split(" (")[0]  # the same precision@5
    # Leave-one-out on the indexed file itself: no image is its own neighbour.
    assert similar.main(["--index", out, "--queries-from", emb, "--precision-at", "5"]) == 0
    assert "300 queries against 300 images" in capsys.readouterr().out
    # A name as the query: its stored vector, itself left out; the same lines as exact search.
    query = ["--query", names[0], names[1], "--k", "4"]
    assert similar.main(["--embeddings", emb, *query]) == 0
    exact_lines = capsys.readouterr().out
    assert similar.main(["--index", out, *query]) == 0
    lines = capsys.readouterr().out
    assert [line.split(": ")[0] for line in lines.splitlines()] == names[:2]
    assert names[0] + " (" not in lines.splitlines()[0]
    # The same neighbours; near-ties may swap places (the index stores float16 vectors).
    strip = lambda text: [{n.split(" (")[0] for n in line.split(": ")[1].split(", ")} for line in text.splitlines()]
    assert strip(lines) == strip(exact_lines)


def test_similar_wants_one_of_embeddings_and_index(tmp_path, capsys):
    with pytest.raises(SystemExit) as stop:
        similar.main(["--queries-from", "q.jsonl", "--precision-at", "5"])
    assert stop.value.code == 2
    assert "give --embeddings FILE (exact search) or --index PATH" in capsys.readouterr().err
    assert similar.main(["--index", str(tmp_path / "missing.idx"), "--query", "x"]) == 1
    assert "missing.idx does not exist; build it with python -m serving.index" in capsys.readouterr().err


def test_a_missing_library_names_the_install_command(monkeypatch):
    monkeypatch.setitem(sys.modules, "faiss", None)  # import faiss now raises ImportError
    with pytest.raises(ClientError, match=r"'faiss' is not installed; install it with pip install -r requirements-search.txt"):
        ann.AnnIndex("faiss", 8)


def test_the_skip_turns_into_a_failure_under_ci(monkeypatch):
    monkeypatch.setitem(sys.modules, "usearch_missing_for_test", None)
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match=INSTALL):
        need("usearch_missing_for_test")
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match=INSTALL):
        need("usearch_missing_for_test")


def test_the_command_line_builds_an_index(tmp_path):
    need(LIBRARY[ann.LIBRARIES[0]])  # the default library
    names, vectors = clustered(40)
    emb = write_jsonl(tmp_path / "e.jsonl", names, vectors)
    done = subprocess.run([sys.executable, "-m", "serving.index", "--embeddings", emb, "--index", str(tmp_path / "b.faiss")],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "(40 vectors of 16 dimensions, faiss HNSW, f16;" in done.stdout
    done = subprocess.run([sys.executable, "-m", "serving.index", "--embeddings", str(tmp_path / "none.jsonl"),
                           "--index", str(tmp_path / "c.faiss")], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1 and done.stderr.count("\n") == 1 and "none.jsonl" in done.stderr


def test_the_benchmark_measures_recall_against_exact_search(tmp_path):
    need("usearch.index")
    need("faiss")
    names, vectors = clustered(300)
    emb = write_jsonl(tmp_path / "e.jsonl", names, vectors)
    for extra in (["--count", "3000", "--dim", "16", "--clusters", "30"], ["--embeddings", emb]):
        done = subprocess.run([sys.executable, os.path.join(REPO, "benchmarks", "ann_search.py"), *extra,
                               "--queries", "50", "--threads", "1"], cwd=REPO, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-2000:]
        result = json.loads(done.stdout.strip().splitlines()[-1])
        rows = {r["method"]: r for r in result["rows"]}
        assert set(rows) == {"exact", "usearch", "faiss"}
        assert rows["exact"]["recall@10"] == 1.0
        for m in ("usearch", "faiss"):
            assert 0.8 <= rows[m]["recall@10"] <= 1.0 and rows[m]["build_s"] > 0 and rows[m]["qps_1"] > 0
            assert rows[m]["peak_rss_mib"] > 0 and rows[m]["mib"] > 0
