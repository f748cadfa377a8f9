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

Where `api_rest.md` is silent, the rules follow TF Serving's parser
(`tensorflow_serving/util/json_tensor.cc`) and its base64 decoder (Abseil's
`Base64Unescape`); each function names the rule it follows.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import json
import math
import re

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
    """The request object, parsed as TF Serving's parser does (json_tensor.cc, ParseJson).

    As there: an empty body is an error; NaN, Inf, Infinity and their negatives are
    numbers; parsing stops after the first complete value (trailing bytes are
    ignored); a number too big for a double is an error. Unlike there, the body must
    be UTF-8 (TF Serving passes invalid bytes through to strings).
    """
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as e:
        raise RequestError(f"JSON Parse error: the body is not UTF-8 ({e.reason} at byte {e.start})")
    start = len(text) - len(text.lstrip(" \t\n\r"))
    if start == len(text):
        raise RequestError("JSON Parse error: The document is empty")
    try:
        try:
            request, _ = _DECODER.raw_decode(text, start)
        except json.JSONDecodeError:
            # Python's fast scanner knows NaN, Infinity and -Infinity only; TF Serving's
            # parser also takes Inf, -Inf and -NaN. Retry with a scanner that does.
            request, _ = _LENIENT.raw_decode(text, start)
    except RecursionError:
        raise RequestError("JSON Parse error: nesting too deep")
    except ValueError as e:
        raise RequestError(f"JSON Parse error: {e}")
    if not isinstance(request, dict):
        raise RequestError(f"JSON Value: the request must be an object, got {type(request).__name__}")
    return request


def _finite_float(text: str) -> float:
    value = float(text)
    if math.isinf(value):  # 1e999: Python reads it as inf, TF Serving's parser refuses it
        raise ValueError(f"Number too big to be stored in double: {text[:40]}")
    return value


_DECODER = json.JSONDecoder(parse_float=_finite_float)
_NUMBER = re.compile(r"(-?(?:0|[1-9][0-9]*))(\.[0-9]+)?([eE][-+]?[0-9]+)?")
_CONSTANTS = (("-Infinity", -math.inf), ("Infinity", math.inf), ("-Inf", -math.inf), ("Inf", math.inf),
              ("-NaN", math.nan), ("NaN", math.nan))


def _lenient_decoder() -> json.JSONDecoder:
    """A pure-Python JSON decoder that also reads Inf, -Inf and -NaN (slow; a fallback)."""
    decoder = json.JSONDecoder(parse_float=_finite_float)

    def scan(string, idx):
        try:
            char = string[idx]
        except IndexError:
            raise StopIteration(idx) from None
        if char == '"':
            return json.decoder.scanstring(string, idx + 1, decoder.strict)
        if char == "{":
            return json.decoder.JSONObject((string, idx + 1), decoder.strict, scan, None, None, {})
        if char == "[":
            return json.decoder.JSONArray((string, idx + 1), scan)
        for word, value in (("null", None), ("true", True), ("false", False)):
            if string.startswith(word, idx):
                return value, idx + len(word)
        m = _NUMBER.match(string, idx)
        if m is not None:
            integer, frac, exp = m.groups()
            if frac or exp:
                return _finite_float(integer + (frac or "") + (exp or "")), m.end()
            return int(integer), m.end()
        for word, value in _CONSTANTS:
            if string.startswith(word, idx):
                return value, idx + len(word)
        raise StopIteration(idx)

    decoder.scan_once = scan
    return decoder


_LENIENT = _lenient_decoder()


def signature_name(request: dict) -> str:
    """The signature a request names; an empty or missing name means serving_default
    (json_tensor.cc FillSignature, then http_rest_api_handler.cc GetInfoMap)."""
    name = request.get("signature_name", "")
    if not isinstance(name, str):
        raise RequestError("JSON Value: 'signature_name' must be a string; omit it for serving_default")
    return name or "serving_default"


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

    As TF Serving (json_tensor.cc FillPredictRequestFromJson): keys other than
    signature_name, instances and inputs are ignored.
    """
    name = signature_name(request)
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
        # json_tensor.cc FillTensorMapFromInputsMap: each input is looked up by name,
        # so other keys in the object are ignored.
        missing = sorted(set(names) - set(value))
        if missing:
            raise RequestError(f"'inputs' lacks the named input(s) {missing}; the signature takes {names}")
        return {n: _to_array(value[n], inputs[n], n) for n in names}
    if len(names) != 1:
        raise RequestError(f"'inputs' must be an object with the inputs {names}")
    return {names[0]: _to_array(value, inputs[names[0]], names[0])}


def _is_b64(value) -> bool:
    """A `{"b64": "<string>"}` object: one key, a string value (json_tensor.cc IsValBase64Object)."""
    return isinstance(value, dict) and len(value) == 1 and isinstance(value.get("b64"), str)


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
    checked = _check_numbers(value, integer=info.dtype.startswith(("uint", "int")), dtype=info.dtype, name=name)
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
    """Walk nested lists, rejecting non-numbers, bools and out-of-range values.

    As json_tensor.cc AddValueToTensor: an integer input takes JSON integers only (1.0
    is refused), a float input any number, NaN and infinities included. Unlike there,
    an integer outside the dtype's range is refused (TF Serving wraps it around).
    """
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
        if integer and isinstance(v, float):
            raise RequestError(f"input '{name}' is {dtype} and takes JSON integers, got {v!r}; write it without a decimal point")
        if integer and not lo <= v <= hi:
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
            out[i] = b64decode(v["b64"], f"input '{name}'[{i}]")
        elif isinstance(v, str):
            out[i] = v.encode("utf-8")
        elif isinstance(v, dict) and "b64" in v:
            raise RequestError(f"input '{name}'[{i}] must be {{\"b64\": \"<base64 string>\"}} with no other key")
        else:
            raise RequestError(f"input '{name}'[{i}] must be a string or {{\"b64\": ...}}, got {type(v).__name__}")
    return out


_B64_SPACE = re.compile(r"[ \t\n\v\f\r]")
_B64_DATA = re.compile(r"[A-Za-z0-9+/]*")


def b64decode(text: str, what: str) -> bytes:
    """Standard base64 as TF Serving decodes it (Abseil's Base64Unescape).

    ASCII whitespace anywhere is skipped; the padding ('=' or '.') may be left out,
    but when present its count must be right; URL-safe '-' and '_' are refused.
    """
    text = _B64_SPACE.sub("", text)
    data = _B64_DATA.match(text).group()
    pad = text[len(data):]
    if pad.strip("=."):
        bad = pad.strip("=.")[0]
        raise RequestError(f"{what} is not valid base64: {bad!r} is not a base64 character; send standard base64 (A-Z a-z 0-9 + /)")
    leftover = len(data) % 4
    if leftover == 1 or (pad and len(pad) != (4 - leftover) % 4):
        raise RequestError(f"{what} is not valid base64: {len(data)} data characters with {len(pad)} padding "
                           "characters is a wrong length; send the whole base64 text")
    try:
        return base64.b64decode(data + "=" * ((4 - leftover) % 4), validate=True)
    except (binascii.Error, ValueError) as e:  # not reached for data that passed the checks above
        raise RequestError(f"{what} is not valid base64 ({e})")


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
