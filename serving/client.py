"""A small client for the exported encoder, for TF Serving or the local stand-in,
over REST (port 8501) or gRPC (port 8500).

    python -m serving.client --url http://localhost:8501 --model simsiam cat.jpg dog.png
    python -m serving.client --folder photos/ --out photos.jsonl
    python -m serving.client --grpc localhost:8500 --folder photos/ --out photos.jsonl

The first prints [{"image": "cat.jpg", "embedding": [0.12, ...]}, ...] as JSON. The
second embeds every JPEG/PNG under a folder into a JSON-lines file (`embed_folder`):
batched, resumable, with a progress bar. The third does the same over gRPC: image bytes
travel as a string tensor (no base64, no JSON) on one connection kept for the whole run.
It depends only on the serving signature (`image_bytes` in, `embedding` out). The REST
path uses only the standard library; gRPC needs grpcio and protobuf, no TensorFlow.

    from serving.client import EmbeddingClient
    from serving.grpc_client import GrpcEmbeddingClient
    vectors = EmbeddingClient("http://localhost:8501", "simsiam").embed([open("cat.jpg", "rb").read()])
    vectors = GrpcEmbeddingClient("localhost:8500", "simsiam").embed([open("cat.jpg", "rb").read()])
"""

from __future__ import annotations

import argparse
import base64
import http.client
import json
import os
import socket
import sys
import time
import urllib.error
import urllib.request

if __package__ in (None, ""):  # run as a script: make `serving` importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from serving.client_base import BaseEmbeddingClient, ClientError  # noqa: E402

RETRYABLE_STATUS = {429, 502, 503, 504}


class EmbeddingClient(BaseEmbeddingClient):
    """Embeds images through TF Serving's REST predict API (standard library only).

    Args:
        url: server root, e.g. http://localhost:8501.
        model, version, batch_size, timeout, retries, backoff: as BaseEmbeddingClient;
            retries cover connection failures, timeouts and HTTP 429/502/503/504.
    """

    def __init__(self, url, model, version=None, batch_size=32, timeout=30.0, retries=3, backoff=0.5,
                 signature="serving_default"):
        super().__init__(model, version, batch_size, timeout, retries, backoff, signature)
        self.url = url.rstrip("/")

    @property
    def model_url(self) -> str:
        path = f"{self.url}/v1/models/{self.model}"
        return path if self.version is None else f"{path}/versions/{self.version}"

    @property
    def status_call(self) -> str:
        return f"GET {self.model_url}"

    def _predict(self, batch: list[bytes]) -> list[list[float]]:
        body = {
            "signature_name": self.signature,
            "instances": [{"image_bytes": {"b64": base64.b64encode(b).decode("ascii")}} for b in batch],
        }
        response = self._request("POST", ":predict", body)
        predictions = response.get("predictions") if isinstance(response, dict) else None
        if not isinstance(predictions, list):
            raise ClientError(f"POST {self.model_url}:predict: the answer has no \"predictions\" list "
                              f"({_snippet(json.dumps(response).encode())}); is {self.url} a TF Serving REST API?")
        if len(predictions) != len(batch):
            raise ClientError(f"server returned {len(predictions)} embeddings for {len(batch)} images")
        return predictions

    def status(self) -> dict:
        return self._request("GET", "", None)

    def metadata(self) -> dict:
        return self._request("GET", "/metadata", None)

    def _request(self, method, suffix, body):
        data = None if body is None else json.dumps(body).encode("utf-8")
        url = self.model_url + suffix
        attempt = 0
        while True:
            request = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json"})
            try:
                with urllib.request.urlopen(request, timeout=self.timeout) as response:
                    return _json_body(method, url, response.status, response.headers, response.read())
            except urllib.error.HTTPError as e:
                message = _error_message(e)
                if e.code not in RETRYABLE_STATUS or attempt >= self.retries:
                    raise ClientError(f"{method} {url}: HTTP {e.code}: {message}", status=e.code) from None
                reason = f"HTTP {e.code}"
            except http.client.HTTPException as e:
                # Not HTTP at all, e.g. TF Serving's gRPC port (8500) instead of REST (8501).
                if attempt >= self.retries:
                    raise ClientError(f"{method} {url}: the server did not answer in HTTP ({type(e).__name__}); "
                                      "expected TF Serving's REST API (port 8501 by default, gRPC is 8500)") from None
                reason = type(e).__name__
            except (urllib.error.URLError, socket.timeout, ConnectionError) as e:
                if attempt >= self.retries:
                    why = getattr(e, "reason", e)
                    raise ClientError(f"{method} {url}: cannot reach the server after {attempt + 1} attempt(s) ({why})") from None
                reason = type(e).__name__
            delay = self.backoff * 2**attempt
            print(f"retrying {method} {url} in {delay:.1f} s ({reason})", file=sys.stderr)
            time.sleep(delay)
            attempt += 1


def _error_message(error: urllib.error.HTTPError) -> str:
    """TF Serving's {"error": ...} text, else what came back instead (a proxy's HTML page)."""
    body = error.read()
    try:
        return json.loads(body.decode("utf-8"))["error"]
    except Exception:
        what = f"{error.reason or 'no message'}"
        return f"{what}; the body is not TF Serving's JSON ({_snippet(body)})" if body else what


def _snippet(body: bytes, limit: int = 80) -> str:
    """The start of a response body, on one line, for error messages."""
    text = " ".join(body[:limit * 2].decode("utf-8", "replace").split())
    return repr(text[:limit] + ("..." if len(text) > limit else "")) if text else "an empty body"


def _json_body(method, url, status, headers, body: bytes):
    """The JSON of a 2xx answer; anything else (an HTML page from a proxy or another
    service on that port) is a ClientError saying what came back and what was expected."""
    try:
        return json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        kind = headers.get("Content-Type") or "no Content-Type"
        raise ClientError(
            f"{method} {url}: HTTP {status} answered with {kind} that is not JSON ({_snippet(body)}); "
            f"expected TF Serving's REST API at {url} (check --url and --model: REST is port 8501 by default)",
            status=status,
        ) from None


IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


def find_images(folder: str) -> list[str]:
    """JPEG/PNG files under `folder`, recursively, as sorted '/'-separated relative paths."""
    found = []
    for root, dirs, files in os.walk(folder):
        dirs.sort()
        for name in files:
            if name.lower().endswith(IMAGE_SUFFIXES):
                found.append(os.path.relpath(os.path.join(root, name), folder).replace(os.sep, "/"))
    return sorted(found)


def read_embeddings(path: str) -> tuple[list[dict], int]:
    """The records of a JSON-lines embeddings file and the number of bytes they fill.

    Each line is {"image": relative path, "model_version": int, "embedding": [float, ...]}.
    Bytes after the last newline are a line a killed run left half-written: they are
    not a record, and the byte count stops before them. A complete line that is not a
    record is a ClientError (the file is not one this client wrote).
    """
    if not os.path.exists(path):
        return [], 0
    with open(path, "rb") as f:
        data = f.read()
    end = data.rfind(b"\n") + 1
    advice = "pass another --out, or delete the file to start over"
    records = [parse_record(line, path, number, advice) for number, line in enumerate(data[:end].splitlines(), 1)]
    return records, end


def parse_record(line: bytes, path: str, number: int, advice: str) -> dict:
    """Line `number` of the embeddings file `path` as its record, or a ClientError that
    names the line and ends with `advice`."""
    try:
        record = json.loads(line)
        ok = isinstance(record["image"], str) and isinstance(record["embedding"], list)
    except (ValueError, KeyError, TypeError):
        ok = False
    if not ok:
        raise ClientError(f"{path}, line {number}: not an embeddings record ({_snippet(line)}); {advice}")
    return record


def _served_version(client: "BaseEmbeddingClient") -> int:
    """The version the server serves now: the newest AVAILABLE one in its status."""
    versions = [int(v["version"]) for v in client.status().get("model_version_status", [])
                if v.get("state") == "AVAILABLE"]
    if not versions:
        raise ClientError(f"{client.status_call}: no version of the model is AVAILABLE")
    return max(versions)


def embed_folder(client: "BaseEmbeddingClient", folder: str, out: str, progress: bool = True) -> int:
    """Embed every JPEG/PNG under `folder` into the JSON-lines file `out`; return the exit code.

    Resumable: the records already in `out` are kept and their images not sent again;
    a half-written last line (the run was killed mid-write) is cut off first. Each
    request's records are appended and flushed to disk together, so a kill loses at
    most the request in flight. The model version is pinned for the whole file (the
    newest at the first run, or `client.version`): embeddings of two versions are not
    comparable, so a file begun with another version is refused.

    An image the server cannot embed, or a file that cannot be read, is reported on
    stderr by name and skipped; the return value is 1 when any were skipped (a rerun
    retries just those), else 0. Errors that are not one image's fault raise ClientError.
    """
    records, good_bytes = read_embeddings(out)
    pinned = {r.get("model_version") for r in records}
    version = client.version or _served_version(client)
    if pinned and pinned != {version}:
        old = sorted(v for v in pinned if v is not None)
        which = ", ".join(map(str, old)) or "unknown"
        fix = f"pass --version {old[-1]} to finish with it, or" if old else "pass"
        raise ClientError(f"{out} holds embeddings of model version {which} and the server serves version "
                          f"{version}; {fix} another --out to start over")
    client.version = version  # every request of this file goes to the same version

    names = find_images(folder)
    done = {r["image"] for r in records}
    todo = [n for n in names if n not in done]
    bar = _Progress(len(names), len(names) - len(todo), enabled=progress)
    skipped = embedded = 0
    started = time.monotonic()
    try:
        with open(out, "ab") as f:
            f.truncate(good_bytes)  # drop a half-written last line
            for start in range(0, len(todo), client.batch_size):
                batch = todo[start : start + client.batch_size]
                lines, failed = _embed_files(client, folder, batch, version, bar)
                f.write("".join(lines).encode("utf-8"))
                f.flush()
                os.fsync(f.fileno())
                embedded += len(lines)
                skipped += failed
                bar.update(len(batch))
    finally:
        bar.close()
    seconds = time.monotonic() - started
    rate = f", {embedded / seconds:.0f} images/s" if embedded and seconds > 0 else ""
    print(f"{out}: {embedded} embedded in {seconds:.1f} s{rate}, {len(names) - len(todo)} already there, "
          f"{skipped} skipped (model version {version})", file=sys.stderr)
    return 1 if skipped else 0


def _embed_files(client, folder, names, version, bar) -> tuple[list[str], int]:
    """(JSON lines of the files `names` under `folder`, how many were skipped); one
    request unless the server must be asked which image is bad."""
    images, readable, skipped = [], [], 0
    for name in names:
        try:
            with open(os.path.join(folder, name), "rb") as f:
                images.append(f.read())
            readable.append(name)
        except OSError as e:
            skipped += 1
            bar.note(f"client: skipped {name}: cannot read it ({e.strerror})")
    vectors, failures = client.embed_skipping_bad(images) if images else ([], {})
    lines = []
    for i, (name, vector) in enumerate(zip(readable, vectors)):
        if vector is None:
            skipped += 1
            bar.note(f"client: skipped {name}: {failures[i]}")
            continue
        # 9 significant digits hold a float32 exactly and keep the file small.
        lines.append(json.dumps({"image": name, "model_version": version,
                                 "embedding": [float(f"{x:.9g}") for x in vector]}) + "\n")
    return lines, skipped


class _Progress:
    """A one-line progress bar on stderr: redrawn in place on a terminal, a plain line
    every 10 s otherwise (a log file should not fill with carriage returns)."""

    def __init__(self, total: int, done: int = 0, enabled: bool = True):
        self.total, self.done, self.first = total, done, done
        self.enabled = enabled
        self.tty = sys.stderr.isatty()
        self.started = self.last = time.monotonic()

    def update(self, n: int) -> None:
        self.done += n
        now = time.monotonic()
        if self.enabled and (now - self.last >= (0.2 if self.tty else 10.0) or self.done == self.total):
            self.last = now
            self._draw(now)

    def note(self, message: str) -> None:
        print(("\r\033[K" if self.enabled and self.tty else "") + message, file=sys.stderr)

    def _draw(self, now: float) -> None:
        fraction = self.done / self.total if self.total else 1.0
        bar = "#" * int(fraction * 30)
        rate = (self.done - self.first) / max(now - self.started, 1e-9)
        eta = (self.total - self.done) / rate if rate > 0 else 0
        text = (f"embedding {self.done:,}/{self.total:,} [{bar:<30}] {fraction:6.1%} "
                f"{rate:,.0f} images/s, {eta // 60:.0f}:{eta % 60:02.0f} left")
        print(("\r" + text) if self.tty else text, end="" if self.tty else "\n", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.enabled and self.tty:
            print(file=sys.stderr)


def _at_least(minimum):
    """An argparse type: a whole number >= minimum, refused in one line otherwise."""

    def parse(text):
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < minimum:
            raise argparse.ArgumentTypeError(f"expected a whole number of at least {minimum}, got {text!r}")
        return value

    return parse


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def build_parser():
    p = _Parser(prog="python -m serving.client", description="Embed images with a served SimSiam encoder.")
    p.add_argument("images", nargs="*", help="JPEG or PNG files (printed as JSON); or use --folder")
    p.add_argument("--folder", help="embed every JPEG/PNG under this folder into --out (resumable)")
    p.add_argument("--out", help="with --folder: JSON-lines file, one {\"image\", \"model_version\", \"embedding\"} per line")
    p.add_argument("--url", help="REST server root (default http://localhost:8501)")
    p.add_argument("--grpc", metavar="HOST:PORT",
                   help="use TF Serving's gRPC API at HOST:PORT instead of REST (its port is 8500 by default): "
                        "no base64 or JSON, one connection; needs grpcio and protobuf")
    p.add_argument("--model", default="simsiam", help="model name (default simsiam)")
    p.add_argument("--version", type=_at_least(1), help="model version (default: the newest)")
    p.add_argument("--batch-size", type=_at_least(1), default=32, help="images per request (default 32)")
    p.add_argument("--timeout", type=float, default=30.0, help="seconds per request")
    p.add_argument("--retries", type=_at_least(0), default=3,
                   help="retries on connection errors and 429/502/503/504 (gRPC: UNAVAILABLE, RESOURCE_EXHAUSTED, "
                        "DEADLINE_EXCEEDED)")
    p.add_argument("--no-progress", action="store_true", help="with --folder: no progress bar on stderr")
    return p


def _client(p, args) -> BaseEmbeddingClient:
    """The REST or gRPC client the arguments ask for."""
    options = dict(version=args.version, batch_size=args.batch_size, timeout=args.timeout, retries=args.retries)
    if args.grpc is None:
        return EmbeddingClient(args.url or "http://localhost:8501", args.model, **options)
    if args.url is not None:
        p.error("give --url (REST) or --grpc (gRPC), not both")
    host, _, port = args.grpc.rpartition(":")
    if not host or not port.isdigit() or "/" in args.grpc:
        p.error(f"--grpc {args.grpc!r}: expected HOST:PORT, e.g. localhost:8500 (no http://)")
    from serving.grpc_client import GrpcEmbeddingClient  # grpcio only for --grpc

    return GrpcEmbeddingClient(args.grpc, args.model, **options)


def main(argv=None) -> int:
    p = build_parser()
    args = p.parse_args(argv)
    if args.folder is not None or args.out is not None:
        if args.folder is None or args.out is None or args.images:
            p.error("--folder and --out go together, without image arguments")
        if not os.path.isdir(args.folder):
            p.error(f"--folder {args.folder!r} is not a directory")
        client = _client(p, args)
        try:
            return embed_folder(client, args.folder, args.out, progress=not args.no_progress)
        except ClientError as e:
            again = " (what is in it is kept: run the same command again to continue)" if os.path.exists(args.out) else ""
            print(f"client: error: {e}{again}", file=sys.stderr)
            return 1
        except OSError as e:  # --out in a missing or read-only directory
            print(f"client: error: cannot write {args.out}: {e.strerror}; pass an --out in a writable directory",
                  file=sys.stderr)
            return 2
        finally:
            client.close()
    if not args.images:
        p.error("give image files, or --folder DIR --out FILE")
    images = []
    for path in args.images:
        try:
            with open(path, "rb") as f:
                images.append(f.read())
        except OSError as e:
            print(f"client: error: cannot read {path}: {e.strerror}", file=sys.stderr)
            return 2
    client = _client(p, args)
    try:
        vectors = client.embed(images)
    except ClientError as e:
        where = f"{args.images[e.index]}: " if e.index is not None else ""
        print(f"client: error: {where}{e}", file=sys.stderr)
        return 1
    finally:
        client.close()
    json.dump([{"image": path, "embedding": v} for path, v in zip(args.images, vectors)], sys.stdout)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
