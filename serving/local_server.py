"""A local stand-in for TF Serving's REST API, serving the same SavedModel.

Production uses TF Serving (the `tensorflow/serving` image; see serving/README.md). This
server exists because TF Serving cannot run everywhere (no Docker engine, no package for
the platform), and it lets tests and benchmarks exercise the REST contract end to end.

    python serving/local_server.py --model_name simsiam --model_base_path exports/simsiam --rest_api_port 8501

Implemented (same paths, bodies, status codes as TF Serving):
- POST /v1/models/NAME[/versions/N]:predict, row (`instances`) and columnar (`inputs`)
  formats, `signature_name`, `{"b64": ...}` binary values;
- GET /v1/models/NAME[/versions/N] (status) and GET .../metadata (signature defs);
- version discovery from integer subdirectories of --model_base_path, polled every
  --file_system_poll_wait_seconds; the newest version is served, a new one is loaded
  before the old one is unloaded (TF Serving's "latest" policy with one version);
- errors as {"error": "..."}: 400 invalid argument, 404 not found, 413 body too large,
  503 overloaded, 500 internal.
Not implemented: gRPC, /labels/, :classify and :regress, model config files, batching.
Additions: --host (TF Serving binds all interfaces; this binds 127.0.0.1 by default) and
--max_request_bytes. Unlike TF Serving, it refuses to start on a base path that holds
no versions, such as a version directory itself (`base_path_problem`).
"""

from __future__ import annotations

import contextlib
import http.server
import json
import os
import re
import sys
import threading
from concurrent.futures import ThreadPoolExecutor

if __package__ in (None, ""):  # run as a script: make `serving` importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from serving import rest_api  # noqa: E402
from serving.rest_api import RequestError, TensorInfo  # noqa: E402
from simsiam_tf import tf_quiet  # noqa: E402  (no TensorFlow: bad arguments fail at once)
from simsiam_tf.cli import Parser  # noqa: E402

_VERSION = re.compile(r"[0-9]{1,18}")  # ASCII digits only: str.isdigit() accepts "١"
_PATH = re.compile(r"^/v1/models/(?P<name>[^/:]+)(?:/versions/(?P<version>[^/:]+))?(?P<tail>:predict|/metadata)?$")


class ServableVersion:
    """One loaded SavedModel version with its signatures."""

    def __init__(self, version: int, path: str):
        import tensorflow as tf

        self.version = version
        self.path = path
        self._loaded = tf.saved_model.load(path)
        self.functions = {
            name: fn for name, fn in self._loaded.signatures.items() if not name.startswith("__")
        }
        self.inputs = {
            name: {
                k: TensorInfo("string" if spec.dtype == tf.string else spec.dtype.name, tuple(spec.shape.as_list()))
                for k, spec in fn.structured_input_signature[1].items()
            }
            for name, fn in self.functions.items()
        }
        self.signature_defs = _signature_defs(path)

    def predict(self, signature: str, inputs: dict) -> dict:
        import numpy as np
        import tensorflow as tf

        fn = self.functions[signature]
        tensors = {
            k: tf.constant(list(v), tf.string) if self.inputs[signature][k].dtype == "string" else tf.constant(v)
            for k, v in inputs.items()
        }
        try:
            outputs = fn(**tensors)
        except (tf.errors.InvalidArgumentError, tf.errors.UnimplementedError) as e:
            raise RequestError(_tf_error_text(e.message))
        return {k: np.asarray(v) for k, v in outputs.items()}


def _tf_error_text(message: str) -> str:
    """The line of a TensorFlow error that says what was wrong, without graph noise."""
    noise = ("Graph execution error", "Detected at node", "<stack traces", "[[", "File ")
    lines = [l.strip() for l in message.splitlines()]
    useful = [l for l in lines if l and not l.startswith(noise)]
    return (useful[-1] if useful else "invalid argument")[:300]


def _signature_defs(path: str) -> dict:
    """The SignatureDefMap of a SavedModel as TF Serving's metadata JSON writes it."""
    from google.protobuf import json_format
    from tensorflow.core.protobuf import saved_model_pb2

    saved = saved_model_pb2.SavedModel()
    with open(os.path.join(path, "saved_model.pb"), "rb") as f:
        saved.ParseFromString(f.read())
    defs = {}
    for name, sig in saved.meta_graphs[0].signature_def.items():
        if not name.startswith("__"):
            defs[name] = json_format.MessageToDict(sig, preserving_proto_field_name=True)
    return defs


class ModelManager:
    """Finds versions under the base path and keeps the newest one loaded."""

    def __init__(self, name: str, base_path: str, poll_seconds: float = 1.0):
        self.name = name
        self.base_path = base_path
        self.poll_seconds = poll_seconds
        self._current: ServableVersion | None = None
        self._failed: dict[int, str] = {}
        self._stop = threading.Event()
        self._thread = None

    def available_versions(self) -> list[int]:
        try:
            entries = os.listdir(self.base_path)
        except OSError:
            return []
        return sorted(
            int(d) for d in entries
            if _VERSION.fullmatch(d) and os.path.isfile(os.path.join(self.base_path, d, "saved_model.pb"))
        )

    def poll(self) -> None:
        """Load the newest version if it is newer than the served one."""
        versions = [v for v in self.available_versions() if v not in self._failed]
        if not versions:
            return
        newest = versions[-1]
        current = self._current
        if current is not None and current.version >= newest:
            return
        try:
            loaded = ServableVersion(newest, os.path.join(self.base_path, str(newest)))
        except Exception as e:  # a damaged version must not take the server down
            self._failed[newest] = str(e)[:300]
            print(f"failed to load version {newest}: {self._failed[newest]}", file=sys.stderr, flush=True)
            return
        self._current = loaded  # one reference swap: a request sees the old or the new version
        print(f"serving {self.name} version {newest}", file=sys.stderr, flush=True)

    def start(self) -> None:
        self.poll()

        def loop():
            while not self._stop.wait(self.poll_seconds):
                self.poll()

        self._thread = threading.Thread(target=loop, name="version-poller", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def get(self, name: str, version: str | None) -> ServableVersion:
        if name != self.name:
            raise RequestError(f"Servable not found for request: Latest({name})", 404)
        current = self._current
        if version is None:
            if current is None:
                raise RequestError(f"Servable not found for request: Latest({name})", 404)
            return current
        if not _VERSION.fullmatch(version):
            raise RequestError(f"Invalid version '{version[:20]}': versions are integers", 400)
        if current is None or current.version != int(version):
            raise RequestError(f"Servable not found for request: Specific({name}, {int(version)})", 404)
        return current

    def status(self, name: str, version: str | None) -> dict:
        servable = self.get(name, version)
        return {
            "model_version_status": [
                {"version": str(servable.version), "state": "AVAILABLE", "status": {"error_code": "OK", "error_message": ""}}
            ]
        }


class Handler(http.server.BaseHTTPRequestHandler):
    server_version = "simsiam-local-serving/1"
    protocol_version = "HTTP/1.0"

    def log_message(self, fmt, *args):  # quiet by default; errors are in the responses
        if self.server.verbose:
            super().log_message(fmt, *args)

    def _send(self, status: int, body: dict):
        data = json.dumps(body).encode("utf-8")
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _route(self):
        match = _PATH.match(self.path.split("?", 1)[0])
        if not match:
            raise RequestError(f"Malformed request: {self.command} {self.path[:100]}", 404)
        return match["name"], match["version"], match["tail"]

    def do_GET(self):
        self._guard(self._get)

    def do_POST(self):
        self._guard(self._post)

    def _guard(self, fn):
        try:
            fn()
        except RequestError as e:
            self._send(e.status, {"error": str(e)})
        except Exception as e:  # never let a request kill the worker silently
            self._send(500, {"error": f"internal error: {type(e).__name__}: {str(e)[:200]}"})

    def _get(self):
        name, version, tail = self._route()
        models = self.server.models
        if tail == ":predict":
            raise RequestError("predict needs POST", 405)
        if tail == "/metadata":
            servable = models.get(name, version)
            self._send(200, {
                "model_spec": {"name": name, "signature_name": "", "version": str(servable.version)},
                "metadata": {"signature_def": {"signature_def": servable.signature_defs}},
            })
            return
        self._send(200, models.status(name, version))

    def _post(self):
        name, version, tail = self._route()
        if tail != ":predict":
            raise RequestError(f"Malformed request: POST {self.path[:100]}; use :predict", 404)
        length = self.headers.get("Content-Length")
        if length is None or not length.isdigit():
            raise RequestError("a Content-Length header is required", 411)
        if int(length) > self.server.max_request_bytes:
            raise RequestError(f"request body of {int(length)} bytes exceeds the limit of {self.server.max_request_bytes}", 413)
        body = self.rfile.read(int(length))
        servable = self.server.models.get(name, version)
        request = rest_api.parse_json(body)
        signature, inputs, rows = rest_api.parse_predict(request, servable.inputs)
        outputs = servable.predict(signature, inputs)
        self._send(200, rest_api.format_predict(outputs, rows))


class PooledHTTPServer(http.server.HTTPServer):
    """An HTTP server whose requests run on a bounded thread pool.

    At most `threads` requests run at once and `queue` more wait; beyond that the
    server answers 503 at once instead of piling up threads or memory.
    """

    daemon_threads = True

    def __init__(self, address, models: ModelManager, threads=4, queue=64, max_request_bytes=64 << 20, verbose=False):
        super().__init__(address, Handler)
        self.models = models
        self.max_request_bytes = max_request_bytes
        self.verbose = verbose
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="rest")
        self._slots = threading.BoundedSemaphore(threads + queue)

    def process_request(self, request, client_address):
        if not self._slots.acquire(blocking=False):
            try:
                body = b'{"error": "server overloaded; retry later"}'
                request.sendall(
                    b"HTTP/1.0 503 Service Unavailable\r\nContent-Type: application/json\r\n"
                    b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body
                )
            finally:
                self.shutdown_request(request)
            return
        self._pool.submit(self._work, request, client_address)

    def _work(self, request, client_address):
        try:
            request.settimeout(30)
            self.finish_request(request, client_address)
        except Exception:
            self.handle_error(request, client_address)
        finally:
            self.shutdown_request(request)
            self._slots.release()

    def server_close(self):
        super().server_close()
        self._pool.shutdown(wait=False, cancel_futures=True)


def base_path_problem(path: str) -> str | None:
    """Why `path` cannot be a model base path, naming the fix; None when it can be.

    A common slip is to pass the version directory export.py prints (exports/simsiam/1):
    the server would then look for versions inside it, find none, and answer 404 to
    everything. TF Serving waits silently for a first version; this server refuses to
    start instead, so the mistake shows at once.
    """
    if not os.path.isdir(path):
        return f"--model_base_path {path!r} is not a directory; pass the --export-dir export.py wrote to"
    if os.path.isfile(os.path.join(path, "saved_model.pb")):
        parent = os.path.dirname(os.path.normpath(path)) or "."
        return (f"--model_base_path {path!r} is a version directory (it holds saved_model.pb); "
                f"pass the directory that holds the versions 1/, 2/, ...: --model_base_path {parent}")
    if not any(_VERSION.fullmatch(d) and os.path.isdir(os.path.join(path, d)) for d in os.listdir(path)):
        return (f"--model_base_path {path!r} holds no version directories (1/, 2/, ..., each with saved_model.pb); "
                "pass the --export-dir export.py wrote to, e.g. --model_base_path exports/simsiam")
    return None


def serve(model_name, model_base_path, port=8501, host="127.0.0.1", threads=4, poll_seconds=1.0,
          max_request_bytes=64 << 20, verbose=False):
    """Start the server; returns (server, manager). Call server.serve_forever() to run it."""
    manager = ModelManager(model_name, model_base_path, poll_seconds)
    manager.start()
    server = PooledHTTPServer((host, port), manager, threads=threads, max_request_bytes=max_request_bytes, verbose=verbose)
    return server, manager


@contextlib.contextmanager
def running(model_name, model_base_path, **options):
    """The server on a background thread, for tests and scripts that need one for a
    while: yields (root URL, manager) and stops it on exit. `options` as for `serve`
    (port=0 picks a free port)."""
    server, manager = serve(model_name, model_base_path, **options)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    host, port = server.server_address[:2]
    try:
        yield f"http://{host}:{port}", manager
    finally:
        manager.stop()
        server.shutdown()
        server.server_close()


def main(argv=None) -> int:
    p = Parser(prog="local_server.py", description="Local stand-in for TF Serving's REST API.")
    p.add_argument("--model_name", default="default", help="TF Serving's --model_name")
    p.add_argument("--model_base_path", required=True, help="TF Serving's --model_base_path: holds 1/, 2/, ...")
    p.add_argument("--rest_api_port", type=int, default=8501, help="TF Serving's --rest_api_port (0 picks a free port)")
    p.add_argument("--rest_api_num_threads", type=int, default=4, help="TF Serving's --rest_api_num_threads")
    p.add_argument("--file_system_poll_wait_seconds", type=float, default=1.0, help="TF Serving's flag of that name")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (not a TF Serving flag); 0.0.0.0 for all")
    p.add_argument("--max_request_bytes", type=int, default=64 << 20, help="larger bodies get 413 (not a TF Serving flag)")
    p.add_argument("--verbose", action="store_true", help="log every request")
    args = p.parse_args(argv)
    problem = base_path_problem(args.model_base_path)
    if problem:
        print(f"local_server.py: error: {problem}", file=sys.stderr)
        return 2
    if not 0 <= args.rest_api_port < 65536 or args.rest_api_num_threads < 1:
        print("local_server.py: error: --rest_api_port must be 0-65535 and --rest_api_num_threads >= 1", file=sys.stderr)
        return 2
    tf_quiet.import_tensorflow()
    try:
        server, manager = serve(
            args.model_name, args.model_base_path, args.rest_api_port, args.host,
            args.rest_api_num_threads, args.file_system_poll_wait_seconds, args.max_request_bytes, args.verbose,
        )
    except OSError as e:
        print(f"local_server.py: error: cannot listen on {args.host}:{args.rest_api_port} ({e.strerror})", file=sys.stderr)
        return 2
    host, port = server.server_address[:2]
    print(f"listening on http://{host}:{port} (model {args.model_name} from {args.model_base_path})", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        manager.stop()
        server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
