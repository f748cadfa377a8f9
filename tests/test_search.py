"""Embeddings ready for search: bulk embedding of a folder (resumable), exact
nearest-neighbour search, precision@k and the contact sheet (serving/client.py,
serving/similar.py), against the local server on a normalised export."""

import io
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from serving import local_server, similar
from serving.client import ClientError, EmbeddingClient, embed_folder, read_embeddings
from simsiam_tf import export
from simsiam_tf.config import make_config
from simsiam_tf.model import build_model

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IMAGES = np.random.default_rng(3).integers(0, 256, (7, 32, 32, 3), dtype=np.uint8)


def _encode(image, fmt):
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format=fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return buf.getvalue()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    # An untrained tiny encoder is enough: these tests check plumbing, not quality.
    root = tmp_path_factory.mktemp("search")
    config = make_config("digits", width=8, proj_dim=64, pred_dim=16)
    base = str(root / "models" / "simsiam")
    export.export_saved_model(build_model(config), config, base, normalize=True)
    with local_server.running("simsiam", base, port=0, poll_seconds=0.2) as (url, _):
        yield url


@pytest.fixture
def folder(tmp_path):
    """cat/0.png cat/1.jpg cat/2.png dog/3.jpg dog/deep/4.png 5.PNG 6.png, and a text file."""
    root = tmp_path / "photos"
    names = ["cat/0.png", "cat/1.jpg", "cat/2.png", "dog/3.jpg", "dog/deep/4.png", "5.PNG", "6.png"]
    for name, image in zip(names, IMAGES):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(_encode(image, "JPEG" if name.endswith(".jpg") else "PNG"))
    (root / "notes.txt").write_text("not an image")
    return root, sorted(names)


def test_bulk_embedding_matches_direct_client_embeddings(server, folder, tmp_path, capsys):
    root, names = folder
    out = str(tmp_path / "emb.jsonl")
    client = EmbeddingClient(server, "simsiam", batch_size=3)
    assert embed_folder(client, str(root), out, progress=False) == 0
    records, size = read_embeddings(out)
    assert [r["image"] for r in records] == names and size == os.path.getsize(out)
    assert {r["model_version"] for r in records} == {1}
    # The same batches as the bulk run: a forward pass's round-off depends on the batch.
    direct = EmbeddingClient(server, "simsiam", batch_size=3).embed([(root / n).read_bytes() for n in names])
    got = np.array([r["embedding"] for r in records], np.float32)
    np.testing.assert_array_equal(got, np.array(direct, np.float32))  # 9 digits hold a float32 exactly
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)  # the export is normalised
    assert "7 embedded" in capsys.readouterr().err


def test_a_bad_image_is_named_skipped_and_counted_by_the_command(server, folder, tmp_path):
    root, names = folder
    (root / "dog" / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    out = tmp_path / "emb.jsonl"
    cmd = [sys.executable, "-m", "serving.client", "--url", server, "--folder", str(root), "--out", str(out),
           "--batch-size", "4"]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1, done.stderr
    assert "Traceback" not in done.stderr
    assert [l for l in done.stderr.splitlines() if l.startswith("client: skipped")] == [
        l for l in done.stderr.splitlines() if l.startswith("client: skipped dog/broken.jpg: ")]
    assert "7 embedded" in done.stderr and "1 skipped" in done.stderr
    assert [json.loads(l)["image"] for l in out.read_text().splitlines()] == names


def test_a_killed_run_resumes_where_it_stopped(server, folder, tmp_path, monkeypatch):
    root, names = folder
    clean = tmp_path / "clean.jsonl"
    assert embed_folder(EmbeddingClient(server, "simsiam", batch_size=2), str(root), str(clean), progress=False) == 0
    lines = clean.read_bytes().splitlines(keepends=True)
    # A run killed while writing: three whole records, then half of the fourth.
    partial = tmp_path / "partial.jsonl"
    partial.write_bytes(b"".join(lines[:3]) + lines[3][: len(lines[3]) // 2])

    client = EmbeddingClient(server, "simsiam", batch_size=2)
    sent, real = [], client._predict
    monkeypatch.setattr(client, "_predict", lambda batch: sent.extend(batch) or real(batch))
    assert embed_folder(client, str(root), str(partial), progress=False) == 0
    assert sent == [(root / n).read_bytes() for n in names[3:]]  # only what was not finished
    resumed, _ = read_embeddings(str(partial))
    expected, _ = read_embeddings(str(clean))
    assert [r["image"] for r in resumed] == names and partial.read_bytes()[-1:] == b"\n"
    assert resumed[:3] == expected[:3]  # the finished records are kept as they were
    # The resumed requests batch the images differently, and a forward pass's round-off
    # depends on its batch: equal within float32 round-off, not bit for bit.
    np.testing.assert_allclose([r["embedding"] for r in resumed], [r["embedding"] for r in expected], atol=1e-6)

    sent.clear()
    before = partial.read_bytes()
    assert embed_folder(client, str(root), str(partial), progress=False) == 0
    assert sent == [] and partial.read_bytes() == before  # a finished file is left alone


def test_resume_refuses_another_model_version_and_foreign_files(server, folder, tmp_path):
    root, _ = folder
    old = tmp_path / "old.jsonl"
    old.write_text(json.dumps({"image": "cat/0.png", "model_version": 7, "embedding": [1.0]}) + "\n")
    with pytest.raises(ClientError, match=r"model version 7 and the server serves version 1; pass --version 7"):
        embed_folder(EmbeddingClient(server, "simsiam"), str(root), str(old), progress=False)
    foreign = tmp_path / "foreign.jsonl"
    foreign.write_text('{"image": "a.png", "embedding": [1.0]}\nhello\n')
    with pytest.raises(ClientError, match=r"line 2: not an embeddings record \('hello'\)"):
        embed_folder(EmbeddingClient(server, "simsiam"), str(root), str(foreign), progress=False)


def test_exact_search_returns_the_known_neighbours():
    # Unit vectors at 0, 10, ..., 90 degrees, scaled differently: cosine ignores the scale.
    angles = np.radians(np.arange(0, 100, 10))
    bank = np.stack([np.cos(angles), np.sin(angles)], 1) * np.arange(1, 11)[:, None]
    query = np.array([[np.cos(np.radians(12)), np.sin(np.radians(12))], [0.0, 5.0]])
    idx, sims = similar.top_k(query, bank, 3)
    assert idx.tolist() == [[1, 2, 0], [9, 8, 7]]
    np.testing.assert_allclose(sims[0], np.cos(np.radians([2, 8, 12])), atol=1e-6)
    idx, _ = similar.top_k(bank[[4]], bank, 2, exclude=np.array([4]))  # the query itself left out
    assert sorted(idx[0].tolist()) == [3, 5]

    rng = np.random.default_rng(0)
    bank, queries = rng.normal(size=(200, 16)), rng.normal(size=(30, 16))
    idx, sims = similar.top_k(queries, bank, 5, chunk=7)  # several chunks
    cos = (queries / np.linalg.norm(queries, axis=1, keepdims=True)) @ (bank / np.linalg.norm(bank, axis=1, keepdims=True)).T
    assert idx.tolist() == np.argsort(-cos, axis=1)[:, :5].tolist()
    np.testing.assert_allclose(sims, np.take_along_axis(cos, idx, 1), atol=1e-5)


def test_exact_search_does_not_copy_a_float32_bank():
    # 1,000,000 x 512 embeddings are 2 GiB; a normalised copy would double that.
    import tracemalloc

    rng = np.random.default_rng(1)
    bank = rng.normal(size=(20000, 128)).astype(np.float32)  # 10 MiB
    queries = rng.normal(size=(64, 128)).astype(np.float32)
    tracemalloc.start()
    try:
        idx, _ = similar.top_k(queries, bank, 5, chunk=2)  # per step: a few 2 x 20000 arrays
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < bank.nbytes / 4, f"top_k allocated {peak / 2**20:.1f} MiB for a {bank.nbytes / 2**20:.0f} MiB bank"
    unit = bank / np.linalg.norm(bank, axis=1, keepdims=True)
    assert (idx[:, 0] == np.argmax(queries @ unit.T, axis=1)).all()


def test_precision_at_k():
    indices = np.array([[0, 1, 2], [2, 3, 0]])
    assert similar.precision_at(["a", "a", "b", "b"], ["a", "b"], indices) == pytest.approx((2 / 3 + 2 / 3) / 2)
    assert similar.label_of("cat/0001.jpg") == "cat" and similar.label_of("top.png") is None


def test_contact_sheet_and_precision_commands(server, folder, tmp_path, capsys):
    root, names = folder
    emb = str(tmp_path / "emb.jsonl")
    assert embed_folder(EmbeddingClient(server, "simsiam"), str(root), emb, progress=False) == 0
    sheet = tmp_path / "sheet.png"
    query_file = tmp_path / "cat" / "q.png"
    query_file.parent.mkdir()
    query_file.write_bytes(_encode(IMAGES[0], "PNG"))
    argv = ["--embeddings", emb, "--root", str(root), "--query", "cat/1.jpg", str(query_file), "--k", "3",
            "--out", str(sheet), "--url", server]
    assert similar.main(argv) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("cat/1.jpg: ") and "cat/1.jpg (" not in out[0]  # itself excluded
    assert out[1].startswith(f"{query_file}: cat/0.png (1.000)")  # the same pixels, embedded by the server
    with Image.open(sheet) as image:
        g, c, cap = similar.GAP, similar.CELL, similar.CAPTION
        assert image.format == "PNG" and image.size == (g + 4 * (c + g), g + 2 * (c + cap + g))

    labelled = [n for n in names if "/" in n]
    with open(emb) as f, open(tmp_path / "labelled.jsonl", "w") as g_:
        g_.writelines(l for l in f if json.loads(l)["image"] in labelled)
    argv = ["--embeddings", str(tmp_path / "labelled.jsonl"), "--queries-from", str(tmp_path / "labelled.jsonl"),
            "--precision-at", "3"]
    assert similar.main(argv) == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith("precision@3: ") and "5 queries against 5 images" in line


def test_precision_command_leaves_an_image_out_of_its_own_neighbours(tmp_path, capsys):
    vectors = {"a/0.png": [1, 0], "a/1.png": [0.9, 0.1], "b/0.png": [0, 1], "b/1.png": [0.1, 0.9]}
    bank = tmp_path / "bank.jsonl"
    bank.write_text("".join(json.dumps({"image": n, "model_version": 1, "embedding": v}) + "\n"
                            for n, v in vectors.items()))
    copy = tmp_path / "queries.jsonl"
    copy.write_bytes(bank.read_bytes())
    # The same file: each image's 2 neighbours are its class-mate and one of the other class.
    assert similar.main(["--embeddings", str(bank), "--queries-from", str(bank), "--precision-at", "2"]) == 0
    assert capsys.readouterr().out.startswith("precision@2: 0.5000 (4 queries against 4 images")
    # Another file (a test split against a training split): nothing is left out.
    assert similar.main(["--embeddings", str(bank), "--queries-from", str(copy), "--precision-at", "2"]) == 0
    assert capsys.readouterr().out.startswith("precision@2: 1.0000 (4 queries against 4 images")


def test_similar_errors_are_one_line(server, folder, tmp_path, capsys):
    root, _ = folder
    emb = str(tmp_path / "emb.jsonl")
    assert embed_folder(EmbeddingClient(server, "simsiam"), str(root), emb, progress=False) == 0
    capsys.readouterr()
    assert similar.main(["--embeddings", emb, "--query", "no/such.png"]) == 1
    assert capsys.readouterr().err.strip() == (
        f"similar: error: --query 'no/such.png' is not a name in {emb}, nor an image file or folder")
    assert similar.main(["--embeddings", str(tmp_path / "none.jsonl"), "--query", "x"]) == 1
    assert "holds no embeddings" in capsys.readouterr().err


def test_a_lost_server_is_one_line_that_says_the_file_is_kept(folder, tmp_path):
    root, _ = folder
    out = tmp_path / "emb.jsonl"
    out.write_text(json.dumps({"image": "cat/0.png", "model_version": 1, "embedding": [1.0]}) + "\n")
    cmd = [sys.executable, "-m", "serving.client", "--url", "http://127.0.0.1:9", "--retries", "0",
           "--version", "1", "--folder", str(root), "--out", str(out), "--no-progress"]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=60)
    assert done.returncode == 1 and "Traceback" not in done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("client: error: POST http://127.0.0.1:9/v1/models/simsiam/versions/1")
    assert lines[0].endswith("(what is in it is kept: run the same command again to continue)")
