"""Approximate nearest-neighbour search (serving/index.py) against exact search, side by side.

    python benchmarks/ann_search.py                                   # 1,000,000 synthetic 512-d vectors
    python benchmarks/ann_search.py --count 200000 --queries 500
    python benchmarks/ann_search.py --embeddings /tmp/emb/train.jsonl --query-embeddings /tmp/emb/test.jsonl

Synthetic data: `--clusters` unit centres in `--dim` dimensions, each vector a centre
plus Gaussian noise of norm about `--noise` times the centre's, then l2-normalised,
so that every vector has a few hundred close relatives and recall is meaningful (on
uniform random vectors all neighbours are about equally far). Queries are new
vectors of the same distribution. The data are made in chunks from fixed seeds, so
every method sees the same vectors without any process holding more than the
method itself needs.

Each method runs in its own process, one after the other, so that its peak resident
memory (ru_maxrss) is its own: exact search (serving/similar.py's top_k on a float32
matrix, with its own step size), usearch and FAISS HNSW (float16 vectors,
M 16, efConstruction 128, the same settings for both; searched with each `--ef`, 64 by default), each built by
serving/index.py's AnnIndex, saved, loaded and queried. `--embeddings FILE` builds
from a client's JSON lines with `serving.index.build` (the streaming pass) instead;
its build time then includes reading the JSON. Columns: build wall and CPU seconds,
peak RSS, the saved index's bytes, queries/s and CPU milliseconds per query (all
threads; steadier than queries/s when other jobs share the cores) one query at a
time (batch 1) and `--queries` at once, and recall@k: the fraction of exact search's k nearest that the
index returns, averaged over queries.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import REPO, Parser, nonnegative_float, positive_int, report  # noqa: E402

CHUNK = 65536  # synthetic vectors made per step
METHODS = ("exact", "usearch", "faiss")


def centres(args) -> np.ndarray:
    c = np.random.default_rng([args.seed, 0]).standard_normal((args.clusters, args.dim), dtype=np.float32)
    return c / np.linalg.norm(c, axis=1, keepdims=True)


def synthetic(args, start: int, count: int, centre: np.ndarray, stream: int = 1) -> np.ndarray:
    """Vectors start..start+count of stream `stream` (1: the collection, 2: the queries)."""
    rng = np.random.default_rng([args.seed, stream, start])
    x = centre[rng.integers(len(centre), size=count)]
    x += rng.standard_normal((count, args.dim), dtype=np.float32) * np.float32(args.noise / np.sqrt(args.dim))
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def collection(args):
    """Yield the synthetic collection in chunks of CHUNK vectors."""
    centre = centres(args)
    for start in range(0, args.count, CHUNK):
        yield synthetic(args, start, min(CHUNK, args.count - start), centre)


def queries_of(args):
    """(queries float32 [Q, D], exclude id per query or None)."""
    if not args.embeddings:
        return synthetic(args, 0, args.queries, centres(args), stream=2), None
    from serving.index import iter_batches

    source = args.query_embeddings or args.embeddings
    rows = []
    for _, vectors, _ in iter_batches(source):
        rows.append(vectors[: args.queries - sum(len(r) for r in rows)])
        if sum(len(r) for r in rows) >= args.queries:
            break
    queries = np.concatenate(rows)
    # Queries drawn from the collection itself: each is left out of its own neighbours.
    return queries, (None if args.query_embeddings else np.arange(len(queries)))


def batch_one(search, queries, count):
    """Queries/s asking one query at a time, over the first `count` queries."""
    started = time.perf_counter()
    for i in range(count):
        search(queries[i : i + 1])
    return count / (time.perf_counter() - started)


def worker(args) -> dict:
    """Run one method; print its measurements as JSON and save its neighbour ids."""
    from serving.similar import top_k

    method = args.worker
    queries, exclude = queries_of(args)
    result = {"method": method, "threads": args.threads}
    if method == "exact":
        from serving.index import iter_batches

        started = time.perf_counter()
        if args.embeddings:
            bank = np.concatenate([v for _, v, _ in iter_batches(args.embeddings)])
        else:
            bank = np.empty((args.count, args.dim), np.float32)  # filled in place: one matrix, no copies
            for start, chunk in zip(range(0, args.count, CHUNK), collection(args)):
                bank[start : start + len(chunk)] = chunk
        result["load_s"] = time.perf_counter() - started
        started, cpu = time.perf_counter(), time.process_time()
        ids, _ = top_k(queries, bank, args.k, exclude)
        result["qps_batch"] = len(queries) / (time.perf_counter() - started)
        result["cpu_ms_batch"] = 1000 * (time.process_time() - cpu) / len(queries)
        unit = bank  # synthetic rows are unit length: one query reads the matrix once, not again for top_k's norms

        def one(q, i=[0]):
            s = unit @ q[0]
            if exclude is not None:
                s[exclude[i[0]]] = -np.inf
            i[0] += 1
            return np.argpartition(-s, args.k)[: args.k]

        cpu = time.process_time()
        result["qps_1"] = batch_one(one, queries, min(len(queries), args.batch_one_exact))
        result["cpu_ms_1"] = 1000 * (time.process_time() - cpu) / min(len(queries), args.batch_one_exact)
        result["bytes"] = bank.nbytes
    else:
        from serving.index import AnnIndex, build

        folder = tempfile.mkdtemp(prefix="ann-bench-")
        path = os.path.join(folder, f"index.{method}")
        started, cpu = time.perf_counter(), time.process_time()
        if args.embeddings:
            build(args.embeddings, path, method, "f16", threads=args.threads)
            result["build_s"], result["build_cpu_s"] = time.perf_counter() - started, time.process_time() - cpu
        else:
            index = AnnIndex(method, args.dim, "f16", threads=args.threads)
            spent = cpu_spent = 0.0
            for chunk in collection(args):
                t, c = time.perf_counter(), time.process_time()
                index.add(chunk)  # only the adds are timed, not making the data
                spent, cpu_spent = spent + time.perf_counter() - t, cpu_spent + time.process_time() - c
                print(f"  {method}: {len(index):,} added, {spent:.0f} s", file=sys.stderr, flush=True)
            result["build_s"], result["build_cpu_s"] = spent, cpu_spent
            index.save(path)
            del index
        result["build_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        result["bytes"] = os.path.getsize(path)
        started = time.perf_counter()
        index = AnnIndex.load(path, method, queries.shape[1], "f16", threads=args.threads)
        result["load_s"] = time.perf_counter() - started
        sweep = []
        for ef in args.ef:  # HNSW's ef: the same built index, searched wider or narrower
            index.set_expansion_search(ef)
            started, cpu = time.perf_counter(), time.process_time()
            found, _ = index.search(queries, args.k, exclude)
            qps_batch = len(queries) / (time.perf_counter() - started)
            cpu_batch, cpu = 1000 * (time.process_time() - cpu) / len(queries), time.process_time()
            qps_1 = batch_one(lambda q: index.search(q, args.k), queries, len(queries))
            cpu_1 = 1000 * (time.process_time() - cpu) / len(queries)
            # CPU ms per query (all threads): steadier than queries/s when other jobs share the cores.
            sweep.append({"ef": ef, "qps_batch": qps_batch, "qps_1": qps_1, "cpu_ms_batch": cpu_batch, "cpu_ms_1": cpu_1})
            ids = found if ef == args.ef[0] else np.concatenate([ids, found])
        result["sweep"] = sweep
        for name in os.listdir(folder):
            os.remove(os.path.join(folder, name))
        os.rmdir(folder)
    result["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    np.save(args.ids_out, ids)
    return result


def build_parser():
    p = Parser(description=__doc__)
    p.add_argument("--count", type=positive_int, default=1_000_000, help="synthetic vectors (default 1,000,000)")
    p.add_argument("--dim", type=positive_int, default=512, help="their dimension (default 512: the cifar preset's ResNet-18)")
    p.add_argument("--clusters", type=positive_int, default=10_000, help="Gaussian centres (default 10,000)")
    p.add_argument("--noise", type=nonnegative_float, default=1.0, help="noise norm relative to the centre's (default 1.0)")
    p.add_argument("--queries", type=positive_int, default=1000, help="queries (default 1000), asked at once and one by one")
    p.add_argument("--k", type=positive_int, default=10, help="neighbours per query for recall@k (default 10)")
    p.add_argument("--embeddings", help="a serving.client JSON-lines file to index instead of synthetic vectors")
    p.add_argument("--query-embeddings", help="with --embeddings: queries from this file (default: the first "
                                              "--queries records of --embeddings, each left out of its own results)")
    p.add_argument("--methods", default=",".join(METHODS), help="comma-separated, from exact,usearch,faiss (default all; "
                                                                 "a library that is not installed is skipped)")
    p.add_argument("--threads", type=positive_int, default=os.cpu_count() or 1, help="threads per method (default: cores)")
    p.add_argument("--batch-one-exact", type=positive_int, default=100,
                   help="queries exact search answers one by one (default 100; each reads the whole matrix)")
    p.add_argument("--ef", type=_ef_list, default=[64], help="HNSW ef values to search with, comma-separated (default 64)")
    p.add_argument("--seed", type=positive_int, default=1)
    p.add_argument("--worker", choices=METHODS, help=argparse_hidden())
    p.add_argument("--ids-out", help=argparse_hidden())
    return p


def _ef_list(text):
    return [positive_int(t) for t in text.split(",")]


def argparse_hidden():
    import argparse

    return argparse.SUPPRESS


def main(argv=None) -> int:
    p = build_parser()
    args = p.parse_args(argv)
    if args.query_embeddings and not args.embeddings:
        p.error("--query-embeddings goes with --embeddings FILE")
    if args.worker:
        print(json.dumps(worker(args)))
        return 0
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    if methods[:1] != ["exact"] or set(methods) - set(METHODS):
        p.error(f"--methods must start with exact (recall is measured against it), from {','.join(METHODS)}")
    for m in methods[1:]:
        try:
            __import__({"usearch": "usearch.index", "faiss": "faiss"}[m])
        except ImportError:
            print(f"ann_search: {m} is not installed, skipped (pip install -r requirements-search.txt)", file=sys.stderr)
            methods.remove(m)
    versions = {}
    for m in methods[1:]:
        from importlib.metadata import version

        versions[m] = version({"usearch": "usearch", "faiss": "faiss-cpu"}[m])
    rows, exact = [], None
    with tempfile.TemporaryDirectory(prefix="ann-bench-") as tmp:
        passed = [a for a in (argv if argv is not None else sys.argv[1:])]
        for m in methods:
            ids_out = os.path.join(tmp, f"{m}.npy")
            started = time.perf_counter()
            done = subprocess.run([sys.executable, os.path.abspath(__file__), *passed, "--worker", m, "--ids-out", ids_out],
                                  cwd=REPO, stdout=subprocess.PIPE, text=True)
            if done.returncode:
                print(f"ann_search: error: the {m} run failed (exit {done.returncode}, its error is above)", file=sys.stderr)
                return 1
            row = json.loads(done.stdout.strip().splitlines()[-1])
            row["wall_s"] = time.perf_counter() - started
            ids = np.load(ids_out)
            if exact is None:
                exact = ids
            row["mib"] = row.pop("bytes") / 2**20
            for i, point in enumerate(row.pop("sweep", [{}])):  # one row per ef
                found = ids[i * len(exact) : (i + 1) * len(exact)]
                point[f"recall@{args.k}"] = float(np.mean([len(set(a) & set(b)) / args.k for a, b in zip(found, exact)]))
                rows.append({**row, **point})
            # Each method's rows as soon as it ends: a long run stopped part-way keeps what it measured.
            print(f"ann_search: {m} done in {row['wall_s']:.0f} s: {json.dumps(rows[-len(ids) // len(exact):])}",
                  file=sys.stderr, flush=True)
    data = ({"embeddings": args.embeddings, "query_embeddings": args.query_embeddings} if args.embeddings else
            {"count": args.count, "dim": args.dim, "clusters": args.clusters, "noise": args.noise, "seed": args.seed})
    report("ann_search", rows, [("method", "method"), ("ef", "ef"), ("build_s", "build s"), ("build_cpu_s", "build CPU s"),
                                ("peak_rss_mib", "peak RSS MiB"), ("mib", "index/matrix MiB"), ("load_s", "load s"),
                                ("qps_1", "queries/s, batch 1"), ("qps_batch", f"queries/s, batch {args.queries}"),
                                ("cpu_ms_1", "CPU ms/query, batch 1"), ("cpu_ms_batch", f"CPU ms/query, batch {args.queries}"),
                                (f"recall@{args.k}", f"recall@{args.k}")],
           {**data, "queries": args.queries, "k": args.k, "threads": args.threads, "versions": versions,
            "hnsw": {"M": 16, "efConstruction": 128, "dtype": "f16"}})
    return 0


if __name__ == "__main__":
    sys.exit(main())
