"""An approximate nearest-neighbour index of served embeddings, for large collections.

    pip install -r requirements-search.txt                              # faiss-cpu (optional extra)
    python -m serving.index --embeddings train.jsonl --index train.faiss
    python -m serving.similar --index train.faiss --queries-from test.jsonl --precision-at 10
    python -m serving.similar --index train.faiss --root photos --query cat/0001.jpg --k 8

The build reads the JSON lines of `python -m serving.client --folder` in one streaming
pass, a few thousand lines at a time, so memory is the index's, not a float32 matrix
of all the embeddings. The index is an HNSW graph (FAISS by default, usearch with
`--library usearch`) over l2-normalised vectors stored as float16 (`--dtype`), searched
by cosine similarity. Beside it, `PATH.names` maps the index's ids (0, 1, ...) to the
images' names, with the library, dimension and model version on its first line. Both
files are written under temporary names and renamed into place, index first, so a
reader never sees a half-written pair.

serving/README.md ("Large collections") has the measurements that chose FAISS.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time

import numpy as np

if __package__ in (None, ""):  # run as a script: make `serving` importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from serving.client import ClientError, parse_record  # noqa: E402
from simsiam_tf.diagnostics.metrics import l2_normalize  # noqa: E402

INSTALL = "pip install -r requirements-search.txt"
LIBRARIES = ("faiss", "usearch")  # the first is the default
DTYPES = {"usearch": ("f16", "i8", "f32"), "faiss": ("f16", "f32")}
CONNECTIVITY = 16  # HNSW's M: links per node
EXPANSION_ADD = 128  # HNSW's efConstruction
EXPANSION_SEARCH = 64  # HNSW's ef at query time
BATCH = 4096  # lines read and added per step of a build


def _import(library: str):
    """The library's module, or a ClientError naming the install command."""
    try:
        if library == "usearch":
            from usearch import index as module
        else:
            import faiss as module
    except ImportError:
        raise ClientError(f"the index library {library!r} is not installed; install it with {INSTALL}") from None
    return module


def iter_records(path: str):
    """Yield (line number, record) of a JSON-lines embeddings file, reading one line at a time.

    The streaming counterpart of serving.client.read_embeddings: the same checks, the
    same treatment of a half-written last line (no newline: skipped), never the whole file.
    """
    with open(path, "rb") as f:
        for number, line in enumerate(f, 1):
            if not line.endswith(b"\n"):
                return  # a killed client's half-written last line
            yield number, parse_record(line, path, number, "pass a file written by python -m serving.client --folder")


def iter_batches(path: str, size: int = BATCH):
    """Yield (names, float32 [n <= size, D] embeddings, model version) from `path`, streamed.

    One dimension and one model version for the whole file, or a ClientError naming the line.
    """
    names, rows, dim, version = [], [], None, None
    for number, record in iter_records(path):
        if dim is None:
            dim, version = len(record["embedding"]), record.get("model_version")
        if len(record["embedding"]) != dim:
            raise ClientError(f"{path}, line {number}: {len(record['embedding'])} dimensions after {dim}; "
                              "embed the folder again into a new file")
        if record.get("model_version") != version:
            raise ClientError(f"{path}, line {number}: model version {record.get('model_version')} after {version}; "
                              "embed the folder again with one --version")
        names.append(record["image"])
        rows.append(record["embedding"])
        if len(rows) == size:
            yield names, np.asarray(rows, np.float32), version
            names, rows = [], []
    if rows:
        yield names, np.asarray(rows, np.float32), version


class AnnIndex:
    """An HNSW index of unit vectors under cosine similarity; ids are 0, 1, ... in order of `add`."""

    def __init__(self, library: str, dim: int, dtype: str = "f16", connectivity: int = CONNECTIVITY,
                 expansion_add: int = EXPANSION_ADD, expansion_search: int = EXPANSION_SEARCH,
                 threads: int = 0, _native=None):
        if library not in LIBRARIES:
            raise ClientError(f"unknown index library {library!r}; pass one of {', '.join(LIBRARIES)}")
        if dtype not in DTYPES[library]:
            raise ClientError(f"{library} does not store {dtype}; pass --dtype {' or '.join(DTYPES[library])}")
        self.library, self.dim, self.dtype = library, dim, dtype
        self.threads = threads or os.cpu_count() or 1
        self._lib = _import(library)
        if _native is not None:
            self.native = _native
        elif library == "usearch":
            self.native = self._lib.Index(ndim=dim, metric="cos", dtype=dtype, connectivity=connectivity,
                                          expansion_add=expansion_add, expansion_search=expansion_search)
        else:
            faiss = self._lib
            if dtype == "f32":
                index = faiss.IndexHNSWFlat(dim, connectivity, faiss.METRIC_INNER_PRODUCT)
            else:
                index = faiss.IndexHNSWSQ(dim, faiss.ScalarQuantizer.QT_fp16, connectivity, faiss.METRIC_INNER_PRODUCT)
            index.hnsw.efConstruction = expansion_add
            index.hnsw.efSearch = expansion_search
            self.native = index
        if library == "faiss":
            self._lib.omp_set_num_threads(self.threads)

    def __len__(self) -> int:
        return len(self.native) if self.library == "usearch" else self.native.ntotal

    def add(self, vectors: np.ndarray) -> None:
        """Append rows (l2-normalised here) with the next ids."""
        vectors = l2_normalize(vectors, dtype=np.float32)
        if vectors.shape[1] != self.dim:
            raise ClientError(f"{vectors.shape[1]}-dimensional embeddings for a {self.dim}-dimensional index; "
                              "build a new index for them")
        if self.library == "usearch":
            start = len(self)
            self.native.add(np.arange(start, start + len(vectors), dtype=np.uint64), vectors, threads=self.threads)
        else:
            self.native.add(vectors)

    def search(self, queries: np.ndarray, k: int, exclude: np.ndarray | None = None):
        """(ids int64 [Q, k], cosine similarities float32 [Q, k]), most similar first, as
        serving.similar.top_k; `exclude[i]` (or -1) is an id query i may not return.
        Fewer than k found (a tiny index): the row is padded with id -1, similarity -inf."""
        queries = l2_normalize(queries, dtype=np.float32)
        extra = int(exclude is not None)
        want = min(k + extra, len(self))
        if self.library == "usearch":
            found = self.native.search(queries, want, threads=self.threads)
            if hasattr(found, "counts"):  # BatchMatches: rows of `want`, the first counts[i] valid
                ids = np.array(found.keys, np.int64).reshape(len(queries), want)
                sims = 1.0 - np.array(found.distances, np.float32).reshape(len(queries), want)
                counts = np.asarray(found.counts).reshape(-1)
            else:  # one query: Matches, as many as were found
                ids, sims = np.full((1, want), -1, np.int64), np.zeros((1, want), np.float32)
                counts = np.array([len(found.keys)])
                ids[0, : counts[0]] = found.keys
                sims[0, : counts[0]] = 1.0 - np.asarray(found.distances, np.float32)
            ids[np.arange(want)[None, :] >= counts[:, None]] = -1
        else:
            sims, ids = self.native.search(queries, want)
            ids = ids.astype(np.int64)
        sims = np.where(ids >= 0, sims, -np.inf).astype(np.float32)
        if exclude is not None:
            drop = ids == np.asarray(exclude)[:, None]
            ids, sims = np.where(drop, -1, ids), np.where(drop, -np.inf, sims)
        # Stable order: similarity, then id; missing (-1, -inf) last.
        order = np.lexsort((np.where(ids < 0, np.iinfo(np.int64).max, ids), -sims), axis=1)[:, :k]
        return np.take_along_axis(ids, order, axis=1), np.take_along_axis(sims, order, axis=1)

    def set_expansion_search(self, ef: int) -> None:
        """HNSW's ef at query time: candidates kept while searching (more: higher recall, slower)."""
        if self.library == "usearch":
            self.native.expansion_search = ef
        else:
            self._lib.downcast_index(self.native).hnsw.efSearch = ef

    def vector(self, i: int) -> np.ndarray:
        """The stored (unit, `dtype`-rounded) vector of id i, as float32."""
        if self.library == "usearch":
            return np.asarray(self.native.get(i), np.float32).reshape(-1) / (127.0 if self.dtype == "i8" else 1.0)
        return np.asarray(self.native.reconstruct(int(i)), np.float32)

    def save(self, path: str) -> None:
        if self.library == "usearch":
            self.native.save(path)
        else:
            self._lib.write_index(self.native, path)

    @classmethod
    def load(cls, path: str, library: str, dim: int, dtype: str, threads: int = 0, view: bool = False) -> "AnnIndex":
        """The index saved at `path`; `view` maps the file instead of reading it into memory
        (usearch; FAISS's HNSW index is read whole all the same, measured in serving/README.md)."""
        lib = _import(library)
        if library == "usearch":
            native = lib.Index.restore(path, view=view)
            if native is None:
                raise ClientError(f"{path} is not a usearch index; build it with python -m serving.index")
        else:
            native = lib.read_index(path, lib.IO_FLAG_MMAP if view else 0)
        return cls(library, dim, dtype, threads=threads, _native=native)


def _names_path(path: str) -> str:
    return path + ".names"


def build(embeddings: str, path: str, library: str = LIBRARIES[0], dtype: str = "f16", threads: int = 0,
          connectivity: int = CONNECTIVITY, expansion_add: int = EXPANSION_ADD, progress=None) -> AnnIndex:
    """Build the index of `embeddings` (a serving.client JSON-lines file) at `path`, with
    its names at `path`.names; streamed, BATCH lines at a time."""
    _import(library)
    index, version = None, None
    directory = os.path.dirname(os.path.abspath(path))
    tmp_names = os.path.join(directory, f".{os.path.basename(path)}.names.{os.getpid()}.tmp")
    tmp_body = tmp_names + ".body"
    tmp_index = os.path.join(directory, f".{os.path.basename(path)}.{os.getpid()}.tmp")
    try:
        with open(tmp_body, "w", encoding="utf-8") as body:
            for names, vectors, version in iter_batches(embeddings):
                if index is None:
                    index = AnnIndex(library, vectors.shape[1], dtype, connectivity, expansion_add, threads=threads)
                index.add(vectors)
                body.writelines(json.dumps(n) + "\n" for n in names)
                if progress:
                    progress(len(index))
        if index is None:
            raise ClientError(f"{embeddings} holds no embeddings; write it with python -m serving.client --folder DIR "
                              f"--out {embeddings}")
        header = {"library": library, "dim": index.dim, "dtype": dtype, "count": len(index), "model_version": version,
                  "metric": "cos", "connectivity": connectivity, "expansion_add": expansion_add,
                  "embeddings": os.path.abspath(embeddings)}
        with open(tmp_names, "w", encoding="utf-8") as f, open(tmp_body, encoding="utf-8") as body:
            f.write(json.dumps(header) + "\n")
            shutil.copyfileobj(body, f)  # streamed: the header first, then one name per id
            f.flush()
            os.fsync(f.fileno())
        index.save(tmp_index)
        os.replace(tmp_index, path)
        os.replace(tmp_names, _names_path(path))
    finally:
        for tmp in (tmp_index, tmp_names, tmp_body):
            if os.path.exists(tmp):
                os.remove(tmp)
    return index


def open_index(path: str, threads: int = 0, view: bool = False) -> tuple[AnnIndex, list[str], dict]:
    """(index, names by id, header) of an index `build` wrote."""
    names_path = _names_path(path)
    for p in (path, names_path):
        if not os.path.exists(p):
            raise ClientError(f"{p} does not exist; build it with python -m serving.index --index {path}")
    with open(names_path, encoding="utf-8") as f:
        try:
            header = json.loads(f.readline())
            names = [json.loads(line) for line in f]
        except ValueError:
            raise ClientError(f"{names_path} is not an index's names file; rebuild with python -m serving.index")
    index = AnnIndex.load(path, header["library"], header["dim"], header["dtype"], threads=threads, view=view)
    if len(index) != len(names) or len(names) != header["count"]:
        raise ClientError(f"{path} holds {len(index)} vectors but {names_path} {len(names)} names; "
                          "rebuild both with python -m serving.index")
    return index, names, header


def build_parser():
    from simsiam_tf.cli import Parser

    b = Parser(prog="python -m serving.index", description=__doc__)
    b.add_argument("--embeddings", required=True, help="JSON-lines file of python -m serving.client --folder")
    b.add_argument("--index", required=True, help="index file to write (and INDEX.names beside it)")
    b.add_argument("--library", choices=LIBRARIES, default=LIBRARIES[0], help="faiss (default) or usearch")
    b.add_argument("--dtype", default="f16", help="stored vectors: f16 (default), i8 (usearch only) or f32")
    b.add_argument("--threads", default=0, type=_whole, help="threads (default 0: one per core)")
    b.add_argument("--connectivity", default=CONNECTIVITY, type=_whole, help=f"HNSW links per node (M, default {CONNECTIVITY})")
    b.add_argument("--expansion-add", default=EXPANSION_ADD, type=_whole,
                   help=f"HNSW search depth while adding (efConstruction, default {EXPANSION_ADD})")
    return b


def _whole(text):
    import argparse

    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}")
    return value


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    started, cpu = time.monotonic(), time.process_time()
    try:
        index = build(args.embeddings, args.index, args.library, args.dtype, args.threads, args.connectivity,
                      args.expansion_add)
    except ClientError as e:
        print(f"index: error: {e}", file=sys.stderr)
        return 1
    except OSError as e:
        print(f"index: error: cannot read or write {e.filename}: {e.strerror}", file=sys.stderr)
        return 1
    print(f"wrote {args.index} ({len(index)} vectors of {index.dim} dimensions, {args.library} HNSW, {args.dtype}; "
          f"{os.path.getsize(args.index) / 2**20:.1f} MiB) and {_names_path(args.index)} in "
          f"{time.monotonic() - started:.1f} s ({time.process_time() - cpu:.1f} s of CPU)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
