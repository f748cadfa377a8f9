"""The stand-in server answers as TF Serving does, point by point (issue 28).

Each test names the TF Serving source file whose behaviour it checks. Parsing rules are
tested on serving.rest_api directly (fast); routes, status and metadata against one
tiny untrained export served by the real stand-in.
"""

import base64
import io
import json
import math
import os
import shutil
import urllib.error
import urllib.request

import numpy as np
import pytest
from PIL import Image

from serving import rest_api, servables
from serving.rest_api import RequestError, TensorInfo

SIGNATURES = {
    "serving_default": {"image_bytes": TensorInfo("string", (None,))},
    "serving_pixels": {"images": TensorInfo("uint8", (None, None, None, 3))},
    "floats": {"x": TensorInfo("float32", (None, 2))},
}


def _parse(body):
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    return rest_api.parse_predict(rest_api.parse_json(raw), SIGNATURES)


def _refused(body) -> str:
    with pytest.raises(RequestError) as info:
        _parse(body)
    assert info.value.status == 400
    return str(info.value)


def _png(seed: int) -> bytes:
    image = np.random.default_rng(seed).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory):
    """A tiny untrained export (the weights do not matter here): base/1."""
    from simsiam_tf import export
    from simsiam_tf.config import make_config
    from simsiam_tf.model import build_simsiam

    config = make_config("digits", width=8, proj_dim=64, pred_dim=16)
    base = str(tmp_path_factory.mktemp("fidelity") / "m")
    export.export_saved_model(build_simsiam(config), config, base)
    return base


@pytest.fixture(scope="module")
def url(export_dir):
    from serving import local_server

    with local_server.running("m", export_dir, port=0, max_request_bytes=1_000_000) as (root, _):
        yield root


def _call(url, method="GET", body=None, raw=None):
    data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
    req = urllib.request.Request(url, data=data, method=method)
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read() or b"null")
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"null")


# --- signature_name "" (http_rest_api_handler.cc GetInfoMap) ---------------------------

def test_an_empty_signature_name_means_serving_default(url):
    name, inputs, _ = _parse({"signature_name": "", "instances": ["abc"]})
    assert name == "serving_default" and list(inputs["image_bytes"]) == [b"abc"]
    assert 'signature name: "nope" not found' in _refused({"signature_name": "nope", "instances": ["abc"]})
    assert "must be a string" in _refused({"signature_name": None, "instances": ["abc"]})
    png = base64.b64encode(_png(0)).decode()
    named = _call(url + "/v1/models/m:predict", "POST", {"signature_name": "serving_default", "instances": [{"b64": png}]})
    empty = _call(url + "/v1/models/m:predict", "POST", {"signature_name": "", "instances": [{"b64": png}]})
    assert named[0] == empty[0] == 200 and named[1] == empty[1]


# --- unknown keys (json_tensor.cc FillPredictRequestFromJson, FillTensorMapFromInputsMap) ---

def test_unknown_top_level_keys_and_extra_named_inputs_are_ignored(url):
    name, inputs, rows = _parse({"instances": ["a"], "something": 1, "model_spec": {"x": 2}})
    assert rows and list(inputs["image_bytes"]) == [b"a"]
    _, inputs, rows = _parse({"signature_name": "floats", "inputs": {"x": [[1, 2]], "not_an_input": [[9]]}})
    assert not rows and inputs["x"].tolist() == [[1.0, 2.0]]
    # A missing named input is still an error, and so is a request with neither key.
    assert "lacks the named input(s) ['x']" in _refused({"signature_name": "floats", "inputs": {"y": [[1, 2]]}})
    assert "Missing 'instances' or 'inputs'" in _refused({"something": 1})
    status, out = _call(url + "/v1/models/m:predict", "POST",
                        {"signature_name": "serving_pixels", "instances": [[[[1, 2, 3]]]], "extra": True})
    assert status == 200 and np.array(out["predictions"]).shape == (1, 64)


# --- base64 (json_tensor.cc JsonDecodeBase64Object: Abseil's Base64Unescape) -----------

@pytest.mark.parametrize("text, decoded", [
    ("QQ==", b"A"), ("QQ", b"A"), ("QUI=", b"AB"), ("QUI", b"AB"), ("QUJD", b"ABC"), ("", b""),
    ("Q Q\n=\t=", b"A"),  # ASCII whitespace anywhere is skipped
    ("QQ..", b"A"),  # '.' pads as '=' does
])
def test_base64_may_leave_out_its_padding(text, decoded):
    assert rest_api.b64decode(text, "x") == decoded
    _, inputs, _ = _parse({"instances": [{"b64": text}]})
    assert list(inputs["image_bytes"]) == [decoded]


@pytest.mark.parametrize("text", ["Q", "QQ=", "QUI==", "QUJD=", "QQ==QQ", "QQ-_", "QQ==x", "QUJ\u00e9"])
def test_base64_with_wrong_padding_or_characters_is_refused(text):
    assert "is not valid base64" in _refused({"instances": [{"b64": text}]})


def test_unpadded_base64_embeds_as_the_padded_text_does(url):
    png = next(p for p in (_png(s) for s in range(10)) if len(p) % 3)  # a length that needs padding
    padded = base64.b64encode(png).decode()
    assert padded.endswith("=")
    answers = [_call(url + "/v1/models/m:predict", "POST", {"instances": [{"b64": t}]})
               for t in (padded, padded.rstrip("="))]
    assert answers[0][0] == answers[1][0] == 200 and answers[0][1] == answers[1][1]


# --- NaN and infinities (json_tensor.cc ParseJson: rapidjson's kParseNanAndInfFlag) ----

def test_nan_and_infinity_are_numbers_in_request_json(url):
    for literal, want in [("NaN", math.nan), ("Infinity", math.inf), ("-Infinity", -math.inf),
                          ("Inf", math.inf), ("-Inf", -math.inf), ("-NaN", math.nan)]:
        body = f'{{"signature_name": "floats", "instances": [[{literal}, 1.5]]}}'.encode()
        _, inputs, _ = _parse(body)
        got = inputs["x"][0, 0]
        assert (math.isnan(got) if math.isnan(want) else got == want), literal
    # Still JSON otherwise: a number too big for a double, or a misspelt constant, is a parse error.
    assert "Number too big" in _refused(b'{"signature_name": "floats", "instances": [[1e999, 0]]}')
    assert "JSON Parse error" in _refused(b'{"signature_name": "floats", "instances": [[Infinit, 0]]}')
    # An integer input takes JSON integers only: NaN is a type error there, not a parse error.
    status, out = _call(url + "/v1/models/m:predict", "POST",
                        raw=b'{"signature_name": "serving_pixels", "instances": [[[[NaN, 0, 0]]]]}')
    assert status == 400 and "JSON Parse error" not in out["error"] and "takes JSON integers" in out["error"]


def test_integer_inputs_take_json_integers_only():
    assert "takes JSON integers, got 1.0" in _refused({"signature_name": "serving_pixels", "instances": [[[[1.0, 2, 3]]]]})
    _, inputs, _ = _parse({"signature_name": "serving_pixels", "instances": [[[[1, 2, 3]]]]})
    assert inputs["images"].dtype == np.uint8


def test_parsing_stops_after_the_first_json_value():
    # rapidjson's kParseStopWhenDoneFlag: bytes after the request object are not read.
    _, inputs, _ = _parse(b'  {"instances": ["a"]} trailing bytes')
    assert list(inputs["image_bytes"]) == [b"a"]
    assert "The document is empty" in _refused(b" \n ")


# --- routes (http_server.cc, http_rest_api_handler.cc, http_rest_api_util.cc) ----------

@pytest.mark.parametrize("method, path", [
    ("GET", "/v1/models/m:predict"),  # the GET pattern has no :predict
    ("GET", "/v1/models/m/versions/1:predict"),
    ("POST", "/v1/models/m"),  # the POST pattern needs :predict
    ("POST", "/v1/models/m/metadata"),
    ("POST", "/v1/models/m:PREDICT"),  # the pattern is case-insensitive, the method name is not
    ("GET", "/v1/models/m/versions/one"),
    ("GET", "/v1/models/m/versions/-1"),
    ("GET", "/v1/models/m/"),
    ("POST", "/v1/models/m:predict?x=1"),  # the query is part of the matched path
    ("GET", "/v1/other"),
    ("PUT", "/v1/models/m"),
    ("DELETE", "/v1/models/m"),
])
def test_wrong_methods_and_malformed_urls_under_v1_get_400_malformed_request(url, method, path):
    body = b"{}" if method in ("POST", "PUT") else None
    status, out = _call(url + path, method, raw=body)
    assert status == 400 and out["error"] == f"Malformed request: {method} {path}", out


def test_paths_outside_v1_get_404_and_api_paths_are_case_insensitive(url, export_dir):
    assert _call(url + "/v2/models/m")[0] == 404
    assert _call(url + "/")[0] == 404
    assert _call(url + "/v1/models") == (400, {"error": "Missing model name in request."})
    status, out = _call(url + "/V1/Models/m/Versions/1")
    assert status == 200 and out["model_version_status"][0]["version"] == "1"
    # The name is percent-decoded; the version must fit in int64.
    assert _call(url + "/v1/models/%6D")[0] == 200
    status, out = _call(url + "/v1/models/m/versions/99999999999999999999")
    assert status == 400 and "Failed to convert version" in out["error"]
    # The query is part of the path, and a name may hold '?' and '=': no model "m?x=1".
    assert _call(url + "/v1/models/m?x=1") == (404, {"error": "Could not find any versions of model m?x=1"})
    # "METADATA" matches the pattern but is not the metadata subresource: it is a status call.
    status, out = _call(url + "/v1/models/m/METADATA")
    assert status == 200 and "model_version_status" in out


def test_cors_preflight_needs_an_origin(url):
    # http_server.cc answers OPTIONS itself, before routing, with an empty body.
    req = urllib.request.Request(url + "/v1/models/m:predict", method="OPTIONS", headers={"Origin": "https://a.example"})
    with urllib.request.urlopen(req, timeout=60) as r:
        assert r.status == 200 and r.read() == b""
    assert _call(url + "/v1/models/m:predict", "OPTIONS") == (400, None)


def test_version_labels_are_unknown_labels(url):
    status, out = _call(url + "/v1/models/m/labels/stable:predict", "POST", {"instances": ["a"]})
    assert status == 400 and out["error"] == "Unrecognized servable version label: stable"
    assert _call(url + "/v1/models/m/labels/stable/metadata")[0] == 400
    status, out = _call(url + "/v1/models/m/labels/stable")  # the status call ignores labels
    assert status == 200 and out == _call(url + "/v1/models/m")[1]


# --- metadata (get_model_metadata_impl.cc, http_rest_api_util.cc ToJsonString) --------

def test_metadata_prints_every_signature_with_its_default_fields(url):
    status, meta = _call(url + "/v1/models/m/metadata")
    assert status == 200 and set(meta) == {"model_spec", "metadata"}
    assert meta["model_spec"] == {"name": "m", "signature_name": "", "version": "1"}
    defs = meta["metadata"]["signature_def"]["signature_def"]
    assert {"serving_default", "serving_pixels", "__saved_model_init_op"} <= set(defs)
    pixels = defs["serving_pixels"]
    assert set(pixels) == {"inputs", "outputs", "method_name", "defaults"} and pixels["defaults"] == {}
    assert pixels["outputs"]["embedding"]["tensor_shape"] == {
        "dim": [{"size": "-1", "name": ""}, {"size": "64", "name": ""}], "unknown_rank": False}
    assert pixels["inputs"]["images"]["dtype"] == "DT_UINT8"
    assert defs["__saved_model_init_op"]["inputs"] == {} and defs["__saved_model_init_op"]["method_name"] == ""


# --- versions and their states (get_model_status_impl.cc, servable_state_monitor.h,
#     file_system_storage_path_source.cc, availability_preserving_policy.cc) -----------

def _copy_version(export_dir, base, version):
    shutil.copytree(os.path.join(export_dir, "1"), os.path.join(base, str(version)))


def test_status_lists_every_version_it_knows_newest_first(export_dir, tmp_path):
    base = str(tmp_path / "m")
    _copy_version(export_dir, base, 1)
    manager = servables.ModelManager("m", base)
    manager.poll()
    os.makedirs(os.path.join(base, "2"))
    with open(os.path.join(base, "2", "saved_model.pb"), "wb") as f:
        f.write(b"not a SavedModel")
    manager.poll()
    status = manager.status("m", None)["model_version_status"]
    assert [(s["version"], s["state"]) for s in status] == [("2", "END"), ("1", "AVAILABLE")]
    assert status[0]["status"]["error_code"] not in ("OK", "") and status[0]["status"]["error_message"]
    assert status[1]["status"] == {"error_code": "OK", "error_message": ""}
    assert manager.get("m", None).version == 1  # the failed load left version 1 in service
    _copy_version(export_dir, base, 3)
    manager.poll()
    status = manager.status("m", None)["model_version_status"]
    assert [(s["version"], s["state"], s["status"]["error_code"]) for s in status] == [
        ("3", "AVAILABLE", "OK"), ("2", "END", status[1]["status"]["error_code"]), ("1", "END", "OK")]
    # One version, whatever its state; an unknown one is 404, as is an unknown model.
    assert manager.status("m", "1")["model_version_status"] == [status[2]]
    for name, version, message in [("m", "7", "Could not find version 7 of model m"),
                                   ("other", None, "Could not find any versions of model other")]:
        with pytest.raises(RequestError, match=message) as info:
            manager.status(name, version)
        assert info.value.status == 404


def test_an_integer_named_version_that_fails_to_load_is_a_failed_version(export_dir, tmp_path):
    # TF Serving aspires every integer-named child and serves the newest only (latest
    # policy): an empty 2/ beside a good 1/ fails to load, and 1/ is not loaded instead.
    base = str(tmp_path / "m")
    _copy_version(export_dir, base, 1)
    os.makedirs(os.path.join(base, "2"))
    open(os.path.join(base, "README"), "w").close()  # not an integer: not a version
    manager = servables.ModelManager("m", base)
    assert manager.available_versions() == [1, 2]
    manager.poll()
    (only,) = manager.status("m", None)["model_version_status"]
    assert only["version"] == "2" and only["state"] == "END"
    assert only["status"]["error_code"] == "NOT_FOUND" and "saved_model.pb" in only["status"]["error_message"]
    with pytest.raises(RequestError) as info:
        manager.get("m", None)
    assert info.value.status == 404
    manager.poll()  # a failed version is not retried
    assert manager.status("m", None)["model_version_status"] == [only]
