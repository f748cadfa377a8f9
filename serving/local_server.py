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
import os
import sys
import threading

if __package__ in (None, ""):  # run as a script: make `serving` importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from serving.rest_server import PooledHTTPServer  # noqa: E402
from serving.servables import ModelManager, base_path_problem  # noqa: E402
from simsiam_tf import tf_quiet  # noqa: E402  (no TensorFlow: bad arguments fail at once)
from simsiam_tf.cli import Parser  # noqa: E402


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
