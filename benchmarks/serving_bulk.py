"""Bulk embedding over REST and over gRPC against one local stand-in, in one run.

    python benchmarks/serving_bulk.py                      # 2,000 JPEGs of data/cifar10/test, ResNet-18 width 64
    python benchmarks/serving_bulk.py --quick              # 64 images, width 8: a smoke test
    python benchmarks/serving_bulk.py --folder data/cifar10/test --model-base-path exports/simsiam

One server process (serving/local_server.py, REST and gRPC on loopback) serves both
transports from the same loaded model. This process is the bulk client: `embed_folder`,
the code behind `python -m serving.client --folder`, with the same --batch-size for both.
The images are `--images` files spread evenly over the folder's sorted list (linked, not
copied, into a temp dir). Each round embeds them once per transport into a new file;
the order alternates between rounds (REST first, then gRPC first) so that neither
always runs on a warmer or quieter machine. Prints images/s per transport, the
gRPC/REST ratio, the client's and the server's CPU seconds (and their sum per image, which
other jobs on the machine move less than wall time), and one JSON line.

The weights do not matter for speed: without --model-base-path an untrained encoder of
--preset (cifar: ResNet-18, width 64, 32 px) is exported to a temp dir.
"""

from __future__ import annotations

import contextlib
import io
import os
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import Parser, existing_dir, positive_int, report  # noqa: E402

from serving.client import EmbeddingClient, embed_folder, find_images, read_embeddings  # noqa: E402
from serving.grpc_client import GrpcEmbeddingClient  # noqa: E402

DEFAULT_FOLDER = os.path.join("data", "cifar10", "test")  # python make_cifar10_folder.py --out data/cifar10


def _export_untrained(preset: str, width: int | None, directory: str) -> str:
    from simsiam_tf import export
    from simsiam_tf.config import make_config
    from simsiam_tf.model import build_simsiam

    config = make_config(preset, **({"width": width} if width else {}))
    base = os.path.join(directory, "simsiam")
    export.export_saved_model(build_simsiam(config), config, base)
    return base


def _subset(folder: str, count: int, directory: str) -> list[str]:
    """`count` images spread evenly over the folder's sorted list, symlinked under `directory`."""
    names = find_images(folder)
    if len(names) < count:
        raise SystemExit(f"serving_bulk.py: error: {folder} holds {len(names)} images, fewer than --images {count}; "
                         "pass a smaller --images or a larger --folder")
    step = len(names) / count
    chosen = [names[int(i * step)] for i in range(count)]
    for name in chosen:
        link = os.path.join(directory, name)
        os.makedirs(os.path.dirname(link), exist_ok=True)
        os.symlink(os.path.abspath(os.path.join(folder, name)), link)
    return chosen


def _cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process so far (Linux /proc)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _start_server(base: str, threads: int):
    server = subprocess.Popen(
        [sys.executable, os.path.join(REPO, "serving", "local_server.py"), "--model_name", "simsiam",
         "--model_base_path", base, "--rest_api_port", "0", "--port", "0",
         "--rest_api_num_threads", str(threads), "--grpc_max_threads", str(threads)],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
    )
    line = server.stdout.readline()
    if not line.startswith("listening on "):
        server.kill()
        raise SystemExit(f"serving_bulk.py: error: the server did not start ({line.strip() or 'no output'})")
    words = line.split()
    return server, words[2], words[5]  # "listening on URL (REST) and HOST:PORT (gRPC), ..."


def run_bulk(folder: str, images: int = 2000, batch_size: int = 64, rounds: int = 2, model_base_path=None,
             preset: str = "cifar", width: int | None = None, threads: int = 4) -> dict:
    """Embed the same images over REST and gRPC, `rounds` times each; returns rows and the ratio."""
    with tempfile.TemporaryDirectory() as tmp:
        base = model_base_path or _export_untrained(preset, width, os.path.join(tmp, "models"))
        subset = os.path.join(tmp, "images")
        names = _subset(folder, images, subset)
        server, url, target = _start_server(base, threads)
        clients = {
            "rest": lambda: EmbeddingClient(url, "simsiam", batch_size=batch_size, timeout=300),
            "grpc": lambda: GrpcEmbeddingClient(target, "simsiam", batch_size=batch_size, timeout=300),
        }
        rows, files = [], {}
        try:
            warm = [open(os.path.join(subset, n), "rb").read() for n in names[:batch_size]]
            for make in clients.values():  # first calls trace the serving functions: keep them out of the timing
                client = make()
                client.embed(warm)
                client.close()
            for r in range(rounds):
                for transport in (("rest", "grpc") if r % 2 == 0 else ("grpc", "rest")):
                    out = os.path.join(tmp, f"{transport}-{r}.jsonl")
                    client = clients[transport]()
                    server_cpu, client_cpu = _cpu_seconds(server.pid), time.process_time()
                    started = time.perf_counter()
                    with contextlib.redirect_stderr(io.StringIO()):  # embed_folder's summary line
                        code = embed_folder(client, subset, out, progress=False)
                    seconds = time.perf_counter() - started
                    client_cpu, server_cpu = time.process_time() - client_cpu, _cpu_seconds(server.pid) - server_cpu
                    client.close()
                    if code != 0:
                        raise SystemExit(f"serving_bulk.py: error: {transport} round {r + 1} skipped images")
                    files[transport] = out
                    rows.append({"round": r + 1, "transport": transport, "images": len(names),
                                 "seconds": round(seconds, 2), "images_per_s": round(len(names) / seconds, 1),
                                 "client_cpu_s": round(client_cpu, 2), "server_cpu_s": round(server_cpu, 2)})
        finally:
            server.terminate()
            server.wait(timeout=30)
        rest, _ = read_embeddings(files["rest"])
        grpc, _ = read_embeddings(files["grpc"])
        same_images = [a["image"] for a in rest] == [b["image"] for b in grpc]
        diff = max(abs(x - y) for a, b in zip(rest, grpc) for x, y in zip(a["embedding"], b["embedding"]))

    def rate(transport):
        mine = [row for row in rows if row["transport"] == transport]
        return sum(row["images"] for row in mine) / sum(row["seconds"] for row in mine)

    def cpu_ms(transport):  # client + server CPU per image: less moved than wall time by other jobs
        mine = [row for row in rows if row["transport"] == transport]
        return 1000 * sum(row["client_cpu_s"] + row["server_cpu_s"] for row in mine) / sum(row["images"] for row in mine)

    return {
        "rows": rows,
        "images": len(names),
        "batch_size": batch_size,
        "rounds": rounds,
        "rest_images_per_s": round(rate("rest"), 1),
        "grpc_images_per_s": round(rate("grpc"), 1),
        "grpc_over_rest": round(rate("grpc") / rate("rest"), 3),
        "rest_cpu_ms_per_image": round(cpu_ms("rest"), 2),
        "grpc_cpu_ms_per_image": round(cpu_ms("grpc"), 2),
        "same_images": same_images,
        "max_abs_diff": diff,
    }


def main(argv=None) -> int:
    p = Parser(description=__doc__)
    p.add_argument("--folder", type=existing_dir,
                   help="JPEG/PNG folder to embed (default data/cifar10/test, which "
                        "`python make_cifar10_folder.py --out data/cifar10` writes; $SIMSIAM_CIFAR10/test when set)")
    p.add_argument("--images", type=positive_int, default=2000, help="images embedded per run (default 2000)")
    p.add_argument("--batch-size", type=positive_int, default=64, help="images per request, both transports (default 64)")
    p.add_argument("--rounds", type=positive_int, default=2, help="runs per transport, alternating order (default 2)")
    p.add_argument("--model-base-path", type=existing_dir, help="an export directory holding 1/, 2/, ...")
    p.add_argument("--preset", default="cifar", help="preset of the untrained encoder to export (default cifar)")
    p.add_argument("--width", type=positive_int, help="override the preset's backbone width")
    p.add_argument("--threads", type=positive_int, default=4, help="server threads per API (default 4)")
    p.add_argument("--quick", action="store_true", help="64 images, width 8, batches of 16: a smoke test")
    args = p.parse_args(argv)
    folder = args.folder
    if folder is None:
        env = os.environ.get("SIMSIAM_CIFAR10")
        folder = os.path.join(env, "test") if env else DEFAULT_FOLDER
        if not os.path.isdir(folder):
            p.error(f"no image folder at {folder}; run `python make_cifar10_folder.py --out data/cifar10` "
                    "or pass --folder")
    if args.quick:
        args.images, args.width, args.batch_size = min(args.images, 64), args.width or 8, min(args.batch_size, 16)
    result = run_bulk(folder, args.images, args.batch_size, args.rounds, args.model_base_path, args.preset,
                      args.width, args.threads)
    columns = [("round", "round"), ("transport", "transport"), ("images", "images"), ("seconds", "s"),
               ("images_per_s", "images/s"), ("client_cpu_s", "client CPU s"), ("server_cpu_s", "server CPU s")]
    extra = {k: v for k, v in result.items() if k != "rows"}
    extra.update(folder=os.path.basename(os.path.normpath(folder)), preset=args.preset, width=args.width,
                 model="given" if args.model_base_path else "untrained export")
    print(f"REST {result['rest_images_per_s']:,.1f} images/s, gRPC {result['grpc_images_per_s']:,.1f} images/s: "
          f"gRPC/REST {result['grpc_over_rest']:.3f} ({result['images']} images, batches of {result['batch_size']}, "
          f"{result['rounds']} rounds; embeddings differ by at most {result['max_abs_diff']:.1e}); "
          f"CPU per image, client + server: REST {result['rest_cpu_ms_per_image']:.2f} ms, "
          f"gRPC {result['grpc_cpu_ms_per_image']:.2f} ms")
    report("serving_bulk", result["rows"], columns, extra)
    return 0 if result["same_images"] and result["max_abs_diff"] <= 1e-5 else 1


if __name__ == "__main__":
    sys.exit(main())
