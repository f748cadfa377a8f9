"""The REST contract of the local stand-in server, and the client, against a real export."""

import base64
import io
import json
import os
import shutil
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import numpy as np
import pytest
from PIL import Image

from serving import local_server
from serving.client import ClientError, EmbeddingClient
from simsiam_tf import export, training
from simsiam_tf.diagnostics.embed import FeatureExtractor
from simsiam_tf.config import make_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _png(image):
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


IMAGES = np.random.default_rng(0).integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
PNGS = [_png(im) for im in IMAGES]
B64 = [base64.b64encode(p).decode("ascii") for p in PNGS]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    config = make_config("digits", width=8, proj_dim=64, pred_dim=16, batch_size=32, epochs=1, train_limit=64, knn_k=20)
    training.run(config, str(root / "run"), verbose=0)
    config, model, _ = export.load_run(str(root / "run"))
    base = str(root / "models" / "simsiam")
    export.export_saved_model(model, config, base)
    expected = FeatureExtractor(model.backbone, 32)(IMAGES)
    return {"base": base, "expected": expected, "model": model, "config": config, "run": str(root / "run")}


@pytest.fixture(scope="module")
def server(exported):
    with local_server.running("simsiam", exported["base"], port=0, poll_seconds=0.2, max_request_bytes=200_000) as (
        url, manager
    ):
        yield {"url": url, "manager": manager, **exported}


def _call(url, body=None, raw=None, method=None):
    data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
    req = urllib.request.Request(url, data=data, method=method or ("POST" if data is not None else "GET"))
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def _predict(server, body, version=None):
    path = "/v1/models/simsiam" + (f"/versions/{version}" if version else "") + ":predict"
    return _call(server["url"] + path, body)


def test_row_format_with_b64(server):
    status, out = _predict(server, {"instances": [{"b64": b} for b in B64]})
    assert status == 200 and set(out) == {"predictions"}
    np.testing.assert_allclose(np.array(out["predictions"]), server["expected"], atol=1e-5)


def test_row_format_with_named_inputs_and_signature(server):
    body = {"signature_name": "serving_default", "instances": [{"image_bytes": {"b64": b}} for b in B64[:2]]}
    status, out = _predict(server, body)
    assert status == 200
    np.testing.assert_allclose(np.array(out["predictions"]), server["expected"][:2], atol=1e-5)


def test_columnar_format(server):
    for inputs in ({"image_bytes": [{"b64": b} for b in B64]}, [{"b64": b} for b in B64]):
        status, out = _predict(server, {"inputs": inputs})
        assert status == 200 and set(out) == {"outputs"}
        np.testing.assert_allclose(np.array(out["outputs"]), server["expected"], atol=1e-5)


def test_pixels_signature(server):
    status, out = _predict(server, {"signature_name": "serving_pixels", "instances": IMAGES[:2].tolist()})
    assert status == 200
    np.testing.assert_allclose(np.array(out["predictions"]), server["expected"][:2], atol=1e-5)


def test_version_path_status_and_metadata(server):
    status, out = _predict(server, {"instances": [{"b64": B64[0]}]}, version=1)
    assert status == 200
    assert _call(server["url"] + "/v1/models/simsiam") == (
        200, {"model_version_status": [{"version": "1", "state": "AVAILABLE", "status": {"error_code": "OK", "error_message": ""}}]}
    )
    status, meta = _call(server["url"] + "/v1/models/simsiam/versions/1/metadata")
    assert status == 200 and meta["model_spec"] == {"name": "simsiam", "signature_name": "", "version": "1"}
    sig = meta["metadata"]["signature_def"]["signature_def"]["serving_default"]
    assert sig["inputs"]["image_bytes"]["dtype"] == "DT_STRING"
    assert sig["outputs"]["embedding"]["tensor_shape"]["dim"] == [{"size": "-1", "name": ""}, {"size": "64", "name": ""}]
    assert sig["method_name"] == "tensorflow/serving/predict"


@pytest.mark.parametrize(
    "body, status, message",
    [
        ({"instances": [{"b64": "not base64!"}]}, 400, "not valid base64"),
        ({"instances": [{"b64": base64.b64encode(b"plain text, not an image").decode()}]}, 400, "Unknown image file format"),
        ({"instances": []}, 400, "'instances' is empty"),
        ({"signature_name": "embed_everything", "instances": [{"b64": B64[0]}]}, 400, 'signature name: "embed_everything" not found'),
        ({"instances": [{"b64": B64[0]}], "inputs": [{"b64": B64[0]}]}, 400, "both 'instances' and 'inputs'"),
        ({"signature_name": "serving_pixels", "instances": [[[1, 2, 3]]]}, 400, "must have rank 4"),
        ({"signature_name": "serving_pixels", "instances": [[[[1, 2]]]]}, 400, "must have shape [-1, -1, -1, 3]"),
        ({"signature_name": "serving_pixels", "instances": [[[[1, 2, 256]]]]}, 400, "outside [0, 255]"),
        ({"signature_name": "serving_pixels", "instances": [[[["a", 2, 3]]]]}, 400, "must hold uint8 numbers"),
        ({"instances": [123]}, 400, "must be a string or {\"b64\": ...}"),
        ({"signature_name": "serving_pixels", "instances": [[[[1, 2, 3]]], [[[1, 2, 3], [4, 5, 6]]]]}, 400, "ragged"),
        ({}, 400, "Missing 'instances' or 'inputs'"),
    ],
)
def test_bad_requests_get_400_and_the_server_keeps_serving(server, body, status, message):
    got_status, out = _predict(server, body)
    assert got_status == status and message in out["error"], out
    ok, _ = _predict(server, {"instances": [{"b64": B64[0]}]})
    assert ok == 200


def test_not_found_and_malformed_paths(server):
    assert _call(server["url"] + "/v1/models/other")[0] == 404
    assert _call(server["url"] + "/v1/models/simsiam/versions/9")[0] == 404
    assert _predict(server, {"instances": [{"b64": B64[0]}]}, version=9)[0] == 404
    assert _call(server["url"] + "/v1/models/simsiam/versions/..%2F..")[0] in (400, 404)
    assert _call(server["url"] + "/nothing/here")[0] == 404
    status, out = _call(server["url"] + "/v1/models/simsiam:predict", raw=b"{not json")
    assert status == 400 and "JSON Parse error" in out["error"]


def test_request_size_limit(server):
    big = {"instances": [{"b64": base64.b64encode(os.urandom(300_000)).decode()}]}
    status, out = _predict(server, big)
    assert status == 413 and "exceeds the limit" in out["error"]


def test_new_version_is_served_without_restart(server):
    base = server["base"]
    shutil.copytree(os.path.join(base, "1"), os.path.join(base, ".tmp-2"))
    os.rename(os.path.join(base, ".tmp-2"), os.path.join(base, "2"))
    deadline = time.time() + 30
    while time.time() < deadline:
        status, out = _call(server["url"] + "/v1/models/simsiam")
        if out["model_version_status"][0]["version"] == "2" and out["model_version_status"][0]["state"] == "AVAILABLE":
            break
        time.sleep(0.1)
    assert out["model_version_status"][0]["version"] == "2" and out["model_version_status"][0]["state"] == "AVAILABLE"
    assert _predict(server, {"instances": [{"b64": B64[0]}]})[0] == 200
    assert _predict(server, {"instances": [{"b64": B64[0]}]}, version=1)[0] == 404  # latest policy


def test_client_embeds_in_batches(server):
    client = EmbeddingClient(server["url"], "simsiam", batch_size=3)
    vectors = client.embed(PNGS)
    np.testing.assert_allclose(np.array(vectors), server["expected"], atol=1e-5)
    assert client.status()["model_version_status"][0]["state"] == "AVAILABLE"


def test_client_errors_are_clear(server):
    with pytest.raises(ClientError, match="HTTP 400: .*Unknown image file format"):
        EmbeddingClient(server["url"], "simsiam", retries=0).embed([b"not an image"])
    with pytest.raises(ClientError, match="HTTP 404"):
        EmbeddingClient(server["url"], "nosuchmodel", retries=0).embed(PNGS[:1])
    started = time.time()
    with pytest.raises(ClientError, match="cannot reach the server after 3 attempt"):
        EmbeddingClient("http://127.0.0.1:9", "simsiam", retries=2, backoff=0.01, timeout=2).embed(PNGS[:1])
    assert time.time() - started < 10


def test_a_bad_image_fails_only_itself_and_the_client_names_it(server):
    # Decoding happens in the graph, so one bad image fails its whole request; the
    # client splits the request until it finds it, and the others still embed.
    client = EmbeddingClient(server["url"], "simsiam", batch_size=4, retries=0)
    with pytest.raises(ClientError, match="image 2 cannot be embedded") as e:
        client.embed([PNGS[0], PNGS[1], b"not an image", PNGS[2]])
    assert e.value.index == 2
    np.testing.assert_allclose(np.array(client.embed(PNGS)), server["expected"], atol=1e-5)


def test_the_client_learns_the_servers_batch_limit(server, monkeypatch):
    # TF Serving with batching refuses a request above max_batch_size with this message.
    client = EmbeddingClient(server["url"], "simsiam", batch_size=4, retries=0)
    real, sizes = client._request, []

    def limited(method, suffix, body):
        if body is not None:
            sizes.append(len(body["instances"]))
            if len(body["instances"]) > 1:
                raise ClientError(f"POST: HTTP 400: Task size {len(body['instances'])} is larger than maximum "
                                  "input batch size 1", status=400)
        return real(method, suffix, body)

    monkeypatch.setattr(client, "_request", limited)
    np.testing.assert_allclose(np.array(client.embed(PNGS)), server["expected"], atol=1e-5)
    assert sizes == [4, 2, 1, 1, 1, 1] and client.batch_size == 1


def test_end_to_end_cli_train_export_serve_query(tmp_path):
    """train.py -> export.py -> local_server.py -> python -m serving.client, all as a user runs them."""
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", PYTHONPATH=REPO)
    py = sys.executable
    run = str(tmp_path / "run")
    base = str(tmp_path / "exports" / "simsiam")
    steps = [
        [py, "train.py", "--width", "8", "--batch-size", "32", "--train-limit", "64", "--epochs", "1",
         "--precision", "float32", "--logdir", run],
        [py, "export.py", "--run", run, "--export-dir", base],
    ]
    for cmd in steps:
        done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-2000:]
    server = subprocess.Popen(
        [py, "serving/local_server.py", "--model_name", "simsiam", "--model_base_path", base, "--rest_api_port", "0"],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
    )
    try:
        line = server.stdout.readline()
        assert line.startswith("listening on http://127.0.0.1:"), line
        url = line.split()[2]
        files = []
        for i, im in enumerate(IMAGES[:3]):
            path = tmp_path / f"img{i}.png"
            path.write_bytes(_png(im))
            files.append(str(path))
        query = subprocess.run(
            [py, "-m", "serving.client", "--url", url, "--model", "simsiam", *files],
            cwd=REPO, env=env, capture_output=True, text=True, timeout=120,
        )
        assert query.returncode == 0, query.stderr[-2000:]
        result = json.loads(query.stdout)
    finally:
        server.terminate()
        server.wait(timeout=30)
    assert [r["image"] for r in result] == files
    config, model, _ = export.load_run(run)
    expected = FeatureExtractor(model.backbone, 32)(IMAGES[:3])
    np.testing.assert_allclose(np.array([r["embedding"] for r in result]), expected, atol=1e-5)


def _one_error_line(done, prefix):
    """The stderr of a command that failed cleanly: exactly one line, starting `prefix`."""
    assert "Traceback" not in done.stderr, done.stderr[-2000:]
    lines = [l for l in done.stderr.splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith(prefix), done.stderr
    return lines[0]


def test_client_batch_size_zero_is_one_line(tmp_path):
    image = tmp_path / "a.png"
    image.write_bytes(PNGS[0])
    done = subprocess.run([sys.executable, "-m", "serving.client", "--batch-size", "0", str(image)],
                          cwd=REPO, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert _one_error_line(done, "python -m serving.client: error: ") == (
        "python -m serving.client: error: argument --batch-size: expected a whole number of at least 1, "
        "got '0' (see --help)")


@pytest.fixture
def html_server():
    """Not TF Serving: a web page on every path, as a proxy or another service would answer."""
    import http.server

    class Page(http.server.BaseHTTPRequestHandler):
        def _page(self):
            if self.command == "POST":
                self.rfile.read(int(self.headers.get("Content-Length", 0)))
            body = b"<html><body><h1>Welcome to nginx!</h1></body></html>"
            self.send_response(404 if "missing" in self.path else 200)
            self.send_header("Content-Type", "text/html")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        do_GET = do_POST = _page

        def log_message(self, *args):
            pass

    srv = http.server.HTTPServer(("127.0.0.1", 0), Page)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{srv.server_address[1]}"
    srv.shutdown()
    srv.server_close()


def test_a_non_json_answer_is_one_line_naming_what_came_back(html_server, tmp_path):
    with pytest.raises(ClientError, match=r"HTTP 200 answered with text/html that is not JSON \('<html><body><h1>"
                                          r"Welcome to nginx!.*'\); expected TF Serving's REST API at "):
        EmbeddingClient(html_server, "simsiam", retries=0).embed(PNGS[:1])
    with pytest.raises(ClientError, match=r"HTTP 404: Not Found; the body is not TF Serving's JSON \('<html>"):
        EmbeddingClient(html_server, "missing", retries=0).embed(PNGS[:1])
    image = tmp_path / "a.png"
    image.write_bytes(PNGS[0])
    done = subprocess.run([sys.executable, "-m", "serving.client", "--url", html_server, "--retries", "0", str(image)],
                          cwd=REPO, capture_output=True, text=True, timeout=60)
    assert done.returncode == 1
    line = _one_error_line(done, "client: error: POST ")
    assert "text/html that is not JSON" in line and f"expected TF Serving's REST API at {html_server}/v1/models/simsiam:predict" in line


def test_a_non_http_port_is_one_line(tmp_path):
    # What TF Serving's gRPC port (8500) does to an HTTP request: it answers something else.
    import socket

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()

    def answer_garbage():
        for _ in range(2):
            conn, _ = listener.accept()
            conn.recv(65536)
            conn.sendall(b"\x00\x00\x18\x04\x00\x00\x00\x00\x00")  # an HTTP/2 SETTINGS frame
            # Read the rest of the request before closing: closing on unread bytes would
            # reset the connection, which the client reports differently.
            conn.shutdown(socket.SHUT_WR)
            while conn.recv(65536):
                pass
            conn.close()

    threading.Thread(target=answer_garbage, daemon=True).start()
    url = f"http://127.0.0.1:{listener.getsockname()[1]}"
    try:
        with pytest.raises(ClientError, match=r"did not answer in HTTP .*port 8501 by default, gRPC is 8500"):
            EmbeddingClient(url, "simsiam", retries=1, backoff=0.01).embed(PNGS[:1])
    finally:
        listener.close()


def test_local_server_refuses_a_version_directory_or_an_empty_base_path(exported, tmp_path):
    version_dir = os.path.join(exported["base"], "1")
    cmd = [sys.executable, "serving/local_server.py", "--model_name", "simsiam", "--rest_api_port", "0",
           "--model_base_path"]
    done = subprocess.run(cmd + [version_dir], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert _one_error_line(done, "local_server.py: error: ") == (
        f"local_server.py: error: --model_base_path {version_dir!r} is a version directory (it holds "
        f"saved_model.pb); pass the directory that holds the versions 1/, 2/, ...: --model_base_path {exported['base']}")
    done = subprocess.run(cmd + [str(tmp_path)], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert "holds no version directories (1/, 2/, ..., each with saved_model.pb); pass the --export-dir" in (
        _one_error_line(done, "local_server.py: error: "))
