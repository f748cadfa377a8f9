"""TF Serving's REST API over HTTP: routes, status codes and a bounded thread pool,
answering from a `servables.ModelManager`. Request bodies are parsed and responses
shaped by serving/rest_api.py.
"""

from __future__ import annotations

import http.server
import json
import re
import threading
from concurrent.futures import ThreadPoolExecutor

from serving import rest_api
from serving.rest_api import RequestError
from serving.servables import ModelManager

PATH = re.compile(r"^/v1/models/(?P<name>[^/:]+)(?:/versions/(?P<version>[^/:]+))?(?P<tail>:predict|/metadata)?$")


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
        match = PATH.match(self.path.split("?", 1)[0])
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
