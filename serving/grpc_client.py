"""The embedding client over TF Serving's gRPC API (port 8500): image bytes as a string
tensor, no base64 or JSON, one channel for the whole run. Needs grpcio and protobuf,
not TensorFlow: the few messages it sends are built here with TF Serving's field numbers.
"""

from __future__ import annotations

import os
import sys
import time

from serving.client_base import BaseEmbeddingClient, ClientError

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
