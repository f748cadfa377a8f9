"""Near-duplicates among served embeddings: pairs above a cosine threshold, grouped into clusters.

    python -m serving.client --folder photos --out photos.jsonl          # embed a folder once
    python -m serving.duplicates --embeddings photos.jsonl --out dups.csv  # threshold chosen from the data
    python -m serving.duplicates --embeddings photos.jsonl --threshold 0.995 --out dups.jsonl \\
        --root photos --sheets dup-sheets/                                 # and one contact sheet per cluster

Every pair of images whose cosine similarity is at least the threshold is a duplicate
pair; clusters are the connected components of those pairs (a~b and b~c put a, b and c
in one cluster, even when a and c are further apart). The search is exact and chunked:
rows are l2-normalised, and each chunk of 1,024 rows is multiplied with the rows after
it, so memory is 1,024 x N floats, never N x N.

The threshold, when --threshold is not given, comes from the nearest-neighbour
distances d = 1 - cosine to the most similar other image. For ordinary images they are
modelled by a Weibull law, fitted on the median and the 90th percentile (which
near-copies do not reach). The threshold is the distance under which the law expects
--expected (default 1) ordinary images by chance. The law is exact for evenly spread
points; on real embeddings it expected more close neighbours than there were, so the
cut is cautious (serving/README.md). The fit is repeated without the images under the
threshold (starting from the upper half) until it stops changing; on constructed
embeddings it held with 40% of the images in near-copy pairs (tests/test_duplicates.py).
The command prints the distribution and the threshold it chose.

--out writes one row per image in a cluster (CSV, or JSON lines when the name ends in
.jsonl): cluster (1 = the largest), size, image, similarity (cosine to the cluster's
first member, in file order) and max_pair_similarity (its most similar partner in the
cluster). Files are written to a temporary name and renamed, so a reader never sees
half a file. --sheets DIR writes DIR/cluster-0001.png, ...: the first member (blue
frame), then the others with their cosine to it (serving.similar's contact sheet).
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import os
import sys
from dataclasses import dataclass, field

import numpy as np

if __package__ in (None, ""):  # run as a script: make `serving` importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from serving.client import ClientError  # noqa: E402
from serving.similar import contact_sheet, load_embeddings, top_k  # noqa: E402
from simsiam_tf.cli import Parser  # noqa: E402
from simsiam_tf.diagnostics.metrics import l2_normalize  # noqa: E402

CHUNK = 1024  # rows per matrix product
EXPECTED = 1.0  # default: ordinary images expected under the chosen threshold by chance
WEIBULL_50_90 = float(np.log(np.log(10) / np.log(2)))  # shape x (log q90 - log q50) of any Weibull law
MIN_DISTANCE = 1e-7  # float32 cosines closer to 1 than this are identical
MIN_SPREAD = 0.01  # a floor on log q90 - log q50, for collections where every distance is alike
MAX_PAIRS = 10_000_000  # above this the threshold is too low to mean "duplicate"
SHEET_MEMBERS = 16  # images per contact sheet at most


class DuplicateError(Exception):
    """A problem with the input that the user must fix (one line, exit 2)."""


@dataclass
class Threshold:
    """A threshold chosen from nearest-neighbour similarities, and why."""

    value: float  # the cosine
    median_distance: float  # median of 1 - nearest-neighbour cosine of the images kept for the fit
    shape: float  # the fitted Weibull shape (about the data's intrinsic dimension / 2)
    expected: float  # ordinary images expected closer than the threshold by chance
    fitted: int  # images the fit kept (those not under the threshold)

    def explain(self) -> str:
        return (f"from data: nearest-neighbour distances 1 - cosine of the {self.fitted} images above it fit a "
                f"Weibull law of shape {self.shape:.3g} and median {self.median_distance:.3g}, which expects "
                f"{self.expected:g} of them under {1 - self.value:.3g} by chance")


@dataclass
class Duplicates:
    """What `find_duplicates` found: the threshold, the pairs (i < j) and the clusters."""

    threshold: float
    chosen: Threshold | None  # None when the threshold was given
    nearest: np.ndarray | None  # float32 [N] nearest-neighbour cosine (computed only to choose)
    pair_i: np.ndarray
    pair_j: np.ndarray
    pair_sim: np.ndarray
    clusters: list[np.ndarray] = field(default_factory=list)


def nearest_similarities(matrix: np.ndarray, chunk: int = CHUNK) -> np.ndarray:
    """float32 [N]: each row's cosine similarity to its most similar other row (exact)."""
    _, sims = top_k(matrix, matrix, 1, exclude=np.arange(len(matrix)), chunk=chunk)
    return sims[:, 0]


def choose_threshold(nearest: np.ndarray, expected: float = EXPECTED) -> Threshold:
    """The cosine at or above which a pair is a near-duplicate, from nearest-neighbour cosines.

    An ordinary image's distance d = 1 - cosine to its nearest neighbour is modelled by a
    Weibull law P(d < r) = 1 - exp(-(r / scale) ** shape), exact for points spread evenly
    (shape: about the intrinsic dimension / 2). On real embeddings it expected more very
    close ordinary neighbours than there were (serving/README.md), so the cut is cautious. Its
    shape and scale are fitted to the median and the 90th percentile of log d, which
    near-copies (the low end) barely move. The threshold is the distance under which
    the fit expects `expected` of the ordinary images. The first fit uses the upper half
    of the distances; each next fit uses the images above the last threshold, until that
    set stops changing (at most 50 fits). So a minority of images may have near-copies
    (40% of them held, on constructed embeddings).
    """
    nearest = np.asarray(nearest, np.float64)
    if len(nearest) < 2:
        raise DuplicateError(f"choosing a threshold needs at least 2 images, got {len(nearest)}; pass --threshold")
    logs = np.log(np.maximum(1.0 - nearest, MIN_DISTANCE))
    keep = logs >= np.median(logs)  # start loose: the upper half only
    cut = np.inf
    for _ in range(50):
        q50, q90 = np.quantile(logs[keep], [0.5, 0.9])
        shape = WEIBULL_50_90 / max(q90 - q50, MIN_SPREAD)  # log(ln 10 / ln 2) = shape x (q90 - q50)
        log_scale = q50 - np.log(np.log(2)) / shape
        n = int(keep.sum())
        chance = min(expected / n, 0.5)
        new_cut = log_scale + np.log(-np.log1p(-chance)) / shape
        new_keep = logs > new_cut
        if not new_keep.any() or np.array_equal(new_keep, keep):
            cut = new_cut
            break
        cut, keep = new_cut, new_keep
    value = float(np.clip(1.0 - np.exp(cut), -1.0, 1.0))
    return Threshold(value, float(np.exp(q50)), float(shape), expected, n)


def pairs_above(matrix: np.ndarray, threshold: float, chunk: int = CHUNK,
                max_pairs: int = MAX_PAIRS) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every pair (i < j) of rows with cosine >= threshold: (i int64 [P], j int64 [P], cosine
    float32 [P]), ordered by i then j. Memory: chunk x N floats per step, plus the pairs;
    more than `max_pairs` pairs is a DuplicateError (the threshold is too low)."""
    x = l2_normalize(matrix, dtype=np.float32)
    found_i, found_j, found_s, count = [], [], [], 0
    for start in range(0, len(x), chunk):
        s = x[start : start + chunk] @ x[start:].T  # this chunk against itself and the rows after it
        rows, cols = np.nonzero(s >= threshold)
        keep = cols > rows  # i < j, each pair once, no self-pairs
        rows, cols = rows[keep], cols[keep]
        count += len(rows)
        if count > max_pairs:
            raise DuplicateError(f"cosine >= {threshold:.4g} holds more than {max_pairs:,} pairs, which are not "
                                 "near-duplicates; pass a higher --threshold")
        found_i.append(rows + start)
        found_j.append(cols + start)
        found_s.append(s[rows, cols])
    if not found_i:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float32)
    return (np.concatenate(found_i).astype(np.int64), np.concatenate(found_j).astype(np.int64),
            np.concatenate(found_s).astype(np.float32))


def connected_clusters(n: int, pair_i: np.ndarray, pair_j: np.ndarray) -> list[np.ndarray]:
    """Connected components with at least two members of the graph on n nodes whose edges
    are the pairs: sorted member indices each, largest first (ties: first member first)."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    if len(pair_i) == 0:
        return []
    graph = coo_matrix((np.ones(len(pair_i), np.int8), (pair_i, pair_j)), shape=(n, n)).tocsr()
    _, labels = connected_components(graph, directed=False)
    sizes = np.bincount(labels)
    members = [np.flatnonzero(labels == c) for c in np.flatnonzero(sizes >= 2)]
    return sorted(members, key=lambda m: (-len(m), m[0]))


def find_duplicates(matrix: np.ndarray, threshold: float | None = None, expected: float = EXPECTED,
                    chunk: int = CHUNK, max_pairs: int = MAX_PAIRS) -> Duplicates:
    """Pairs at cosine >= threshold (chosen by `choose_threshold` when None) and their clusters."""
    matrix = np.asarray(matrix, np.float32)
    if threshold is not None and not -1.0 <= threshold <= 1.0:
        raise DuplicateError(f"threshold {threshold} is outside [-1, 1]; cosine similarities lie in [-1, 1]")
    nearest = chosen = None
    if threshold is None:
        nearest = nearest_similarities(matrix, chunk)
        chosen = choose_threshold(nearest, expected)
        threshold = chosen.value
    pair_i, pair_j, pair_sim = pairs_above(matrix, threshold, chunk, max_pairs)
    clusters = connected_clusters(len(matrix), pair_i, pair_j)
    return Duplicates(threshold, chosen, nearest, pair_i, pair_j, pair_sim, clusters)


def cluster_rows(names: list[str], matrix: np.ndarray, found: Duplicates) -> list[dict]:
    """One row per image in a cluster: cluster (1-based), size, image, similarity (cosine to
    the cluster's first member) and max_pair_similarity (its best pair in the cluster)."""
    x = l2_normalize(matrix, dtype=np.float32)
    best = np.full(len(names), -np.inf, np.float32)
    np.maximum.at(best, found.pair_i, found.pair_sim)
    np.maximum.at(best, found.pair_j, found.pair_sim)
    rows = []
    for number, members in enumerate(found.clusters, 1):
        to_first = x[members] @ x[members[0]]
        for m, sim in zip(members, to_first):
            rows.append({"cluster": number, "size": len(members), "image": names[m],
                         "similarity": round(float(sim), 6), "max_pair_similarity": round(float(best[m]), 6)})
    return rows


COLUMNS = ["cluster", "size", "image", "similarity", "max_pair_similarity"]


def _atomic_write(path: str, data: bytes) -> None:
    """Write `data` to `path` through a temporary file in the same folder and a rename."""
    folder = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(folder, f".{os.path.basename(path)}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_rows(path: str, rows: list[dict]) -> None:
    """The rows as CSV (with a header), or as JSON lines when `path` ends in .jsonl."""
    if path.endswith(".jsonl"):
        text = "".join(json.dumps(r) + "\n" for r in rows)
    else:
        buf = io.StringIO()
        writer = csv.DictWriter(buf, COLUMNS, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
        text = buf.getvalue()
    _atomic_write(path, text.encode("utf-8"))


def write_sheets(folder: str, root: str | None, rows: list[dict]) -> int:
    """One contact sheet per cluster, folder/cluster-0001.png, ...: the first member, then up to
    SHEET_MEMBERS - 1 others with their cosine to it. Returns how many were written."""
    missing = [r["image"] for r in rows if not os.path.isfile(os.path.join(root or "", r["image"]))]
    if missing:
        raise DuplicateError(f"{os.path.join(root or '', missing[0])} does not exist ({len(missing)} images missing); "
                             "pass --root, the folder the embeddings' names are relative to")
    os.makedirs(folder, exist_ok=True)
    by_cluster: dict[int, list[dict]] = {}
    for r in rows:
        by_cluster.setdefault(r["cluster"], []).append(r)

    def path(r):
        return os.path.join(root or "", r["image"])

    for number, members in by_cluster.items():
        first, others = members[0], members[1 : SHEET_MEMBERS]
        row = (path(first), f"cluster {number} ({len(members)})",
               [(path(r), f"{r['similarity']:.4f}", None) for r in others])
        buf = io.BytesIO()
        contact_sheet([row], len(others)).save(buf, format="PNG")
        _atomic_write(os.path.join(folder, f"cluster-{number:04d}.png"), buf.getvalue())
    return len(by_cluster)


def describe_nearest(nearest: np.ndarray) -> str:
    """One line: quantiles of the nearest-neighbour cosines."""
    q = np.quantile(nearest, [0.0, 0.01, 0.1, 0.5, 0.9, 1.0])
    labels = ["min", "1%", "10%", "median", "90%", "max"]
    return (f"nearest-neighbour cosine of {len(nearest)} images: "
            + ", ".join(f"{k} {v:.4f}" for k, v in zip(labels, q)))


def _cosine(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a cosine similarity in [-1, 1], got {text!r}")
    if not -1.0 <= value <= 1.0:  # also refuses nan
        raise argparse.ArgumentTypeError(f"expected a cosine similarity in [-1, 1], got {text}")
    return value


def _positive(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not (value > 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return value


def build_parser():
    p = Parser(prog="python -m serving.duplicates", description=__doc__)
    p.add_argument("--embeddings", required=True, help="JSON-lines file of python -m serving.client --folder")
    p.add_argument("--threshold", type=_cosine, help="cosine at or above which two images are duplicates "
                   "(default: chosen from the nearest-neighbour distances, and printed)")
    p.add_argument("--expected", type=_positive, default=EXPECTED,
                   help=f"without --threshold: ordinary images allowed under the threshold by chance (default {EXPECTED:g})")
    p.add_argument("--out", help="clusters to write: .csv, or .jsonl for JSON lines (default: print a summary only)")
    p.add_argument("--sheets", metavar="DIR", help="write one contact sheet per cluster into DIR")
    p.add_argument("--root", help="the --folder the embeddings' names are relative to (for --sheets)")
    return p


def main(argv=None) -> int:
    p = build_parser()
    args = p.parse_args(argv)
    if args.out and not args.out.endswith((".csv", ".jsonl")):
        p.error(f"--out {args.out!r} must end in .csv or .jsonl")
    try:
        if not os.path.isfile(args.embeddings):
            raise DuplicateError(f"--embeddings {args.embeddings!r} does not exist; write it with "
                                 f"python -m serving.client --folder DIR --out {args.embeddings}")
        try:
            names, matrix, _ = load_embeddings(args.embeddings)
        except ClientError as e:
            raise DuplicateError(str(e)) from None
        found = find_duplicates(matrix, args.threshold, args.expected)
    except DuplicateError as e:
        print(f"duplicates: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"duplicates: error: cannot read {args.embeddings}: {e.strerror}", file=sys.stderr)
        return 2
    if found.chosen is not None:
        print(describe_nearest(found.nearest))
        print(f"threshold {found.threshold:.6f} ({found.chosen.explain()}; --threshold T sets it)")
    rows = cluster_rows(names, matrix, found)
    sizes = [len(c) for c in found.clusters]
    span = f" of {min(sizes)} to {max(sizes)} images" if sizes else ""
    print(f"{len(names)} images: {len(found.pair_i)} pairs at cosine >= {found.threshold:.6f}, "
          f"{len(found.clusters)} clusters{span} ({len(rows)} images)")
    try:
        if args.out:
            write_rows(args.out, rows)
            print(f"wrote {args.out} ({len(rows)} rows)")
        if args.sheets:
            count = write_sheets(args.sheets, args.root, rows)
            print(f"wrote {count} contact sheets to {args.sheets}")
    except DuplicateError as e:
        print(f"duplicates: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"duplicates: error: cannot write {e.filename or args.out}: {e.strerror}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
