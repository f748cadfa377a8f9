"""TF Serving's gRPC API, answering from the same `servables.ModelManager` as the REST server.

Services and methods (protos and stubs from the `tensorflow-serving-api` package):
- tensorflow.serving.PredictionService/Predict and /GetModelMetadata;
- tensorflow.serving.ModelService/GetModelStatus.
The other methods (Classify, Regress, MultiInference, HandleReloadConfigRequest) answer
UNIMPLEMENTED.

Status codes follow TF Serving (tensorflow_serving/model_servers/grpc_status_util.cc
passes TensorFlow's status code through unchanged):
- no model_spec, a bad input, a bad metadata_field, a version_label: INVALID_ARGUMENT;
- unknown model or version: NOT_FOUND;
- unknown signature: FAILED_PRECONDITION ('Serving signature key "x" not found.',
  predict_util.cc), which TF Serving's REST API turns into HTTP 400;
- a message over --max_request_bytes: RESOURCE_EXHAUSTED (gRPC's own check);
- more than `threads + queue` calls at once: RESOURCE_EXHAUSTED.
Outputs are written as TF Serving writes them by default: typed fields (float_val, ...),
not tensor_content.
"""

from __future__ import annotations

import threading
import functools
import os
from concurrent import futures

import grpc
import numpy as np
from google.protobuf import json_format
from tensorflow_serving.apis import (
    get_model_metadata_pb2,
    get_model_status_pb2,
    model_service_pb2_grpc,
    predict_pb2,
    prediction_service_pb2_grpc,
)

from serving.rest_api import RequestError
from serving.servables import ModelManager

# TF Serving's HTTP mapping of TensorFlow codes (model_servers/http_server.cc), read backwards:
# the manager speaks HTTP statuses, gRPC wants the code they came from.
_CODES = {
    400: grpc.StatusCode.INVALID_ARGUMENT,
    404: grpc.StatusCode.NOT_FOUND,
    409: grpc.StatusCode.ABORTED,
    413: grpc.StatusCode.RESOURCE_EXHAUSTED,
    429: grpc.StatusCode.RESOURCE_EXHAUSTED,
    501: grpc.StatusCode.UNIMPLEMENTED,
    503: grpc.StatusCode.UNAVAILABLE,
    504: grpc.StatusCode.DEADLINE_EXCEEDED,
}
MESSAGE_LIMIT = 1024  # TF Serving truncates error messages there, adding "...TRUNCATED"


def grpc_code(http_status: int) -> grpc.StatusCode:
    """The gRPC code TF Serving gives for an error its REST API answers with `http_status`."""
    return _CODES.get(http_status, grpc.StatusCode.INTERNAL if http_status >= 500 else grpc.StatusCode.INVALID_ARGUMENT)


class _Refused(Exception):
    """An error with a gRPC code that no HTTP status stands for (FAILED_PRECONDITION)."""

    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code = code


def _answers(method):
    """Run a servicer method; its errors become the gRPC status TF Serving would send."""

    @functools.wraps(method)
    def wrapper(self, request, context):
        try:
            if not request.HasField("model_spec"):
                raise RequestError("Missing ModelSpec", 400)
            return method(self, request, context)
        except RequestError as e:
            code, message = grpc_code(e.status), str(e)
        except _Refused as e:
            code, message = e.code, str(e)
        except Exception as e:  # never let a call end without a status a client can read
            code, message = grpc.StatusCode.INTERNAL, f"internal error: {type(e).__name__}: {str(e)[:200]}"
        if len(message) > MESSAGE_LIMIT:
            message = message[:MESSAGE_LIMIT] + "...TRUNCATED"
        context.abort(code, message)

    return wrapper


def _version(model_spec) -> str | None:
    """The requested version as the manager takes it (a decimal string), or None for the newest."""
    choice = model_spec.WhichOneof("version_choice")
    if choice == "version":
        if model_spec.version.value < 0:  # no such version can exist: TF Serving's NOT_FOUND
            raise RequestError(f"Servable not found for request: Specific({model_spec.name}, "
                               f"{model_spec.version.value})", 404)
        return str(model_spec.version.value)
    if choice == "version_label":
        # TF Serving answers this when the label is not in its model config; the stand-in has no labels.
        raise RequestError(f"Unrecognized servable version label: {model_spec.version_label}", 400)
    return None


_DTYPE_FIELDS = {  # NumPy dtype -> (TF DataType name, TensorProto field) as Tensor::AsProtoField writes them
    "float32": ("DT_FLOAT", "float_val"),
    "float64": ("DT_DOUBLE", "double_val"),
    "int32": ("DT_INT32", "int_val"),
    "int16": ("DT_INT16", "int_val"),
    "int8": ("DT_INT8", "int_val"),
    "uint8": ("DT_UINT8", "int_val"),
    "uint16": ("DT_UINT16", "int_val"),
    "int64": ("DT_INT64", "int64_val"),
    "uint32": ("DT_UINT32", "uint32_val"),
    "uint64": ("DT_UINT64", "uint64_val"),
    "bool": ("DT_BOOL", "bool_val"),
    "object": ("DT_STRING", "string_val"),
}


def tensor_proto(array: np.ndarray):
    """A TensorProto of `array` with typed fields, as TF Serving's Predict writes outputs."""
    import tensorflow as tf
    from tensorflow.core.framework import tensor_pb2, types_pb2

    array = np.asarray(array)
    if array.dtype.name not in _DTYPE_FIELDS:
        return tf.make_tensor_proto(array)
    dtype, field = _DTYPE_FIELDS[array.dtype.name]
    proto = tensor_pb2.TensorProto(dtype=types_pb2.DataType.Value(dtype))
    for size in array.shape:
        proto.tensor_shape.dim.add(size=size)
    getattr(proto, field).extend(array.ravel().tolist())
    return proto


def _type_name(dtype) -> str:
    """TensorFlow's DataTypeString: DT_FLOAT -> "float", DT_STRING -> "string"."""
    from tensorflow.core.framework import types_pb2

    return types_pb2.DataType.Name(dtype.as_datatype_enum)[3:].lower()


def _inputs(request, expected: dict) -> dict:
    """The request's input tensors as NumPy arrays, checked against the signature's inputs
    (name -> rest_api.TensorInfo) the way TF Serving checks them."""
    import tensorflow as tf

    sent, wanted = set(request.inputs), set(expected)
    if sent != wanted:
        raise RequestError(
            f"input size does not match signature: {len(sent)}!={len(wanted)} len({{{','.join(sorted(sent))}}}) != "
            f"len({{{','.join(sorted(wanted))}}}). Sent extra: {{{','.join(sorted(sent - wanted))}}}. "
            f"Missing but required: {{{','.join(sorted(wanted - sent))}}}.", 400)
    arrays = {}
    for name, proto in request.inputs.items():
        info = expected[name]
        try:
            got = tf.dtypes.as_dtype(proto.dtype)
            array = tf.make_ndarray(proto)
        except Exception:  # an unknown dtype, or values that do not fill the shape
            raise RequestError(f"tensor parsing error: {name}", 400) from None
        want = tf.string if info.dtype == "string" else tf.dtypes.as_dtype(info.dtype)
        if got != want:
            raise RequestError(f"Expected input {name} to be {_type_name(want)} but get {_type_name(got)}.", 400)
        shape = tuple(array.shape)
        if len(shape) != len(info.shape) or any(w is not None and w != h for w, h in zip(info.shape, shape)):
            dims = ", ".join("-1" if d is None else str(d) for d in info.shape)
            raise RequestError(f"input {name} must have shape [{dims}], got {list(shape)}", 400)
        arrays[name] = array
    return arrays


class PredictionService(prediction_service_pb2_grpc.PredictionServiceServicer):
    def __init__(self, models: ModelManager):
        self.models = models
        self._metadata = {}  # (version, path) -> SignatureDefMap, read once per loaded version
        self._lock = threading.Lock()

    @_answers
    def Predict(self, request, context):
        spec = request.model_spec
        servable = self.models.get(spec.name, _version(spec))
        signature = spec.signature_name or "serving_default"
        if signature not in servable.inputs:
            raise _Refused(grpc.StatusCode.FAILED_PRECONDITION, f'Serving signature key "{signature}" not found.')
        outputs = servable.predict(signature, _inputs(request, servable.inputs[signature]))
        for name in request.output_filter:
            if name not in outputs:
                raise RequestError(f"output tensor alias not found in signature: {name} Outputs expected to be "
                                   f"in the set {{{','.join(sorted(outputs))}}}.", 400)
        response = predict_pb2.PredictResponse()
        response.model_spec.name = spec.name
        response.model_spec.version.value = servable.version
        response.model_spec.signature_name = signature
        for name, array in outputs.items():
            if not request.output_filter or name in request.output_filter:
                response.outputs[name].CopyFrom(tensor_proto(array))
        return response

    @_answers
    def GetModelMetadata(self, request, context):
        if not request.metadata_field:
            raise RequestError("GetModelMetadataRequest must specify at least one metadata_field", 400)
        for field in request.metadata_field:
            if field != "signature_def":
                raise RequestError(f"Metadata field {field} is not supported", 400)
        spec = request.model_spec
        servable = self.models.get(spec.name, _version(spec))
        response = get_model_metadata_pb2.GetModelMetadataResponse()
        response.model_spec.name = spec.name
        response.model_spec.version.value = servable.version
        response.metadata["signature_def"].Pack(self._signature_def_map(servable))
        return response

    def _signature_def_map(self, servable):
        """Every SignatureDef of the version's MetaGraphDef, as TF Serving packs them."""
        key = (servable.version, servable.path)
        with self._lock:
            if key not in self._metadata:
                from tensorflow.core.protobuf import saved_model_pb2

                saved = saved_model_pb2.SavedModel()
                with open(os.path.join(servable.path, "saved_model.pb"), "rb") as f:
                    saved.ParseFromString(f.read())
                defs = get_model_metadata_pb2.SignatureDefMap()
                for name, sig in saved.meta_graphs[0].signature_def.items():
                    defs.signature_def[name].CopyFrom(sig)
                self._metadata = {key: defs}  # only the served version is kept
            return self._metadata[key]


class ModelService(model_service_pb2_grpc.ModelServiceServicer):
    def __init__(self, models: ModelManager):
        self.models = models

    @_answers
    def GetModelStatus(self, request, context):
        spec = request.model_spec
        status = self.models.status(spec.name, _version(spec))
        return json_format.ParseDict(status, get_model_status_pb2.GetModelStatusResponse())


def target(host: str, port: int) -> str:
    """host:port as gRPC writes an address ([::1]:8500 for IPv6)."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class BindError(OSError):
    """The gRPC address cannot be bound (errno and strerror say why when known)."""


def _check_free(host: str, port: int) -> None:
    """Raise BindError when host:port cannot be bound. gRPC would only log its reason on
    stderr and fail without one; a plain socket says it (Address already in use)."""
    import socket

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        try:
            probe.bind((host, port))
        except OSError as e:
            raise BindError(e.errno, e.strerror) from None


def serve_grpc(models: ModelManager, host="127.0.0.1", port=8500, threads=4, queue=64, max_request_bytes=64 << 20):
    """Start TF Serving's gRPC services on host:port (0 picks a free port); returns (server, port).

    At most `threads` calls run at once and `queue` more wait; beyond that calls get
    RESOURCE_EXHAUSTED. Raises BindError (an OSError) when the address cannot be bound.
    """
    if port:
        _check_free(host, port)
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=threads, thread_name_prefix="grpc"),
        maximum_concurrent_rpcs=threads + queue,
        options=[
            ("grpc.max_receive_message_length", max_request_bytes),
            ("grpc.max_send_message_length", -1),
            ("grpc.so_reuseport", 0),  # a port in use is an error, not a second silent listener
        ],
    )
    prediction_service_pb2_grpc.add_PredictionServiceServicer_to_server(PredictionService(models), server)
    model_service_pb2_grpc.add_ModelServiceServicer_to_server(ModelService(models), server)
    try:
        bound = server.add_insecure_port(target(host, port))
    except RuntimeError:  # grpcio >= 1.52 raises instead of returning 0; the reason went to its log
        bound = 0
    if bound == 0:
        server.stop(None)
        raise BindError(f"cannot bind {target(host, port)}")
    server.start()
    return server, bound
