"""The models a stand-in server serves: versions found under a base path, loaded with
TensorFlow, the newest kept loaded, and what TF Serving's status and metadata calls say
about them. Transport-neutral: the REST server (serving/rest_server.py) answers HTTP
from it. Errors are `RequestError`s carrying TF Serving's HTTP code.

Versions follow TF Serving's file-system source and latest policy: every child of the
base path named by an integer is a version (file_system_storage_path_source.cc), only
the newest is loaded, and a failed load leaves the version served before in place
(availability_preserving_policy.cc). The status lists every version the manager has
tracked, newest first, with its state and error (get_model_status_impl.cc,
servable_state_monitor.h).
"""

from __future__ import annotations

import os
import re
import sys
import threading

from serving.rest_api import RequestError, TensorInfo

VERSION = re.compile(r"[0-9]+")  # ASCII digits only: str.isdigit() accepts "١"
INT64_MAX = (1 << 63) - 1

# tensorflow.error.Code names, as TF Serving's status JSON prints them.
ERROR_CODES = ("OK", "CANCELLED", "UNKNOWN", "INVALID_ARGUMENT", "DEADLINE_EXCEEDED", "NOT_FOUND",
               "ALREADY_EXISTS", "PERMISSION_DENIED", "RESOURCE_EXHAUSTED", "FAILED_PRECONDITION", "ABORTED",
               "OUT_OF_RANGE", "UNIMPLEMENTED", "INTERNAL", "UNAVAILABLE", "DATA_LOSS", "UNAUTHENTICATED")


class LoadError(Exception):
    """A version that cannot be loaded; `code` is a tensorflow.error.Code name."""

    def __init__(self, message: str, code: str = "UNKNOWN"):
        super().__init__(message)
        self.code = code


def parse_version(version) -> int | None:
    """A version from a request (str or int; None for the newest) as an int.

    Raises RequestError 400 for anything but ASCII digits within int64, as TF Serving's
    URL pattern and its numeric conversion do (http_rest_api_util.cc).
    """
    if version is None:
        return None
    text = str(version)
    if not VERSION.fullmatch(text):
        raise RequestError(f"Invalid version '{text[:20]}': versions are integers", 400)
    if int(text) > INT64_MAX:
        raise RequestError(f"Failed to convert version: {text[:30]} to numeric; versions fit in int64", 400)
    return int(text)


class ServableVersion:
    """One loaded SavedModel version with its signatures."""

    def __init__(self, version: int, path: str):
        import tensorflow as tf

        self.version = version
        self.path = path
        if not any(os.path.isfile(os.path.join(path, f)) for f in ("saved_model.pb", "saved_model.pbtxt")):
            raise LoadError(f"no SavedModel (saved_model.pb or saved_model.pbtxt) in the version directory {path}",
                            "NOT_FOUND")
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
    """The SignatureDefMap of a SavedModel as TF Serving's metadata JSON writes it.

    Every signature, `__saved_model_init_op` included (get_model_metadata_impl.cc copies
    the whole map), and fields at their default values printed (http_rest_api_util.cc
    prints with always_print_fields_with_no_presence and proto field names).
    """
    from google.protobuf import json_format
    from tensorflow.core.protobuf import saved_model_pb2

    saved = saved_model_pb2.SavedModel()
    with open(os.path.join(path, "saved_model.pb"), "rb") as f:
        saved.ParseFromString(f.read())
    return {
        name: json_format.MessageToDict(sig, preserving_proto_field_name=True, always_print_fields_with_no_presence=True)
        for name, sig in saved.meta_graphs[0].signature_def.items()
    }


def _load_error(e: Exception) -> tuple[str, str]:
    """(tensorflow.error.Code name, one-line message) for an exception raised by a load."""
    if isinstance(e, LoadError):
        return e.code, str(e)
    code = getattr(e, "error_code", None)  # tf.errors.OpError
    if isinstance(code, int) and 0 < code < len(ERROR_CODES):
        name = ERROR_CODES[code]
    elif isinstance(e, FileNotFoundError):
        name = "NOT_FOUND"
    elif isinstance(e, PermissionError):
        name = "PERMISSION_DENIED"
    else:
        name = "UNKNOWN"
    message = " ".join(str(getattr(e, "message", None) or e).split())
    return name, (message or type(e).__name__)[:1000]


class ModelManager:
    """Finds versions under the base path, keeps the newest one loaded, and tracks the
    state of every version it has tried (TF Serving's servable state monitor)."""

    def __init__(self, name: str, base_path: str, poll_seconds: float = 1.0):
        self.name = name
        self.base_path = base_path
        self.poll_seconds = poll_seconds
        self._current: ServableVersion | None = None
        # version -> (state, error code name, error message); states are TF Serving's
        # ModelVersionStatus.State names.
        self._states: dict[int, tuple[str, str, str]] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = None

    def available_versions(self) -> list[int]:
        """Every child of the base path named by an integer, file or directory, with or
        without a SavedModel: TF Serving aspires it and reports a failed load."""
        try:
            entries = os.listdir(self.base_path)
        except OSError:
            return []
        return sorted(int(d) for d in entries if VERSION.fullmatch(d) and int(d) <= INT64_MAX)

    def _set_state(self, version: int, state: str, code: str = "OK", message: str = "") -> None:
        with self._lock:
            self._states[version] = (state, code, message)

    def poll(self) -> None:
        """Load the newest version if it is newer than the served one and not tried yet.

        Only the newest is tried (latest policy, one version). If it fails, it is
        reported as END with its error and the version served before stays (TF Serving
        keeps an available version until an aspired one is ready). A failed version is
        not retried.
        """
        versions = self.available_versions()
        if not versions:
            return
        newest = versions[-1]
        current = self._current
        if (current is not None and current.version >= newest) or newest in self._states:
            return
        self._set_state(newest, "LOADING")
        try:
            loaded = ServableVersion(newest, os.path.join(self.base_path, str(newest)))
        except Exception as e:  # a damaged version must not take the server down
            code, message = _load_error(e)
            self._set_state(newest, "END", code, message)
            print(f"failed to load version {newest}: {message[:300]}", file=sys.stderr, flush=True)
            return
        self._current = loaded  # one reference swap: a request sees the old or the new version
        self._set_state(newest, "AVAILABLE")
        if current is not None:
            self._set_state(current.version, "END")  # unloaded cleanly: END with OK
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

    def get(self, name: str, version: str | int | None) -> ServableVersion:
        """The servable for a request: the newest loaded one, or that exact version.

        Raises RequestError 404 when it is not loaded, 400 for a malformed version.
        """
        wanted = parse_version(version)
        if name != self.name:
            raise RequestError(f"Servable not found for request: Latest({name})", 404)
        current = self._current
        if wanted is None:
            if current is None:
                raise RequestError(f"Servable not found for request: Latest({name})", 404)
            return current
        if current is None or current.version != wanted:
            raise RequestError(f"Servable not found for request: Specific({name}, {wanted})", 404)
        return current

    def status(self, name: str, version: str | int | None) -> dict:
        """TF Serving's GetModelStatusResponse as its REST JSON (get_model_status_impl.cc).

        Without a version: every version tracked, newest first, including failed loads
        (END with their error) and versions unloaded after a newer one (END, OK). With a
        version: that one, whatever its state. 404 when none is known.
        """
        wanted = parse_version(version)
        with self._lock:
            states = dict(self._states) if name == self.name else {}
        if wanted is not None:
            if wanted not in states:
                raise RequestError(f"Could not find version {wanted} of model {name}", 404)
            states = {wanted: states[wanted]}
        elif not states:
            raise RequestError(f"Could not find any versions of model {name}", 404)
        return {
            "model_version_status": [
                {"version": str(v), "state": state, "status": {"error_code": code, "error_message": message}}
                for v, (state, code, message) in sorted(states.items(), reverse=True)
            ]
        }


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
    if not any(VERSION.fullmatch(d) and os.path.isdir(os.path.join(path, d)) for d in os.listdir(path)):
        return (f"--model_base_path {path!r} holds no version directories (1/, 2/, ..., each with saved_model.pb); "
                "pass the --export-dir export.py wrote to, e.g. --model_base_path exports/simsiam")
    return None
