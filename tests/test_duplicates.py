"""Near-duplicates (serving/duplicates.py): pairs above a cosine threshold, clusters as
connected components, the threshold chosen from nearest-neighbour distances, the command
line and its files. Constructed embeddings with planted near-copies of known similarity;
no model, no server."""

import csv
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from serving import duplicates
from serving.duplicates import (
    DuplicateError,
    choose_threshold,
    connected_clusters,
    find_duplicates,
    nearest_similarities,
    pairs_above,
)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _near_copy(x, cosine, rng):
    """A unit vector at exactly `cosine` to the unit vector x, in a random direction."""
    noise = rng.normal(size=x.shape)
    noise -= (noise @ x) * x
    noise /= np.linalg.norm(noise)
    return cosine * x + np.sqrt(1 - cosine**2) * noise


def _planted(rng, n=300, dim=32, offset=0.0, spread=1.0, groups=((0, 0.995), (1, 0.99), (1, 0.993), (2, 0.998))):
    """n base vectors (offset + spread * Gaussian, unit length), then near-copies: each
    (row, cosine) of `groups` appends a copy of that base row at that cosine. Returns the
    matrix and the planted clusters as sorted index lists."""
    base = _unit(offset + spread * rng.normal(size=(n, dim)))
    copies, planted = [], {}
    for row, cosine in groups:
        copies.append(_near_copy(base[row], cosine, rng))
        planted.setdefault(row, [row]).append(n + len(copies) - 1)
    return np.concatenate([base, np.array(copies)]).astype(np.float32), sorted(planted.values(), key=lambda m: (-len(m), m[0]))


@pytest.mark.parametrize("offset, spread", [(0.0, 1.0), (1.0, 0.08)],
                         ids=["signed features", "positive features with cosines near 1 (ReLU-like)"])
def test_planted_near_copies_give_exactly_those_clusters(offset, spread):
    rng = np.random.default_rng(0)
    matrix, planted = _planted(rng, offset=offset, spread=spread,
                               groups=((0, 0.9995), (1, 0.999), (1, 0.9993), (2, 0.9998), (7, 0.9991)))
    found = find_duplicates(matrix)  # threshold chosen from the data
    assert [list(c) for c in found.clusters] == planted
    # Pairs: every planted copy with its original, the two copies of row 1 with each other, nothing else.
    pairs = set(zip(found.pair_i.tolist(), found.pair_j.tolist()))
    assert {(0, 300), (1, 301), (1, 302), (2, 303), (7, 304)} <= pairs <= {(0, 300), (1, 301), (1, 302), (301, 302),
                                                                           (2, 303), (7, 304)}


def test_the_chosen_threshold_separates_the_planted_pairs_from_ordinary_neighbours():
    rng = np.random.default_rng(1)
    matrix, planted = _planted(rng, n=1000, dim=64, offset=1.0, spread=0.1,
                               groups=[(r, c) for r, c in zip(range(0, 200, 4), np.linspace(0.9990, 0.99995, 50))])
    nearest = nearest_similarities(matrix)
    chosen = choose_threshold(nearest)
    copies = np.arange(1000, 1050)
    ordinary = np.setdiff1d(np.arange(1000), np.arange(0, 200, 4))
    assert nearest[ordinary].max() < chosen.value <= nearest[copies].min()
    assert chosen.fitted == 950  # the fit left out exactly the 50 pairs, copies and originals
    assert "Weibull law" in chosen.explain()


@pytest.mark.parametrize("copies", [10, 250])
def test_the_threshold_holds_while_near_copies_are_a_minority(copies):
    # 250 copies of 1000 images: 500 of 1250 images (40%) are in planted pairs, each
    # copy three times closer to its original than the median nearest neighbour.
    rng = np.random.default_rng(8)
    base = _unit(1.0 + 0.1 * rng.normal(size=(1000, 64)))
    median = np.median(1 - nearest_similarities(base.astype(np.float32)))
    planted = [_near_copy(base[r], 1 - median / 3, rng) for r in range(copies)]
    found = find_duplicates(np.concatenate([base, planted]).astype(np.float32))
    pairs = set(zip(found.pair_i.tolist(), found.pair_j.tolist()))
    assert pairs == {(r, 1000 + r) for r in range(copies)}


def test_without_duplicates_the_chosen_threshold_finds_almost_nothing():
    # No near-copies: the rule may cut off the far tail of ordinary neighbours, but only
    # a handful, not a share of the collection.
    rng = np.random.default_rng(2)
    matrix = _unit(1.0 + 0.1 * rng.normal(size=(2000, 64))).astype(np.float32)
    found = find_duplicates(matrix)
    assert len(found.pair_i) <= 5
    assert found.threshold > np.median(found.nearest)


def test_more_expected_chance_gives_a_looser_threshold_and_a_spread_of_zero_is_floored():
    nearest = np.random.default_rng(3).uniform(0.95, 0.99, 500)
    assert choose_threshold(nearest, expected=5).value < choose_threshold(nearest, expected=0.5).value
    same = choose_threshold(np.full(10, 0.9))  # every distance alike: the floor keeps the cut below the median
    assert 0.9 < same.value < 1.0
    with pytest.raises(DuplicateError, match="at least 2 images"):
        choose_threshold(np.array([0.5]))


def test_components_merge_transitively():
    # a~b and b~c above the threshold, a and c below it: one cluster of three.
    t = 0.98
    theta = np.arccos(0.99)
    a, b, c = (np.array([np.cos(k * theta), np.sin(k * theta), 0, 0]) for k in range(3))
    assert a @ c < t
    far = np.array([[0, 0, 1, 0], [0, 0, 0, 1], [0, 0, 0.6, 0.8]])
    matrix = np.stack([a, far[0], b, far[1], c, far[2]]).astype(np.float32)
    found = find_duplicates(matrix, threshold=t)
    assert set(zip(found.pair_i.tolist(), found.pair_j.tolist())) == {(0, 2), (2, 4)}
    assert [list(m) for m in found.clusters] == [[0, 2, 4]]
    rows = duplicates.cluster_rows(list("abcdef"), matrix, found)
    assert [r["image"] for r in rows] == ["a", "c", "e"]
    assert rows[2]["similarity"] == pytest.approx(a @ c, abs=1e-6)  # to the first member: below the threshold
    assert rows[2]["max_pair_similarity"] == pytest.approx(0.99, abs=1e-6)  # its best pair: above it


def test_clusters_come_largest_first_then_by_first_member():
    pairs_i, pairs_j = np.array([5, 0, 2, 3]), np.array([6, 1, 8, 8])
    assert [list(m) for m in connected_clusters(10, pairs_i, pairs_j)] == [[2, 3, 8], [0, 1], [5, 6]]
    assert connected_clusters(4, np.zeros(0, np.int64), np.zeros(0, np.int64)) == []


@pytest.mark.parametrize("chunk", [1, 7, 64, 1024])
def test_chunked_pairs_equal_brute_force_at_any_chunk_size(chunk):
    rng = np.random.default_rng(4)
    matrix = rng.normal(size=(150, 8)).astype(np.float32)
    i, j, s = pairs_above(matrix, 0.8, chunk=chunk)
    unit = _unit(matrix.astype(np.float64))
    full = unit @ unit.T
    want_i, want_j = np.nonzero(np.triu(full >= 0.8, k=1))
    assert len(want_i) > 20  # the test means something
    assert np.array_equal(i, want_i) and np.array_equal(j, want_j)
    assert np.allclose(s, full[want_i, want_j], atol=1e-5)


def test_too_many_pairs_is_an_error_that_names_the_fix():
    matrix = np.ones((50, 4), np.float32)
    with pytest.raises(DuplicateError, match="pass a higher --threshold"):
        pairs_above(matrix, 0.5, chunk=8, max_pairs=100)
    with pytest.raises(DuplicateError, match=r"outside \[-1, 1\]"):
        find_duplicates(matrix, threshold=1.5)


def _collection(tmp_path, rng):
    """(embeddings file, image folder, names): 300 images class/NNN.png and three planted
    near-copies (of images 0, 1 and 1), the images themselves 4 px PNGs under tmp_path/photos."""
    matrix, _ = _planted(rng, groups=((0, 0.999), (1, 0.998), (1, 0.9985)))
    names = [f"{'cat' if k % 2 else 'dog'}/{k:03d}.png" for k in range(len(matrix))]
    root = tmp_path / "photos"
    for k, name in enumerate(names):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full((4, 4, 3), k % 256, np.uint8)).save(root / name)
    path = tmp_path / "emb.jsonl"
    path.write_text("".join(json.dumps({"image": n, "model_version": 3, "embedding": v.tolist()}) + "\n"
                            for n, v in zip(names, matrix)))
    return str(path), str(root), names


def test_the_command_writes_csv_jsonl_and_one_sheet_per_cluster(tmp_path, capsys):
    emb, root, names = _collection(tmp_path, np.random.default_rng(5))
    out_csv, sheets = str(tmp_path / "dups.csv"), str(tmp_path / "sheets")
    assert duplicates.main(["--embeddings", emb, "--out", out_csv, "--root", root, "--sheets", sheets]) == 0
    printed = capsys.readouterr().out
    assert "nearest-neighbour cosine of 303 images: min" in printed and "threshold 0." in printed
    assert "2 clusters of 2 to 3 images (5 images)" in printed
    with open(out_csv) as f:
        rows = list(csv.DictReader(f))
    assert [(int(r["cluster"]), int(r["size"]), r["image"]) for r in rows] == [
        (1, 3, names[1]), (1, 3, names[301]), (1, 3, names[302]), (2, 2, names[0]), (2, 2, names[300])]
    assert float(rows[0]["similarity"]) == pytest.approx(1.0, abs=1e-6)
    assert float(rows[1]["similarity"]) == pytest.approx(0.998, abs=1e-5)
    assert sorted(os.listdir(sheets)) == ["cluster-0001.png", "cluster-0002.png"]
    with Image.open(os.path.join(sheets, "cluster-0001.png")) as sheet:  # the first member and two others
        assert sheet.width == duplicates.contact_sheet([], 2).width
    out_jsonl = str(tmp_path / "dups.jsonl")
    assert duplicates.main(["--embeddings", emb, "--threshold", "0.9975", "--out", out_jsonl]) == 0
    assert "threshold" not in capsys.readouterr().out.split("\n")[0]  # given, not chosen: no distribution printed
    with open(out_jsonl) as f:
        records = [json.loads(line) for line in f]
    assert [r["image"] for r in records] == [r["image"] for r in rows]
    assert set(records[0]) == set(duplicates.COLUMNS)
    assert not [f for f in os.listdir(tmp_path) if ".tmp-" in f]  # written through a temporary name, renamed


def test_the_command_runs_as_a_module(tmp_path):
    emb, _, _ = _collection(tmp_path, np.random.default_rng(6))
    done = subprocess.run([sys.executable, "-m", "serving.duplicates", "--embeddings", emb, "--threshold", "0.99"],
                          check=False, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    # Copy to original (3 pairs), and the two copies of image 1 to each other.
    assert done.stdout == "303 images: 4 pairs at cosine >= 0.990000, 2 clusters of 2 to 3 images (5 images)\n"


@pytest.mark.parametrize("case, expected", [
    ("missing", "does not exist; write it with python -m serving.client --folder"),
    ("empty", "holds no embeddings"),
    ("threshold", "expected a cosine similarity in [-1, 1], got 1.5"),
    ("nan", "expected a cosine similarity in [-1, 1], got nan"),
    ("extension", "must end in .csv or .jsonl"),
    ("not records", "not an embeddings record"),
    ("sheets without root", "pass --root"),
])
def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys, case, expected):
    emb, _, _ = _collection(tmp_path, np.random.default_rng(7))
    args = ["--embeddings", emb]
    if case == "missing":
        args = ["--embeddings", str(tmp_path / "nowhere.jsonl")]
    elif case == "empty":
        (tmp_path / "empty.jsonl").write_text("")
        args = ["--embeddings", str(tmp_path / "empty.jsonl")]
    elif case == "threshold":
        args += ["--threshold", "1.5"]
    elif case == "nan":
        args += ["--threshold", "nan"]
    elif case == "extension":
        args += ["--out", str(tmp_path / "dups.txt")]
    elif case == "not records":
        (tmp_path / "bad.jsonl").write_text('{"name": 1}\n')
        args = ["--embeddings", str(tmp_path / "bad.jsonl")]
    elif case == "sheets without root":
        args += ["--sheets", str(tmp_path / "sheets")]
    try:
        code = duplicates.main(args)
    except SystemExit as e:  # argument errors: the parser exits
        code = e.code
    err = capsys.readouterr().err
    assert code == 2
    assert expected in err and err.count("\n") == 1, err
    assert not os.path.exists(tmp_path / "sheets")
