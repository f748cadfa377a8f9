"""Nearest neighbours among served embeddings, and a contact sheet of them.

    python -m serving.client --folder photos --out photos.jsonl        # embed a folder once
    python -m serving.similar --embeddings photos.jsonl --root photos \\
        --query cat.jpg dogs/ --k 8 --out sheet.png                     # files, folders, or names
    python -m serving.similar --embeddings train.jsonl --queries-from test.jsonl --precision-at 10
    python -m serving.similar --index train.faiss --queries-from test.jsonl --precision-at 10   # approximate

A query is a name in the embeddings file (its stored vector; the image itself is left
out of its neighbours), an image file, or a folder of images; files and folders are
embedded through the server (`--url`, `--model`) at the file's model version. The
sheet has one row per query: the query, then its k nearest images with their cosine
similarity, captioned green/red when the class of both agrees/differs (the class of a
name is its first folder, in a `<class>/<image>` layout; a query file's is its folder's
name when the embeddings have a class of that name).

Search is exact: rows are l2-normalised, so cosine similarity is one matrix product
per chunk of queries, and `np.argpartition` picks the top k without sorting the
whole row. 10,000 queries against 50,000 images of 128 dimensions took 16 s on a
2-core AMD EPYC, AVX2, 2026-12-03 (serving/README.md), most of it in `argpartition`, not in the
matrix products.
At millions of images build an approximate index once (`python -m serving.index`,
an optional extra: `pip install -r requirements-search.txt`) and pass `--index PATH`
instead of `--embeddings`: the same queries and output, from an HNSW graph that visits
a small part of the collection (serving/index.py; serving/README.md, "Large
collections", has its speed and recall).

`--precision-at K` measures retrieval: for every query, the fraction of its K nearest
images whose class (first folder of the name) is the query's, averaged over queries.
With `--queries-from` the same file as `--embeddings`, each image is left out of its
own neighbours (leave-one-out).

Near-duplicates (pairs above a cosine threshold, grouped into clusters) are a command of
their own, built on this module's helpers: `python -m serving.duplicates` (serving/duplicates.py).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

if __package__ in (None, ""):  # run as a script: make `serving` importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from serving.client import ClientError, EmbeddingClient, find_images, read_embeddings  # noqa: E402
from simsiam_tf.cli import Parser  # noqa: E402
from simsiam_tf.diagnostics.metrics import l2_normalize  # noqa: E402

CELL = 96  # pixels of one image on the sheet (CIFAR's 32 px, enlarged 3x)
CAPTION = 14  # pixels of caption under each image
GAP = 4  # pixels between images and around the sheet
STEP_CELLS = 1 << 25  # query-by-bank similarities per step of exact search (plus their int64 ranks)


def load_embeddings(path: str) -> tuple[list[str], np.ndarray, int | None]:
    """(names, float32 [N, D] embeddings, model version) of a `serving.client --folder` file.

    Without this project: `[json.loads(line) for line in open(path)]` gives the same
    records (a half-written last line of a killed run aside).
    """
    records, _ = read_embeddings(path)
    if not records:
        raise ClientError(f"{path} holds no embeddings; write it with python -m serving.client --folder DIR --out {path}")
    dims = {len(r["embedding"]) for r in records}
    if len(dims) != 1:
        raise ClientError(f"{path} mixes embeddings of {sorted(dims)} dimensions; embed the folder again into a new file")
    versions = {r.get("model_version") for r in records}
    names = [r["image"] for r in records]
    matrix = np.array([r["embedding"] for r in records], np.float32)
    return names, matrix, versions.pop() if len(versions) == 1 else None


def top_k(queries: np.ndarray, bank: np.ndarray, k: int, exclude: np.ndarray | None = None,
          chunk: int = 1024) -> tuple[np.ndarray, np.ndarray]:
    """Exact cosine nearest neighbours: (indices int64 [Q, k], similarities float32 [Q, k]),
    most similar first (ties: lower index first).

    `queries` [Q, D] and `bank` [N, D] need not be normalised. `exclude[i]` (or -1) is a
    bank row query i may not return, such as the query itself. Queries are answered
    `chunk` at a time, fewer when N is large: each step holds a float32 and an int64
    array of (rows x N) <= STEP_CELLS, about 400 MB. The bank is not copied when it is
    float32 (1,000,000 x 512 floats are 2 GiB).
    """
    k = min(k, len(bank) - (exclude is not None))
    if k < 1:
        return np.zeros([len(queries), 0], np.int64), np.zeros([len(queries), 0], np.float32)
    bank = np.asarray(bank, np.float32)
    # Cosines as (query . row) / |row|, so the bank is never normalised into a copy.
    inverse_norms = 1.0 / np.sqrt(np.maximum(np.einsum("ij,ij->i", bank, bank), np.float32(1e-12)))
    queries = l2_normalize(queries, dtype=np.float32)
    chunk = max(1, min(chunk, STEP_CELLS // len(bank)))
    indices, sims = [], []
    for start in range(0, len(queries), chunk):
        distance = queries[start : start + chunk] @ bank.T
        distance *= -inverse_norms  # minus the cosine, in place: argpartition takes the smallest
        if exclude is not None:
            rows = np.nonzero(exclude[start : start + chunk] >= 0)[0]
            distance[rows, exclude[start : start + chunk][rows]] = np.inf
        part = np.argpartition(distance, k - 1, axis=1)[:, :k]
        part_sims = -np.take_along_axis(distance, part, axis=1)
        del distance
        order = np.lexsort((part, -part_sims), axis=1)  # by similarity, then by index
        indices.append(np.take_along_axis(part, order, axis=1))
        sims.append(np.take_along_axis(part_sims, order, axis=1))
    return np.concatenate(indices), np.concatenate(sims)


def label_of(name: str) -> str | None:
    """The class of an image named `<class>/<file>`: its first folder (None at the top)."""
    return name.split("/", 1)[0] if "/" in name else None


def precision_at(bank_labels: list, query_labels: list, indices: np.ndarray) -> float:
    """Mean over queries of the fraction of their retrieved images (`indices` [Q, k]) whose
    label is the query's; an id of -1 (an approximate index found fewer) counts as a miss."""
    bank_labels = np.asarray(bank_labels)
    same = bank_labels[indices] == np.asarray(query_labels)[:, None]
    return float(np.mean(same & (indices >= 0)))


def contact_sheet(rows: list[tuple[str, str, list[tuple[str, str, bool | None]]]], k: int, cell: int = CELL):
    """A PIL image: per row, the query image and up to k neighbours, captioned.

    `rows` holds (query image path, caption, [(image path, caption, same class?), ...]).
    Size: width GAP + (k + 1) * (cell + GAP), height GAP + len(rows) * (cell + CAPTION + GAP).
    """
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default()
    sheet = Image.new("RGB", (GAP + (k + 1) * (cell + GAP), GAP + len(rows) * (cell + CAPTION + GAP)), "white")
    draw = ImageDraw.Draw(sheet)
    colour = {True: (0, 130, 0), False: (200, 0, 0), None: (0, 0, 0)}
    for r, (query, caption, neighbours) in enumerate(rows):
        y = GAP + r * (cell + CAPTION + GAP)
        for c, (path, text, same) in enumerate([(query, caption, None)] + neighbours[:k]):
            x = GAP + c * (cell + GAP)
            with Image.open(path) as image:
                image = image.convert("RGB")
                image.thumbnail((cell, cell), Image.Resampling.LANCZOS)
                if max(image.size) < cell:  # small images (CIFAR's 32 px): enlarge, keep the pixels sharp
                    scale = cell / max(image.size)
                    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
                    image = image.resize(size, Image.Resampling.NEAREST)
            sheet.paste(image, (x + (cell - image.width) // 2, y + (cell - image.height) // 2))
            if c == 0:
                draw.rectangle([x - 2, y - 2, x + cell + 1, y + cell + 1], outline=(0, 0, 200), width=2)
            draw.text((x + 1, y + cell + 1), text[: cell // 6], fill=colour[same], font=font)
    return sheet


def _queries(args, names, vector_of, version):
    """(query names, vectors [Q, D], bank row to exclude per query or -1, image paths).

    `vector_of(i)` is bank row i's vector (a row of the matrix, or the index's stored one)."""
    index = {n: i for i, n in enumerate(names)}
    q_names, vectors, exclude, paths, to_embed = [], [], [], [], []
    for query in args.query:
        if query in index:
            q_names.append(query)
            vectors.append(vector_of(index[query]))
            exclude.append(index[query])
            paths.append(os.path.join(args.root, query) if args.root else query)
        elif os.path.isfile(query) or os.path.isdir(query):
            files = [query] if os.path.isfile(query) else [os.path.join(query, f) for f in find_images(query)]
            for path in files:
                q_names.append(path)
                vectors.append(None)
                exclude.append(-1)
                paths.append(path)
                to_embed.append(len(vectors) - 1)
        else:
            raise ClientError(f"--query {query!r} is not a name in {args.embeddings or args.index}, "
                              "nor an image file or folder")
    if to_embed:
        client = EmbeddingClient(args.url, args.model, version=version)
        images = []
        for i in to_embed:
            with open(paths[i], "rb") as f:
                images.append(f.read())
        try:
            embedded = client.embed(images)
        except ClientError as e:
            if e.index is not None:
                raise ClientError(f"{paths[to_embed[e.index]]}: {e}") from None
            raise
        for i, vector in zip(to_embed, embedded):
            vectors[i] = np.asarray(vector, np.float32)
    return q_names, np.stack(vectors), np.array(exclude), paths


def _at_least_1(text):
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number of at least 1, got {text!r}")
    return value


def build_parser():
    p = Parser(prog="python -m serving.similar", description=__doc__)
    p.add_argument("--embeddings", help="JSON-lines file of python -m serving.client --folder (exact search)")
    p.add_argument("--index", help="instead of --embeddings: an approximate index of python -m serving.index")
    p.add_argument("--root", help="the --folder the embeddings' names are relative to (for the sheet's images)")
    p.add_argument("--query", nargs="+", default=[], help="names in --embeddings, image files or folders")
    p.add_argument("--k", type=_at_least_1, default=8, help="neighbours per query (default 8)")
    p.add_argument("--out", help="contact sheet PNG to write (default: print the neighbours only)")
    p.add_argument("--url", default="http://localhost:8501", help="server root, to embed query files")
    p.add_argument("--model", default="simsiam", help="served model name")
    p.add_argument("--queries-from", help="with --precision-at: every record of this embeddings file is a query")
    p.add_argument("--precision-at", type=_at_least_1, metavar="K",
                   help="print precision@K of the queries, classes from the names' first folders")
    return p


def main(argv=None) -> int:
    p = build_parser()
    args = p.parse_args(argv)
    if bool(args.embeddings) == bool(args.index):
        p.error("give --embeddings FILE (exact search) or --index PATH (approximate; one of them)")
    if bool(args.query) == bool(args.queries_from):
        p.error("give --query ... or --queries-from FILE (one of them)")
    if args.queries_from and not args.precision_at:
        p.error("--queries-from goes with --precision-at K")
    ann = None
    try:
        if args.index:
            from serving.index import open_index

            ann, names, header = open_index(args.index)
            matrix, version, source, vector_of = None, header["model_version"], header["embeddings"], ann.vector
        else:
            names, matrix, version = load_embeddings(args.embeddings)
            source, vector_of = args.embeddings, matrix.__getitem__
        if args.queries_from:
            q_names, queries, q_version = load_embeddings(args.queries_from)
            if q_version != version:
                raise ClientError(f"{args.queries_from} (model version {q_version}) and {args.embeddings or args.index} "
                                  f"(version {version}) come from different models; embed both with one version")
            paths = None
            # The same file as queries and bank: an image is not its own neighbour.
            same = os.path.exists(source) and os.path.samefile(args.queries_from, source)
            exclude = np.arange(len(names)) if same else None
        else:
            q_names, queries, exclude, paths = _queries(args, names, vector_of, version)
    except ClientError as e:
        print(f"similar: error: {e}", file=sys.stderr)
        return 1
    except OSError as e:
        print(f"similar: error: cannot read {e.filename}: {e.strerror}", file=sys.stderr)
        return 1
    k = args.precision_at or args.k
    started = time.monotonic()
    if ann is None:
        indices, sims = top_k(queries, matrix, k, exclude)
        method = "exact cosine search"
    else:
        indices, sims = ann.search(queries, min(k, len(names) - (exclude is not None)), exclude)
        method = f"approximate search, {ann.library} HNSW {ann.dtype},"
    seconds = time.monotonic() - started
    if args.precision_at:
        labels = [label_of(n) for n in names]
        q_labels = [label_of(n) for n in q_names]
        if None in labels or None in q_labels:
            print("similar: error: --precision-at needs names of the form <class>/<image> in both files", file=sys.stderr)
            return 2
        print(f"precision@{k}: {precision_at(labels, q_labels, indices):.4f} "
              f"({len(q_names)} queries against {len(names)} images, {method} in {seconds:.2f} s)")
        return 0
    rows = []
    classes = {label_of(n) for n in names} - {None}
    for name, path, idx, sim in zip(q_names, paths, indices, sims):
        idx, sim = idx[idx >= 0], sim[idx >= 0]  # an approximate index may find fewer than k
        print(name + ": " + ", ".join(f"{names[j]} ({s:.3f})" for j, s in zip(idx, sim)))
        # A query file in a folder named like one of the bank's classes is of that class.
        parent = os.path.basename(os.path.dirname(os.path.abspath(path)))
        label = label_of(name) if name in names else (parent if parent in classes else None)
        neighbours = [
            (os.path.join(args.root or "", names[j]), f"{s:.3f} {label_of(names[j]) or ''}".strip(),
             None if label is None or label_of(names[j]) is None else label_of(names[j]) == label)
            for j, s in zip(idx, sim)
        ]
        rows.append((path, "query " + (label or os.path.basename(name)), neighbours))
    if args.out:
        try:
            contact_sheet(rows, k).save(args.out)
        except OSError as e:
            print(f"similar: error: cannot make {args.out}: {e}; pass --root, the folder the names are relative to",
                  file=sys.stderr)
            return 1
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
