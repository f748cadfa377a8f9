"""TF Serving's REST predict format: parsing requests and shaping responses.

Pure Python and NumPy, no TensorFlow, so it can be tested and fuzzed on its own.
Follows tensorflow/serving `g3doc/api_rest.md`:

- a request has an optional `signature_name` and exactly one of `instances` (row
  format: a list with one entry per example) or `inputs` (columnar format: the batch of
  each input);
- with a single input, an instance (or `inputs`) may be the bare value instead of a
  `{name: value}` object;
- binary values are written `{"b64": "<standard base64>"}`;
- the response is `{"predictions": [...]}` for rows, `{"outputs": ...}` for columns,
  and the output name is dropped when the signature has a single output.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import json
import math

import numpy as np

MAX_DEPTH = 8  # [batch, H, W, C] plus object wrappers; deeper is rejected before NumPy sees it


class RequestError(Exception):
    """A request the server rejects; `status` is the HTTP code (TF Serving's codes)."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    """One input of a signature: NumPy dtype name ("uint8", "float32", "string") and shape.

    `shape` uses None for unknown dimensions and includes the batch dimension.
    """

    dtype: str
    shape: tuple


def parse_json(body: bytes) -> dict:
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as e:
        raise RequestError(f"JSON Parse error: the body is not UTF-8 ({e.reason} at byte {e.start})")
    try:
        request = json.loads(text, parse_constant=_reject_constant)
    except RecursionError:
        raise RequestError("JSON Parse error: nesting too deep")
    except ValueError as e:
        raise RequestError(f"JSON Parse error: {e}")
    if not isinstance(request, dict):
        raise RequestError(f"JSON Value: the request must be an object, got {type(request).__name__}")
    return request


def _reject_constant(name):
    raise ValueError(f"{name} is not a number JSON allows")


def parse_predict(request: dict, signatures: dict[str, dict[str, TensorInfo]]) -> tuple[str, dict, bool]:
    """Validate a predict request against the model's signatures.

    Args:
        request: the parsed JSON body.
        signatures: signature name -> {input name -> TensorInfo}.
    Returns:
        (signature name, {input name: NumPy array (object array of bytes for strings)},
        row format?).
    Raises:
        RequestError: with the message a client needs to fix the request.
    """
    unknown = sorted(set(request) - {"signature_name", "instances", "inputs"})
    if unknown:
        raise RequestError(f"Unexpected key(s) {unknown} in the request; expected signature_name and instances or inputs")
    name = request.get("signature_name", "serving_default")
    if not isinstance(name, str):
        raise RequestError("signature_name must be a string")
    if name not in signatures:
        raise RequestError(
            f'Serving signature name: "{name}" not found in signature def; '
            f"available: {', '.join(sorted(signatures))}"
        )
    inputs = signatures[name]
    has_rows, has_cols = "instances" in request, "inputs" in request
    if has_rows and has_cols:
        raise RequestError("Request contains both 'instances' and 'inputs'; use exactly one of them")
    if not has_rows and not has_cols:
        raise RequestError("Missing 'instances' or 'inputs' key in the request")
    if has_rows:
        return name, _parse_rows(request["instances"], inputs), True
    return name, _parse_columns(request["inputs"], inputs), False


def _parse_rows(instances, inputs: dict[str, TensorInfo]) -> dict:
    if not isinstance(instances, list):
        raise RequestError("'instances' must be a list with one entry per example")
    if not instances:
        raise RequestError("'instances' is empty; send at least one example")
    names = sorted(inputs)
    columns = {n: [] for n in names}
    for i, instance in enumerate(instances):
        named = isinstance(instance, dict) and set(instance) == set(names) and not _is_b64(instance)
        if named:
            for n in names:
                columns[n].append(instance[n])
        elif len(names) == 1:
            columns[names[0]].append(instance)
        else:
            raise RequestError(f"instances[{i}] must be an object with the inputs {names}")
    return {n: _to_array(columns[n], inputs[n], n) for n in names}


def _parse_columns(value, inputs: dict[str, TensorInfo]) -> dict:
    names = sorted(inputs)
    if isinstance(value, dict) and not _is_b64(value):
        missing, extra = sorted(set(names) - set(value)), sorted(set(value) - set(names))
        if missing or extra:
            raise RequestError(f"'inputs' must name exactly the inputs {names} (missing {missing}, unexpected {extra})")
        return {n: _to_array(value[n], inputs[n], n) for n in names}
    if len(names) != 1:
        raise RequestError(f"'inputs' must be an object with the inputs {names}")
    return {names[0]: _to_array(value, inputs[names[0]], names[0])}


def _is_b64(value) -> bool:
    return isinstance(value, dict) and set(value) == {"b64"}


def _depth(value, limit: int) -> int:
    depth = 0
    while isinstance(value, list):
        depth += 1
        if depth > limit:
            raise RequestError(f"input nests deeper than {limit} levels")
        if not value:
            break
        value = value[0]
    return depth


def _to_array(value, info: TensorInfo, name: str) -> np.ndarray:
    if info.dtype == "string":
        return _string_array(value, info, name)
    rank = len(info.shape)
    if _depth(value, MAX_DEPTH) != rank:
        raise RequestError(f"input '{name}' must have rank {rank} (shape {_shape_text(info.shape)}), got rank {_depth(value, MAX_DEPTH)}")
    if info.dtype.startswith(("uint", "int")):
        checked = _check_numbers(value, integer=True, dtype=info.dtype, name=name)
    else:
        checked = _check_numbers(value, integer=False, dtype=info.dtype, name=name)
    try:
        array = np.array(checked, dtype=info.dtype)
    except ValueError as e:
        raise RequestError(f"input '{name}' is ragged or malformed: {e}")
    if array.ndim != rank:
        raise RequestError(f"input '{name}' is ragged: all examples must have the same shape")
    _check_shape(array.shape, info, name)
    if array.shape[0] == 0:
        raise RequestError(f"input '{name}' has an empty batch")
    return array


def _check_numbers(value, integer: bool, dtype: str, name: str):
    """Walk nested lists, rejecting non-numbers, bools, NaN/inf and out-of-range values."""
    lo, hi = (np.iinfo(dtype).min, np.iinfo(dtype).max) if integer else (-math.inf, math.inf)
    stack = [value]
    count = 0
    while stack:
        v = stack.pop()
        if isinstance(v, list):
            stack.extend(v)
            continue
        count += 1
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise RequestError(f"input '{name}' must hold {dtype} numbers, got {type(v).__name__} {str(v)[:40]!r}")
        if integer and isinstance(v, float) and not v.is_integer():
            raise RequestError(f"input '{name}' is {dtype}, got the non-integer {v!r}")
        if isinstance(v, float) and not math.isfinite(v):
            raise RequestError(f"input '{name}' holds {v!r}")
        if not lo <= v <= hi:
            raise RequestError(f"input '{name}' is {dtype}: {v!r} is outside [{lo}, {hi}]")
    return value


def _check_shape(shape, info: TensorInfo, name: str):
    for got, want in zip(shape[1:], info.shape[1:]):
        if want is not None and got != want:
            raise RequestError(
                f"input '{name}' must have shape {_shape_text(info.shape)}, got {list(shape)}"
            )


def _shape_text(shape) -> str:
    return "[" + ", ".join("-1" if d is None else str(d) for d in shape) + "]"


def _string_array(value, info: TensorInfo, name: str) -> np.ndarray:
    if len(info.shape) != 1:
        raise RequestError(f"string input '{name}' of rank {len(info.shape)} is not supported")
    if not isinstance(value, list):
        raise RequestError(f"input '{name}' must be a list of strings or {{\"b64\": ...}} objects")
    if not value:
        raise RequestError(f"input '{name}' has an empty batch")
    out = np.empty(len(value), dtype=object)
    for i, v in enumerate(value):
        if _is_b64(v):
            if not isinstance(v["b64"], str):
                raise RequestError(f"input '{name}'[{i}]: b64 must be a string")
            try:
                out[i] = base64.b64decode(v["b64"], validate=True)
            except (binascii.Error, ValueError) as e:
                raise RequestError(f"input '{name}'[{i}] is not valid base64 ({e})")
        elif isinstance(v, str):
            out[i] = v.encode("utf-8")
        else:
            raise RequestError(f"input '{name}'[{i}] must be a string or {{\"b64\": ...}}, got {type(v).__name__}")
    return out


def format_predict(outputs: dict[str, np.ndarray], row_format: bool) -> dict:
    """TF Serving's response body for `outputs` (name -> array with a batch dimension)."""
    if row_format:
        if len(outputs) == 1:
            (array,) = outputs.values()
            return {"predictions": _jsonable(array)}
        names = sorted(outputs)
        batch = len(next(iter(outputs.values())))
        return {"predictions": [{n: _jsonable(outputs[n][i]) for n in names} for i in range(batch)]}
    if len(outputs) == 1:
        (array,) = outputs.values()
        return {"outputs": _jsonable(array)}
    return {"outputs": {n: _jsonable(a) for n, a in outputs.items()}}


def _jsonable(array: np.ndarray):
    array = np.asarray(array)
    if array.dtype == object:
        return [{"b64": base64.b64encode(x).decode("ascii")} for x in array.ravel()]
    return array.tolist()
