"""Fuzzing the REST request parsing: every malformed request is a 4xx with a message.

Two layers: `serving.rest_api` directly (thousands of cases, fast), and the live local
server over HTTP (fewer cases; checks status codes, that nothing returns 500, and that
the server keeps answering).
"""

import base64
import json
import string
import urllib.error
import urllib.request

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from serving import rest_api
from serving.rest_api import RequestError, TensorInfo

SIGNATURES = {
    "serving_default": {"image_bytes": TensorInfo("string", (None,))},
    "serving_pixels": {"images": TensorInfo("uint8", (None, None, None, 3))},
}

json_leaf = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-(10**30), max_value=10**30),
    st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=20),
)
json_value = st.recursive(
    json_leaf,
    lambda children: st.one_of(
        st.lists(children, max_size=5),
        st.dictionaries(st.sampled_from(["b64", "instances", "inputs", "signature_name", "images", "image_bytes", "x"]), children, max_size=4),
    ),
    max_leaves=40,
)
requests = st.one_of(
    json_value,
    st.fixed_dictionaries(
        {},
        optional={
            "signature_name": st.one_of(st.sampled_from(["serving_default", "serving_pixels", "nope"]), json_leaf),
            "instances": json_value,
            "inputs": json_value,
        },
    ),
)


def _check(body: bytes):
    """parse_json + parse_predict either succeed with arrays the model can take, or raise a 4xx."""
    try:
        request = rest_api.parse_json(body)
        name, inputs, _ = rest_api.parse_predict(request, SIGNATURES)
    except RequestError as e:
        assert 400 <= e.status < 500 and str(e)
        return
    for key, array in inputs.items():
        info = SIGNATURES[name][key]
        assert array.shape[0] >= 1
        if info.dtype == "string":
            assert array.dtype == object and all(isinstance(v, bytes) for v in array)
        else:
            assert array.dtype == np.uint8 and array.ndim == 4 and array.shape[-1] == 3


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(requests)
def test_random_json_requests(request):
    _check(json.dumps(request).encode())


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=300))
def test_random_bytes(body):
    _check(body)


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=string.printable + "éü\u2028", max_size=60))
def test_random_base64_strings(text):
    _check(json.dumps({"instances": [{"b64": text}]}).encode())


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(json_value)
def test_the_lenient_json_scanner_reads_json_as_the_fast_one_does(value):
    # parse_json falls back to a pure-Python scanner for TF Serving's Inf, -Inf and
    # -NaN spellings; on JSON both read, it must agree with Python's own scanner.
    text = json.dumps({"v": value})
    # repr, not ==: 1 == 1.0, but an int read as a float would change the dtype check.
    assert repr(rest_api._LENIENT.raw_decode(text, 0)) == repr(rest_api._DECODER.raw_decode(text, 0))


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from(["Inf", "-Inf", "NaN", "-NaN", "Infinity", "1", "-", "[", "]", "{", "}", ",", ":",
                                 '"v"', " ", "e5", ".5", "In", "N"]), max_size=30))
def test_random_text_with_nan_and_inf_tokens(tokens):
    _check(("{\"v\": " + "".join(tokens)).encode())


def test_deep_nesting_huge_numbers_and_wrong_types():
    cases = [
        b"[" * 100_000 + b"]" * 100_000,
        b'{"v": ' + b"[" * 100_000 + b"Inf" + b"]" * 100_000 + b"}",  # deep, through the pure-Python fallback
        json.dumps({"instances": [[[[[[[[[[[1]]]]]]]]]]], "signature_name": "serving_pixels"}).encode(),
        json.dumps({"signature_name": "serving_pixels", "instances": [[[[10**400 // 10**380, 0, 0]]]]}).encode(),
        b'{"signature_name": "serving_pixels", "instances": [[[[1e999, 0, 0]]]]}',
        b'{"signature_name": "serving_pixels", "instances": [[[[NaN, 0, 0]]]]}',
        json.dumps({"signature_name": "serving_pixels", "instances": [[[[True, 0, 0]]]]}).encode(),
        json.dumps({"signature_name": "serving_pixels", "instances": [[[[-1, 0, 0]]]]}).encode(),
        json.dumps({"signature_name": "serving_pixels", "instances": [[[[0.5, 0, 0]]]]}).encode(),
        json.dumps({"signature_name": ["serving_pixels"], "instances": [1]}).encode(),
        json.dumps({"instances": {"b64": "AAAA"}}).encode(),
        json.dumps({"instances": [{"b64": 12}]}).encode(),
        json.dumps({"inputs": {"wrong_name": [{"b64": "AAAA"}]}}).encode(),
        json.dumps({"inputs": []}).encode(),
        "\ud800".encode("utf-8", "surrogatepass"),
        b"\xff\xfe{}",
        b"",
    ]
    for body in cases:
        with pytest.raises(RequestError) as info:
            request = rest_api.parse_json(body)
            rest_api.parse_predict(request, SIGNATURES)
        assert info.value.status == 400, body[:80]


def test_valid_requests_still_parse():
    png = base64.b64encode(b"\x89PNG...").decode()
    name, inputs, rows = rest_api.parse_predict({"instances": [{"b64": png}, "plain"]}, SIGNATURES)
    assert name == "serving_default" and rows and list(inputs["image_bytes"]) == [b"\x89PNG...", b"plain"]
    name, inputs, rows = rest_api.parse_predict(
        {"signature_name": "serving_pixels", "inputs": {"images": [[[[1, 2, 3]]]]}}, SIGNATURES
    )
    assert not rows and inputs["images"].dtype == np.uint8 and inputs["images"].shape == (1, 1, 1, 3)


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    """The real server on a tiny untrained export (weights do not matter for parsing)."""
    from serving import local_server
    from simsiam_tf import export
    from simsiam_tf.config import make_config
    from simsiam_tf.model import build_simsiam

    config = make_config("digits", width=8, proj_dim=64, pred_dim=16)
    base = str(tmp_path_factory.mktemp("fuzz") / "m")
    export.export_saved_model(build_simsiam(config), config, base)
    with local_server.running("m", base, port=0, max_request_bytes=100_000) as (url, _):
        yield f"{url}/v1/models/m:predict"


def _post(url, body: bytes):
    req = urllib.request.Request(url, data=body, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(requests)
def test_live_server_never_500(live, request):
    status, out = _post(live, json.dumps(request).encode())
    assert status == 200 or (400 <= status < 500 and out["error"]), (status, out)


def test_live_server_oversized_and_binary_bodies(live):
    assert _post(live, b"x" * 200_000)[0] == 413
    status, out = _post(live, bytes(range(256)) * 10)
    assert status == 400 and "JSON Parse error" in out["error"]
    good = json.dumps({"signature_name": "serving_pixels", "instances": [[[[1, 2, 3]]]]}).encode()
    assert _post(live, good)[0] == 200
