"""A local stand-in for TF Serving's REST and gRPC APIs, serving the same SavedModel.

Production uses TF Serving (the `tensorflow/serving` image; see serving/README.md). This
server exists because TF Serving cannot run everywhere (no Docker engine, no package for
the platform), and it lets tests and benchmarks exercise both contracts end to end.

    python serving/local_server.py --model_name simsiam --model_base_path exports/simsiam --rest_api_port 8501 --port 8500

Implemented (same paths, bodies, status codes as TF Serving):
- POST /v1/models/NAME[/versions/N]:predict, row (`instances`) and columnar (`inputs`)
  formats, `signature_name`, `{"b64": ...}` binary values;
- GET /v1/models/NAME[/versions/N] (status: every version tried, newest first, failed
  loads with their error) and GET .../metadata (every signature, default fields printed);
- gRPC on --port: PredictionService.Predict and GetModelMetadata, ModelService.GetModelStatus
  (serving/grpc_server.py), from the same loaded versions;
- version discovery from integer subdirectories of --model_base_path, polled every
  --file_system_poll_wait_seconds; the newest version is served, a new one is loaded
  before the old one is unloaded (TF Serving's "latest" policy with one version);
- errors as {"error": "..."}: 400 invalid argument or malformed request, 404 not found,
  411 no Content-Length, 413 body too large, 501 :classify/:regress, 503 overloaded,
  500 internal; over gRPC, TF Serving's status codes.
Not implemented: version labels (/labels/L answers as an unknown label), :classify and
:regress (and their gRPC methods), model config files, batching; a failed load is not
retried.
Additions: --host (TF Serving binds all interfaces; this binds 127.0.0.1 by default) and
--max_request_bytes (both APIs). Port 0 picks a free port (TF Serving: 0 turns the API
off). Unlike TF Serving, it refuses to start on a base path that holds no versions, such
as a version directory itself (`base_path_problem`).
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading

if __package__ in (None, ""):  # run as a script: make `serving` importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from serving.rest_server import PooledHTTPServer  # noqa: E402
from serving.servables import ModelManager, base_path_problem  # noqa: E402
from simsiam_tf import tf_quiet  # noqa: E402  (no TensorFlow: bad arguments fail at once)
from simsiam_tf.cli import Parser  # noqa: E402


class Servers(PooledHTTPServer):
    """The REST server, which also owns the gRPC server on the same ModelManager:
    `grpc_address` is its host:port, and `server_close()` stops both."""

    def __init__(self, address, manager, grpc_port, grpc_threads, **options):
        super().__init__(address, manager, **options)
        try:
            from serving.grpc_server import serve_grpc, target

            self.grpc_server, bound = serve_grpc(manager, address[0], grpc_port, threads=grpc_threads,
                                                 max_request_bytes=options.get("max_request_bytes", 64 << 20))
        except BaseException:
            super().server_close()
            raise
        self.grpc_address = target(address[0], bound)

    def server_close(self):
        self.grpc_server.stop(grace=None)
        super().server_close()


def serve(model_name, model_base_path, port=8501, host="127.0.0.1", threads=4, poll_seconds=1.0,
          max_request_bytes=64 << 20, verbose=False, grpc_port=0, grpc_threads=4):
    """Start the REST server on `port` and the gRPC server on `grpc_port` (0 picks a free
    port; main() passes --port, 8500 by default), both answering from one ModelManager.

    Returns (server, manager): call server.serve_forever() to run REST (gRPC runs on its
    own threads already); server.grpc_address is the gRPC host:port; server.server_close()
    stops both.
    """
    manager = ModelManager(model_name, model_base_path, poll_seconds)
    manager.start()
    try:
        server = Servers((host, port), manager, grpc_port, grpc_threads, threads=threads,
                         max_request_bytes=max_request_bytes, verbose=verbose)
    except BaseException:
        manager.stop()
        raise
    return server, manager


class Running(tuple):
    """(REST root URL, manager), with the gRPC address as `.grpc` ("127.0.0.1:PORT")."""

    grpc: str


@contextlib.contextmanager
def running(model_name, model_base_path, **options):
    """Both servers on background threads, for tests and scripts that need them for a
    while: yields (REST root URL, manager), whose `.grpc` is the gRPC host:port, and
    stops them on exit. `options` as for `serve` (port=0 and grpc_port=0, the default,
    pick free ports)."""
    server, manager = serve(model_name, model_base_path, **options)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    host, port = server.server_address[:2]
    answer = Running((f"http://{host}:{port}", manager))
    answer.grpc = server.grpc_address
    try:
        yield answer
    finally:
        manager.stop()
        server.shutdown()
        server.server_close()


def main(argv=None) -> int:
    p = Parser(prog="local_server.py", description="Local stand-in for TF Serving's REST and gRPC APIs.")
    p.add_argument("--model_name", default="default", help="TF Serving's --model_name")
    p.add_argument("--model_base_path", required=True, help="TF Serving's --model_base_path: holds 1/, 2/, ...")
    p.add_argument("--rest_api_port", type=int, default=8501, help="TF Serving's --rest_api_port (0 picks a free port)")
    p.add_argument("--rest_api_num_threads", type=int, default=4, help="TF Serving's --rest_api_num_threads")
    p.add_argument("--port", type=int, default=8500,
                   help="TF Serving's gRPC --port (default 8500; 0 picks a free port, where TF Serving turns gRPC off)")
    p.add_argument("--grpc_max_threads", type=int, default=4 * (os.cpu_count() or 1),
                   help="TF Serving's --grpc_max_threads: gRPC calls run at once (default 4 per CPU)")
    p.add_argument("--file_system_poll_wait_seconds", type=float, default=1.0, help="TF Serving's flag of that name")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (not a TF Serving flag); 0.0.0.0 for all")
    p.add_argument("--max_request_bytes", type=int, default=64 << 20,
                   help="larger bodies get 413, larger gRPC messages RESOURCE_EXHAUSTED (not a TF Serving flag)")
    p.add_argument("--verbose", action="store_true", help="log every request")
    args = p.parse_args(argv)
    problem = base_path_problem(args.model_base_path)
    if problem:
        print(f"local_server.py: error: {problem}", file=sys.stderr)
        return 2
    if not 0 <= args.rest_api_port < 65536 or args.rest_api_num_threads < 1:
        print("local_server.py: error: --rest_api_port must be 0-65535 and --rest_api_num_threads >= 1", file=sys.stderr)
        return 2
    if not 0 <= args.port < 65536 or args.grpc_max_threads < 1:
        print("local_server.py: error: --port must be 0-65535 and --grpc_max_threads >= 1", file=sys.stderr)
        return 2
    if args.port and args.port == args.rest_api_port:
        print(f"local_server.py: error: --port and --rest_api_port are both {args.port}; give gRPC and REST "
              "different ports (TF Serving: 8500 and 8501)", file=sys.stderr)
        return 2
    tf_quiet.import_tensorflow()
    try:
        server, manager = serve(
            args.model_name, args.model_base_path, args.rest_api_port, args.host,
            args.rest_api_num_threads, args.file_system_poll_wait_seconds, args.max_request_bytes, args.verbose,
            grpc_port=args.port, grpc_threads=args.grpc_max_threads,
        )
    except OSError as e:
        from serving.grpc_server import BindError

        api, port, flag = ("gRPC", args.port, "--port") if isinstance(e, BindError) else (
            "REST", args.rest_api_port, "--rest_api_port")
        print(f"local_server.py: error: cannot listen on {args.host}:{port} for {api} ({e.strerror or e}); "
              f"pass another {flag}", file=sys.stderr)
        return 2
    host, port = server.server_address[:2]
    print(f"listening on http://{host}:{port} (REST) and {server.grpc_address} (gRPC), "
          f"model {args.model_name} from {args.model_base_path}", flush=True)
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
