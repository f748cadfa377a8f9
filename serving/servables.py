"""The models a stand-in server serves: versions found under a base path, loaded with
TensorFlow, the newest kept loaded, and what TF Serving's status and metadata calls say
about them. Transport-neutral: the REST server (serving/rest_server.py) answers HTTP
from it. Errors are `RequestError`s carrying TF Serving's HTTP code.
"""

from __future__ import annotations

import os
import re
import sys
import threading

from serving.rest_api import RequestError, TensorInfo

VERSION = re.compile(r"[0-9]{1,18}")  # ASCII digits only: str.isdigit() accepts "١"


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
            if VERSION.fullmatch(d) and os.path.isfile(os.path.join(self.base_path, d, "saved_model.pb"))
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
        if not VERSION.fullmatch(version):
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
