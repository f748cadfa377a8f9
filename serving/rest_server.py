"""TF Serving's REST API over HTTP: routes, status codes and a bounded thread pool,
answering from a `servables.ModelManager`. Request bodies are parsed and responses
shaped by serving/rest_api.py.

Routing follows TF Serving's REST handler (http_server.cc, http_rest_api_handler.cc,
http_rest_api_util.cc):
- only paths under /v1/ reach the API (case-insensitive); others get 404;
- POST takes /v1/models/NAME[/versions/N]:predict; GET takes /v1/models/NAME[/versions/N]
  (status) and .../metadata. Anything else under /v1/, including GET on :predict, POST
  on a status path, another method or a query string, gets 400
  `Malformed request: METHOD PATH`;
- the model name is percent-decoded; a version is ASCII digits within int64;
- GET /v1/models without a name gets 400 `Missing model name in request.`;
- errors are `{"error": "..."}` with TF Serving's codes: 400 invalid argument, 404 not
  found, 500 internal.
- there are no version labels: /labels/L is an unknown label (400) for predict and
  metadata, and ignored by status, as in TF Serving without labels configured.
Deliberate differences (serving/README.md lists them): 411 without Content-Length, 413
above --max_request_bytes, 503 when the queue is full, 501 for :classify and :regress,
a JSON body on the 404 outside /v1/ (libevent sends an HTML page).
"""

from __future__ import annotations

import http.server
import json
import re
import threading
import urllib.parse
from concurrent.futures import ThreadPoolExecutor

from serving import rest_api
from serving.rest_api import RequestError
from serving.servables import ModelManager

# The patterns of http_rest_api_util.cc, in our own words: case-insensitive, matched on
# the raw path and query; a name is anything but '/' and ':'.
API = re.compile(r"/v1/.*", re.IGNORECASE)
POST_PATH = re.compile(
    r"/v1/models/(?P<name>[^/:]+)(?:/versions/(?P<version>[0-9]+)|/labels/(?P<label>[^/:]+))?"
    r":(?P<method>classify|regress|predict)", re.IGNORECASE)
GET_PATH = re.compile(
    r"/v1/models(?:/(?P<name>[^/:]+))?(?:/versions/(?P<version>[0-9]+)|/labels/(?P<label>[^/:]+))?"
    r"(?:/(?P<sub>metadata))?", re.IGNORECASE)


class Handler(http.server.BaseHTTPRequestHandler):
    server_version = "simsiam-local-serving/1"
    protocol_version = "HTTP/1.0"

    def log_message(self, fmt, *args):  # quiet by default; errors are in the responses
        if self.server.verbose:
            super().log_message(fmt, *args)

    def _send(self, status: int, body: dict | None):
        data = b"" if body is None else json.dumps(body).encode("utf-8")
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def do_GET(self):
        self._guard(self._get)

    def do_POST(self):
        self._guard(self._post)

    def do_OPTIONS(self):
        # CORS preflight, answered before routing with an empty body (http_server.cc).
        origin = self.headers.get("Origin", "")
        self._send(200 if re.search(r"https?://", origin) else 400, None)

    def _other_method(self):
        def fail():
            self._check_api()
            raise self._malformed_error()

        self._guard(fail)

    do_PUT = do_DELETE = do_PATCH = do_HEAD = _other_method

    def _guard(self, fn):
        self._body = None
        try:
            fn()
        except RequestError as e:
            self._drain()
            self._send(e.status, {"error": str(e)})
        except Exception as e:  # never let a request kill the worker silently
            self._send(500, {"error": f"internal error: {type(e).__name__}: {str(e)[:200]}"})

    def _read_body(self) -> bytes:
        """The body (TF Serving reads it for every method); 411 without a length, 413 above the limit."""
        length = self.headers.get("Content-Length")
        if length is None or not length.isdigit():
            raise RequestError("a Content-Length header is required", 411)
        if int(length) > self.server.max_request_bytes:
            raise RequestError(f"request body of {int(length)} bytes exceeds the limit of {self.server.max_request_bytes}", 413)
        self._body = self.rfile.read(int(length))
        return self._body

    def _drain(self):
        """Read an unread body within the limit before an error answer, so that closing
        the connection does not reset it under the client."""
        length = self.headers.get("Content-Length", "")
        if self._body is None and length.isdigit() and int(length) <= self.server.max_request_bytes:
            self._body = self.rfile.read(int(length))

    def _check_api(self):
        if not API.fullmatch(self.path):
            raise RequestError(f"Not found: {self.path[:100]}; TF Serving's REST API is under /v1/", 404)

    def _malformed_error(self) -> RequestError:
        return RequestError(f"Malformed request: {self.command} {self.path[:200]}", 400)

    def _route(self, pattern):
        self._check_api()
        match = pattern.fullmatch(self.path)
        if not match:
            raise self._malformed_error()
        return urllib.parse.unquote(match["name"] or ""), match["version"], match

    def _no_label(self, match):
        # This server has no version labels, which TF Serving answers as an unknown label
        # (server_core.cc); its status call ignores the label (get_model_status_impl.cc).
        if match["label"] is not None:
            raise RequestError(f"Unrecognized servable version label: {urllib.parse.unquote(match['label'])}", 400)

    def _get(self):
        self._drain()
        name, version, match = self._route(GET_PATH)
        if not name:
            raise RequestError("Missing model name in request.", 400)
        models = self.server.models
        if match["sub"] == "metadata":  # case-sensitive, as TF Serving compares it
            self._no_label(match)
            servable = models.get(name, version)
            self._send(200, {
                "model_spec": {"name": models.name, "signature_name": "", "version": str(servable.version)},
                "metadata": {"signature_def": {"signature_def": servable.signature_defs}},
            })
            return
        self._send(200, models.status(name, version))

    def _post(self):
        name, version, match = self._route(POST_PATH)
        if match["method"] in ("classify", "regress"):
            raise RequestError(f":{match['method']} is not implemented by this stand-in; use :predict", 501)
        if match["method"] != "predict":  # ':PREDICT' matches the pattern but no method (TF Serving: 400)
            raise self._malformed_error()
        body = self._read_body()
        # TF Serving's order: the body is parsed, then the model looked up, then the signature.
        request = rest_api.parse_json(body)
        rest_api.signature_name(request)
        self._no_label(match)
        servable = self.server.models.get(name, version)
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
