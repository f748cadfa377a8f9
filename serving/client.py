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

    from serving.client import EmbeddingClient, GrpcEmbeddingClient
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

RETRYABLE_STATUS = {429, 502, 503, 504}


class ClientError(Exception):
    """The server rejected a request, or could not be reached after the retries.

    `status` is the HTTP status (None when the server was not reached); over gRPC it is
    the HTTP status TF Serving's REST API gives for the same error, and `code` is the gRPC
    status name ("INVALID_ARGUMENT"). `index` is the position of the image the server
    could not embed, when one image is to blame.
    """

    def __init__(self, message, status=None, index=None, code=None):
        super().__init__(message)
        self.status = status
        self.index = index
        self.code = code


# How TF Serving's batching refuses a request larger than its max_batch_size
# ("Task size 100 is larger than maximum input batch size 64").
_TOO_LARGE = ("larger than maximum input batch size", "max_batch_size")


class BaseEmbeddingClient:
    """What the commands need from a server, whatever the transport: batching, finding
    the image to blame, learning the server's batch limit. A transport subclass
    implements `_predict(batch)` (one request: a list of embeddings, or ClientError
    with the HTTP-equivalent `status`), `status()` (TF Serving's REST JSON of the model
    status) and `status_call` (what to name in an error about it).

    Args:
        model: the served model name.
        version: a specific model version, or None for the newest.
        batch_size: images per request.
        timeout: seconds per request.
        retries: extra attempts after a failure to connect, a timeout or an overloaded
            server, with exponential backoff starting at `backoff` seconds.
    """

    def __init__(self, model, version=None, batch_size=32, timeout=30.0, retries=3, backoff=0.5,
                 signature="serving_default"):
        if batch_size < 1:
            raise ValueError("batch_size must be at least 1")
        self.model = model
        self.version = version
        self.batch_size = batch_size
        self.timeout = timeout
        self.retries = retries
        self.backoff = backoff
        self.signature = signature

    def _predict(self, batch: list[bytes]) -> list[list[float]]:
        raise NotImplementedError

    def status(self) -> dict:
        raise NotImplementedError

    @property
    def status_call(self) -> str:
        raise NotImplementedError

    def close(self) -> None:
        """Release the connection, if the transport keeps one."""

    def embed(self, images: list[bytes]) -> list[list[float]]:
        """Embeddings of JPEG/PNG-encoded images, in order, in requests of `batch_size`.

        A server that refuses the request size (TF Serving with batching and a smaller
        max_batch_size) makes the client halve `batch_size` until it fits, and keep it.
        A request the server cannot run (an image that does not decode fails its whole
        request) is split until the image to blame is found: ClientError names its
        index.
        """
        return self._embed_all(images, failures=None)

    def embed_skipping_bad(self, images: list[bytes]) -> tuple[list[list[float] | None], dict[int, str]]:
        """As `embed`, but an image the server cannot embed does not stop the others.

        Returns (embeddings with None where an image failed, {index: server's message}).
        Errors that are not one image's fault (server unreachable, unknown model) still
        raise ClientError.
        """
        failures: dict[int, str] = {}
        return self._embed_all(images, failures), failures

    def _embed_all(self, images, failures):
        out = []
        start = 0
        while start < len(images):
            batch = images[start : start + self.batch_size]
            try:
                out.extend(self._embed_finding_bad(batch, start, failures))
            except ClientError as e:
                if e.status != 400 or not any(t in str(e) for t in _TOO_LARGE) or len(batch) == 1:
                    raise
                self.batch_size = max(1, len(batch) // 2)
                print(f"note: the server refused {len(batch)} images per request; sending {self.batch_size}",
                      file=sys.stderr)
                continue
            start += len(batch)
        return out

    def _embed_finding_bad(self, batch: list[bytes], offset: int, failures=None) -> list:
        try:
            return self._predict(batch)
        except ClientError as e:
            if e.status != 400 or any(t in str(e) for t in _TOO_LARGE):
                raise
            if len(batch) == 1:
                if failures is None:
                    raise ClientError(f"image {offset} cannot be embedded: {e}", status=400, index=offset,
                                      code=e.code) from None
                failures[offset] = str(e)
                return [None]
        half = len(batch) // 2
        return (self._embed_finding_bad(batch[:half], offset, failures)
                + self._embed_finding_bad(batch[half:], offset + half, failures))


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


# gRPC: TF Serving's codes -> the HTTP status its REST API gives for them
# (tensorflow_serving/model_servers/http_server.cc), so one batching logic serves both.
_GRPC_TO_HTTP = {
    "INVALID_ARGUMENT": 400, "FAILED_PRECONDITION": 400, "OUT_OF_RANGE": 400, "NOT_FOUND": 404,
    "ALREADY_EXISTS": 409, "ABORTED": 409, "PERMISSION_DENIED": 403, "UNAUTHENTICATED": 401,
    "RESOURCE_EXHAUSTED": 429, "UNIMPLEMENTED": 501, "UNAVAILABLE": 503, "DEADLINE_EXCEEDED": 504,
    "CANCELLED": 499,
}
# What the REST path retries (429, 503, 504), in gRPC's words.
RETRYABLE_CODES = {"UNAVAILABLE", "RESOURCE_EXHAUSTED", "DEADLINE_EXCEEDED"}
_MODEL_VERSION_STATES = {0: "UNKNOWN", 10: "START", 20: "LOADING", 30: "AVAILABLE", 40: "UNLOADING", 50: "END"}
_DT_FLOAT, _DT_DOUBLE, _DT_STRING = 1, 2, 7  # tensorflow/core/framework/types.proto


def _grpc_messages() -> dict:
    """Message classes for the calls the gRPC client makes, keyed by short name.

    The messages of the `tensorflow-serving-api` package import `tensorflow` (its
    TensorProto lives there), which takes seconds and a large import. These are the same
    messages cut down to the fields the client reads and writes, with TF Serving's names
    and field numbers, in a private descriptor pool: the bytes on the wire are the same.
    tests/test_serving_grpc.py checks every field against the package's messages. Enums
    are declared int32, which has the same wire encoding.
    """
    global _MESSAGES
    if _MESSAGES is None:
        from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

        F = descriptor_pb2.FieldDescriptorProto
        kinds = {"int64": F.TYPE_INT64, "int32": F.TYPE_INT32, "string": F.TYPE_STRING, "bytes": F.TYPE_BYTES,
                 "float": F.TYPE_FLOAT, "double": F.TYPE_DOUBLE}
        layout = {  # message -> [(field, number, type or message, repeated?)]
            "tensorflow.TensorShapeProto.Dim": [("size", 1, "int64", False)],
            "tensorflow.TensorShapeProto": [("dim", 2, ".tensorflow.TensorShapeProto.Dim", True)],
            "tensorflow.TensorProto": [
                ("dtype", 1, "int32", False), ("tensor_shape", 2, ".tensorflow.TensorShapeProto", False),
                ("tensor_content", 4, "bytes", False), ("float_val", 5, "float", True),
                ("double_val", 6, "double", True), ("string_val", 8, "bytes", True)],
            "google.protobuf.Int64Value": [("value", 1, "int64", False)],
            "tensorflow.serving.ModelSpec": [
                ("name", 1, "string", False), ("version", 2, ".google.protobuf.Int64Value", False),
                ("signature_name", 3, "string", False)],
            "tensorflow.serving.PredictRequest": [
                ("model_spec", 1, ".tensorflow.serving.ModelSpec", False),
                ("inputs", 2, ".tensorflow.serving.PredictRequest.InputsEntry", True)],
            "tensorflow.serving.PredictRequest.InputsEntry": [
                ("key", 1, "string", False), ("value", 2, ".tensorflow.TensorProto", False)],
            "tensorflow.serving.PredictResponse": [
                ("outputs", 1, ".tensorflow.serving.PredictResponse.OutputsEntry", True),
                ("model_spec", 2, ".tensorflow.serving.ModelSpec", False)],
            "tensorflow.serving.PredictResponse.OutputsEntry": [
                ("key", 1, "string", False), ("value", 2, ".tensorflow.TensorProto", False)],
            "tensorflow.serving.GetModelStatusRequest": [("model_spec", 1, ".tensorflow.serving.ModelSpec", False)],
            "tensorflow.serving.StatusProto": [("error_code", 1, "int32", False), ("error_message", 2, "string", False)],
            "tensorflow.serving.ModelVersionStatus": [
                ("version", 1, "int64", False), ("state", 2, "int32", False),
                ("status", 3, ".tensorflow.serving.StatusProto", False)],
            "tensorflow.serving.GetModelStatusResponse": [
                ("model_version_status", 1, ".tensorflow.serving.ModelVersionStatus", True)],
        }
        pool = descriptor_pool.DescriptorPool()
        for package in ("google.protobuf", "tensorflow", "tensorflow.serving"):
            file = descriptor_pb2.FileDescriptorProto(name=f"serving_client/{package}.proto", package=package,
                                                      syntax="proto3")
            if package == "tensorflow.serving":
                file.dependency.extend(["serving_client/google.protobuf.proto", "serving_client/tensorflow.proto"])
            made = {}
            for full, fields in layout.items():
                local = full[len(package) + 1:]
                if not full.startswith(package + ".") or local.split(".")[0][0].islower():
                    continue
                outer, _, inner = local.partition(".")
                if outer not in made:
                    made[outer] = file.message_type.add(name=outer)
                message = made[outer].nested_type.add(name=inner) if inner else made[outer]
                if inner and inner.endswith("Entry"):
                    message.options.map_entry = True
                for name, number, kind, repeated in fields:
                    field = message.field.add(name=name, number=number,
                                              label=F.LABEL_REPEATED if repeated else F.LABEL_OPTIONAL)
                    if kind.startswith("."):
                        field.type, field.type_name = F.TYPE_MESSAGE, kind
                    else:
                        field.type = kinds[kind]
            pool.Add(file)
        _MESSAGES = {full.rsplit(".", 1)[-1]: message_factory.GetMessageClass(pool.FindMessageTypeByName(full))
                     for full in layout if not full.endswith("Entry") and not full.endswith(".Dim")}
    return _MESSAGES


_MESSAGES = None


def _floats(tensor) -> tuple[list[int], list[float]]:
    """(shape, values) of a float TensorProto, from its typed field or tensor_content."""
    import struct

    shape = [d.size for d in tensor.tensor_shape.dim]
    if tensor.dtype == _DT_FLOAT:
        content, values, letter = tensor.tensor_content, tensor.float_val, "f"
    elif tensor.dtype == _DT_DOUBLE:
        content, values, letter = tensor.tensor_content, tensor.double_val, "d"
    else:
        raise ClientError(f"the output has TensorFlow dtype {tensor.dtype}; expected float32 (1) or float64 (2)")
    if content:
        values = struct.unpack(f"<{len(content) // struct.calcsize(letter)}{letter}", content)
    return shape, list(values)


class GrpcEmbeddingClient(BaseEmbeddingClient):
    """Embeds images through TF Serving's gRPC PredictionService (port 8500 by default).

    Image bytes go as one string tensor per request, without base64; one channel
    (one HTTP/2 connection) is kept for the client's life. Retries cover UNAVAILABLE
    (server unreachable or restarting), RESOURCE_EXHAUSTED (overloaded) and
    DEADLINE_EXCEEDED (`timeout`), as the REST client retries 503, 429 and 504.

    Args:
        target: HOST:PORT of the gRPC server, e.g. localhost:8500.
        model, version, batch_size, timeout, retries, backoff: as BaseEmbeddingClient.
    """

    def __init__(self, target, model, version=None, batch_size=32, timeout=30.0, retries=3, backoff=0.5,
                 signature="serving_default"):
        super().__init__(model, version, batch_size, timeout, retries, backoff, signature)
        self.target = target
        self._channel = None
        self._calls = {}

    @property
    def status_call(self) -> str:
        return f"GetModelStatus {self.target} (model {self.model})"

    def _call(self, method: str, request):
        """One unary call on the shared channel, with the retries; the response message."""
        os.environ.setdefault("GRPC_VERBOSITY", "ERROR")  # errors reach the user as ClientErrors, not gRPC's log
        try:
            import grpc
        except ImportError:
            raise ClientError("--grpc needs the grpcio and protobuf packages: pip install grpcio protobuf "
                              "(or use --url for REST, standard library only)") from None
        messages = _grpc_messages()
        if self._channel is None:
            self._channel = grpc.insecure_channel(self.target, options=[("grpc.max_receive_message_length", -1)])
        if method not in self._calls:
            service, answer = {"Predict": ("PredictionService", "PredictResponse"),
                               "GetModelStatus": ("ModelService", "GetModelStatusResponse")}[method]
            self._calls[method] = self._channel.unary_unary(
                f"/tensorflow.serving.{service}/{method}", request_serializer=lambda m: m.SerializeToString(),
                response_deserializer=messages[answer].FromString)
        what = f"{method} {self.target} (model {self.model})"
        attempt = 0
        while True:
            try:
                return self._calls[method](request, timeout=self.timeout)
            except grpc.RpcError as e:
                code = e.code().name if e.code() is not None else "UNKNOWN"
                details = e.details() or "no details"
                too_big = code == "RESOURCE_EXHAUSTED" and "larger than max" in details
                if code not in RETRYABLE_CODES or too_big or attempt >= self.retries:
                    raise ClientError(self._message(what, code, details, attempt), status=_GRPC_TO_HTTP.get(code, 500),
                                      code=code) from None
            delay = self.backoff * 2**attempt
            print(f"retrying {what} in {delay:.1f} s ({code})", file=sys.stderr)
            time.sleep(delay)
            attempt += 1

    def _message(self, what, code, details, attempt) -> str:
        if code != "UNAVAILABLE":
            return f"{what}: {code}: {details}"
        hint = ""
        if "Failed parsing HTTP/2" in details:
            # What a REST port (8501), or any HTTP/1 service, answers to gRPC.
            hint = f"; is {self.target} TF Serving's gRPC port (8500 by default; REST is 8501, use --url for it)?"
        return f"{what}: cannot reach the server after {attempt + 1} attempt(s) ({details}){hint}"

    def _predict(self, batch: list[bytes]) -> list[list[float]]:
        messages = _grpc_messages()
        request = messages["PredictRequest"]()
        request.model_spec.name = self.model
        request.model_spec.signature_name = self.signature
        if self.version is not None:
            request.model_spec.version.value = int(self.version)
        tensor = request.inputs["image_bytes"]
        tensor.dtype = _DT_STRING
        tensor.tensor_shape.dim.add(size=len(batch))
        tensor.string_val.extend(batch)
        response = self._call("Predict", request)
        outputs = dict(response.outputs)
        if "embedding" not in outputs and len(outputs) != 1:
            raise ClientError(f"Predict {self.target}: the answer has outputs {sorted(outputs)}; expected \"embedding\"")
        shape, values = _floats(outputs.get("embedding") or next(iter(outputs.values())))
        if len(shape) != 2 or shape[0] != len(batch) or len(values) != shape[0] * shape[1]:
            raise ClientError(f"server returned an output of shape {shape} for {len(batch)} images")
        width = shape[1]
        return [values[i * width : (i + 1) * width] for i in range(len(batch))]

    def status(self) -> dict:
        """GetModelStatus, as TF Serving's REST API writes it (the bulk path reads the version)."""
        request = _grpc_messages()["GetModelStatusRequest"]()
        request.model_spec.name = self.model
        if self.version is not None:
            request.model_spec.version.value = int(self.version)
        response = self._call("GetModelStatus", request)
        return {"model_version_status": [
            {"version": str(v.version), "state": _MODEL_VERSION_STATES.get(v.state, str(v.state)),
             "status": {"error_code": "OK" if v.status.error_code == 0 else v.status.error_code,
                        "error_message": v.status.error_message}}
            for v in response.model_version_status]}

    def close(self) -> None:
        if self._channel is not None:
            self._channel.close()
            self._channel, self._calls = None, {}


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
    records = []
    for number, line in enumerate(data[:end].splitlines(), 1):
        try:
            record = json.loads(line)
            ok = isinstance(record["image"], str) and isinstance(record["embedding"], list)
        except (ValueError, KeyError, TypeError):
            ok = False
        if not ok:
            raise ClientError(f"{path}, line {number}: not an embeddings record ({_snippet(line)}); "
                              "pass another --out, or delete the file to start over")
        records.append(record)
    return records, end


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
