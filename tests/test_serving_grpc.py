"""TF Serving's gRPC API on the local stand-in, and the client's gRPC transport, against a
real export: the same answers as REST and the in-process model, TF Serving's status
codes, bad images named, the bulk path resumable after a kill, new versions picked up."""

import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import grpc
import numpy as np
import pytest
import tensorflow as tf
from PIL import Image
from tensorflow_serving.apis import (
    classification_pb2,
    get_model_metadata_pb2,
    get_model_status_pb2,
    model_service_pb2_grpc,
    predict_pb2,
    prediction_service_pb2_grpc,
)

from serving import grpc_client as client_module
from serving import local_server
from serving.client import read_embeddings
from serving.client_base import ClientError
from serving.grpc_client import GrpcEmbeddingClient
from simsiam_tf import export
from simsiam_tf.config import make_config
from simsiam_tf.diagnostics.embed import FeatureExtractor
from simsiam_tf.model import build_model

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CIFAR_TEST = os.path.join(os.path.dirname(REPO), "shared", "datasets", "cifar10", "test")
IMAGES = np.random.default_rng(5).integers(0, 256, (6, 32, 32, 3), dtype=np.uint8)


def _png(image):
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


PNGS = [_png(im) for im in IMAGES]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    # An untrained tiny encoder: these tests check the transport, not the features.
    root = tmp_path_factory.mktemp("grpc")
    config = make_config("digits", width=8, proj_dim=64, pred_dim=16)
    model = build_model(config)
    base = str(root / "models" / "simsiam")
    export.export_saved_model(model, config, base)
    return {"base": base, "expected": FeatureExtractor(model.backbone, 32)(IMAGES), "root": root}


@pytest.fixture(scope="module")
def server(exported):
    with local_server.running("simsiam", exported["base"], port=0, poll_seconds=0.2) as servers:
        url, manager = servers
        channel = grpc.insecure_channel(servers.grpc)
        yield {"url": url, "target": servers.grpc, "manager": manager, "channel": channel,
               "predict": prediction_service_pb2_grpc.PredictionServiceStub(channel),
               "models": model_service_pb2_grpc.ModelServiceStub(channel), **exported}
        channel.close()


def _request(images=PNGS, name="simsiam", version=None, signature=None):
    """A PredictRequest as TF Serving's own Python examples build it (tf.make_tensor_proto)."""
    request = predict_pb2.PredictRequest()
    request.model_spec.name = name
    if version is not None:
        request.model_spec.version.value = version
    if signature is not None:
        request.model_spec.signature_name = signature
    request.inputs["image_bytes"].CopyFrom(tf.make_tensor_proto(list(images), dtype=tf.string))
    return request


def _rest_predict(url, images):
    import base64
    import urllib.request

    body = json.dumps({"instances": [{"b64": base64.b64encode(b).decode()} for b in images]}).encode()
    with urllib.request.urlopen(urllib.request.Request(url + "/v1/models/simsiam:predict", data=body), timeout=60) as r:
        return np.array(json.loads(r.read())["predictions"], np.float32)


def test_grpc_predict_equals_rest_and_the_in_process_model(server):
    response = server["predict"].Predict(_request(), timeout=60)
    got = tf.make_ndarray(response.outputs["embedding"])
    assert got.shape == (6, 64) and got.dtype == np.float32
    assert response.outputs["embedding"].float_val  # typed field, as TF Serving writes outputs by default
    assert (response.model_spec.name, response.model_spec.version.value, response.model_spec.signature_name) == (
        "simsiam", 1, "serving_default")
    np.testing.assert_allclose(got, server["expected"], atol=1e-5)
    np.testing.assert_allclose(got, _rest_predict(server["url"], PNGS), atol=1e-5)
    # The raw-pixel signature takes a uint8 tensor.
    pixels = predict_pb2.PredictRequest()
    pixels.model_spec.name, pixels.model_spec.signature_name = "simsiam", "serving_pixels"
    pixels.inputs["images"].CopyFrom(tf.make_tensor_proto(IMAGES[:2]))
    out = tf.make_ndarray(server["predict"].Predict(pixels, timeout=60).outputs["embedding"])
    np.testing.assert_allclose(out, server["expected"][:2], atol=1e-5)
    # The client's transport (its own message classes, no TensorFlow) gets the same numbers.
    client = GrpcEmbeddingClient(server["target"], "simsiam", batch_size=4)
    np.testing.assert_allclose(np.array(client.embed(PNGS)), server["expected"], atol=1e-5)
    client.close()


def test_metadata_and_status(server):
    request = get_model_metadata_pb2.GetModelMetadataRequest(metadata_field=["signature_def"])
    request.model_spec.name = "simsiam"
    response = server["predict"].GetModelMetadata(request, timeout=60)
    assert (response.model_spec.name, response.model_spec.version.value) == ("simsiam", 1)
    defs = get_model_metadata_pb2.SignatureDefMap()
    assert response.metadata["signature_def"].Unpack(defs)
    sig = defs.signature_def["serving_default"]
    assert sig.inputs["image_bytes"].dtype == tf.string.as_datatype_enum
    assert [d.size for d in sig.outputs["embedding"].tensor_shape.dim] == [-1, 64]
    assert sig.method_name == "tensorflow/serving/predict"
    assert "serving_pixels" in defs.signature_def

    for version in (None, 1):
        status_request = get_model_status_pb2.GetModelStatusRequest()
        status_request.model_spec.name = "simsiam"
        if version:
            status_request.model_spec.version.value = version
        status = server["models"].GetModelStatus(status_request, timeout=60)
        (only,) = status.model_version_status
        assert only.version == 1 and only.state == get_model_status_pb2.ModelVersionStatus.AVAILABLE
    assert GrpcEmbeddingClient(server["target"], "simsiam").status()["model_version_status"][0] == {
        "version": "1", "state": "AVAILABLE", "status": {"error_code": "OK", "error_message": ""}}


def _bad_input_request():
    request = _request()
    request.inputs["images"].CopyFrom(tf.make_tensor_proto(IMAGES[:1]))  # an input the signature lacks
    return request


def _wrong_dtype_request():
    request = _request()
    request.inputs["image_bytes"].CopyFrom(tf.make_tensor_proto([1.0, 2.0]))
    return request


@pytest.mark.parametrize(
    "call, code, message",
    [
        # What TF Serving answers (tensorflow_serving/model_servers, servables/tensorflow/predict_util.cc):
        (lambda s: s["predict"].Predict(_request(name="other")), "NOT_FOUND", "Servable not found for request: Latest(other)"),
        (lambda s: s["predict"].Predict(_request(version=9)), "NOT_FOUND", "Specific(simsiam, 9)"),
        (lambda s: s["predict"].Predict(_request(signature="embed_all")), "FAILED_PRECONDITION",
         'Serving signature key "embed_all" not found.'),
        (lambda s: s["predict"].Predict(_request([b"plain text, not an image"])), "INVALID_ARGUMENT",
         "Unknown image file format"),
        (lambda s: s["predict"].Predict(_bad_input_request()), "INVALID_ARGUMENT",
         "input size does not match signature: 2!=1"),
        (lambda s: s["predict"].Predict(_wrong_dtype_request()), "INVALID_ARGUMENT",
         "Expected input image_bytes to be string but get float."),
        (lambda s: s["predict"].Predict(predict_pb2.PredictRequest()), "INVALID_ARGUMENT", "Missing ModelSpec"),
        (lambda s: s["models"].GetModelStatus(get_model_status_pb2.GetModelStatusRequest(model_spec={"name": "other"})),
         "NOT_FOUND", "other"),
        (lambda s: s["predict"].GetModelMetadata(get_model_metadata_pb2.GetModelMetadataRequest(
            model_spec={"name": "simsiam"})), "INVALID_ARGUMENT", "must specify at least one metadata_field"),
        (lambda s: s["predict"].Classify(classification_pb2.ClassificationRequest()), "UNIMPLEMENTED", ""),
    ],
)
def test_errors_carry_tf_servings_status_codes_and_the_server_keeps_serving(server, call, code, message):
    with pytest.raises(grpc.RpcError) as info:
        call(server)
    assert info.value.code().name == code and message in (info.value.details() or ""), info.value
    assert server["predict"].Predict(_request(PNGS[:1]), timeout=60).outputs["embedding"].float_val


def test_the_clients_messages_are_tf_servings_on_the_wire():
    # The client builds its messages without TensorFlow: each field must have the number
    # and wire type of TF Serving's own message, and the bytes must parse as it.
    from google.protobuf import descriptor

    mine = client_module._grpc_messages()
    real = {"PredictRequest": predict_pb2.PredictRequest, "PredictResponse": predict_pb2.PredictResponse,
            "GetModelStatusRequest": get_model_status_pb2.GetModelStatusRequest,
            "GetModelStatusResponse": get_model_status_pb2.GetModelStatusResponse}
    seen = set()

    def same_fields(a, b):
        if a.full_name in seen:
            return
        seen.add(a.full_name)
        assert a.full_name == b.full_name
        for field in a.fields:
            other = b.fields_by_name[field.name]
            assert field.number == other.number, field.full_name
            types = {other.type} | ({descriptor.FieldDescriptor.TYPE_INT32} if other.type == other.TYPE_ENUM else set())
            assert field.type in types, field.full_name
            assert field.is_repeated == other.is_repeated, field.full_name
            if field.message_type is not None:
                same_fields(field.message_type, other.message_type)

    for name, cls in real.items():
        same_fields(mine[name].DESCRIPTOR, cls.DESCRIPTOR)
    assert len(seen) >= 10  # the walk reached the nested messages (TensorProto, ModelSpec, ...)

    ours = mine["PredictRequest"]()
    ours.model_spec.name, ours.model_spec.signature_name = "simsiam", "serving_default"
    ours.model_spec.version.value = 3
    ours.inputs["image_bytes"].dtype = 7
    ours.inputs["image_bytes"].tensor_shape.dim.add(size=2)
    ours.inputs["image_bytes"].string_val.extend(PNGS[:2])
    theirs = predict_pb2.PredictRequest.FromString(ours.SerializeToString())
    assert theirs == _request(PNGS[:2], version=3, signature="serving_default")
    assert client_module._MODEL_VERSION_STATES == {
        v: k for k, v in get_model_status_pb2.ModelVersionStatus.State.items()}


def test_a_bad_image_in_a_grpc_batch_is_named(server, tmp_path):
    client = GrpcEmbeddingClient(server["target"], "simsiam", batch_size=4, retries=0)
    with pytest.raises(ClientError, match="image 2 cannot be embedded: .*INVALID_ARGUMENT: Unknown image file format") as e:
        client.embed([PNGS[0], PNGS[1], b"not an image", PNGS[2]])
    assert e.value.index == 2 and e.value.code == "INVALID_ARGUMENT"
    np.testing.assert_allclose(np.array(client.embed(PNGS)), server["expected"], atol=1e-5)
    client.close()
    # The commands, as a user runs them: the single-image form names the file ...
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"\xff\xd8 not really a jpeg")
    good = tmp_path / "good.png"
    good.write_bytes(PNGS[0])
    done = subprocess.run([sys.executable, "-m", "serving.client", "--grpc", server["target"], str(good), str(bad)],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert done.stderr.startswith(f"client: error: {bad}: image 1 cannot be embedded: "), done.stderr
    # ... and the bulk form skips it by name and embeds the rest.
    folder = tmp_path / "photos"
    (folder / "dog").mkdir(parents=True)
    for i, png in enumerate(PNGS[:3]):
        (folder / f"{i}.png").write_bytes(png)
    shutil.copy(bad, folder / "dog" / "broken.jpg")
    out = tmp_path / "emb.jsonl"
    done = subprocess.run([sys.executable, "-m", "serving.client", "--grpc", server["target"], "--folder", str(folder),
                           "--out", str(out), "--batch-size", "4", "--no-progress"],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1 and "Traceback" not in done.stderr
    skipped = [l for l in done.stderr.splitlines() if l.startswith("client: skipped")]
    assert len(skipped) == 1 and skipped[0].startswith("client: skipped dog/broken.jpg: "), done.stderr
    assert [r["image"] for r in read_embeddings(str(out))[0]] == ["0.png", "1.png", "2.png"]


def _slow_server(monkeypatch, seconds):
    """Every predict takes `seconds` longer: a run of a few dozen images lasts long enough to kill."""
    from serving import servables

    real = servables.ServableVersion.predict

    def slow(self, signature, inputs):
        time.sleep(seconds)
        return real(self, signature, inputs)

    monkeypatch.setattr(servables.ServableVersion, "predict", slow)


def test_the_bulk_client_over_grpc_resumes_after_a_kill(server, tmp_path, monkeypatch):
    folder = tmp_path / "photos"
    for i in range(30):
        (folder / f"c{i % 3}").mkdir(parents=True, exist_ok=True)
        (folder / f"c{i % 3}" / f"{i:03d}.png").write_bytes(PNGS[i % len(PNGS)])
    cmd = [sys.executable, "-m", "serving.client", "--grpc", server["target"], "--folder", str(folder),
           "--batch-size", "1", "--no-progress", "--out"]
    clean, killed = tmp_path / "clean.jsonl", tmp_path / "killed.jsonl"
    done = subprocess.run(cmd + [str(clean)], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    # The same command over REST writes the same file: one format, whichever the transport.
    rest = tmp_path / "rest.jsonl"
    rest_cmd = [a if a != server["target"] else server["url"] for a in cmd]
    rest_cmd[rest_cmd.index("--grpc")] = "--url"
    done = subprocess.run(rest_cmd + [str(rest)], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert rest.read_bytes() == clean.read_bytes()

    _slow_server(monkeypatch, 0.1)
    run = subprocess.Popen(cmd + [str(killed)], cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and (not killed.exists() or killed.read_bytes().count(b"\n") < 5):
        time.sleep(0.02)
    run.send_signal(signal.SIGKILL)
    run.wait(timeout=30)
    written = killed.read_bytes().count(b"\n")
    assert run.returncode == -signal.SIGKILL and 5 <= written < 30, (run.returncode, written)
    monkeypatch.undo()

    done = subprocess.run(cmd + [str(killed)], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert f"{30 - written} embedded" in done.stderr and f"{written} already there" in done.stderr, done.stderr
    # One image per request in both runs, so the same forward passes: the same bytes.
    assert killed.read_bytes() == clean.read_bytes()


def test_a_new_version_is_picked_up_over_grpc(exported, tmp_path):
    base = str(tmp_path / "simsiam")
    shutil.copytree(exported["base"], base)
    with local_server.running("simsiam", base, port=0, poll_seconds=0.2) as servers:
        client = GrpcEmbeddingClient(servers.grpc, "simsiam", batch_size=4)
        assert client.status()["model_version_status"][0]["version"] == "1"
        before = client.embed(PNGS[:2])
        shutil.copytree(os.path.join(base, "1"), os.path.join(base, ".tmp-2"))
        os.rename(os.path.join(base, ".tmp-2"), os.path.join(base, "2"))
        deadline = time.time() + 30
        newest = {}
        while time.time() < deadline:  # newest first; LOADING before AVAILABLE, as TF Serving
            newest = client.status()["model_version_status"][0]
            if newest["version"] == "2" and newest["state"] == "AVAILABLE":
                break
            time.sleep(0.1)
        assert newest["version"] == "2" and newest["state"] == "AVAILABLE"
        stub = prediction_service_pb2_grpc.PredictionServiceStub(client._channel)  # the same connection
        assert stub.Predict(_request(PNGS[:2]), timeout=60).model_spec.version.value == 2
        np.testing.assert_allclose(client.embed(PNGS[:2]), before, atol=1e-6)  # a copy of version 1
        with pytest.raises(ClientError, match="NOT_FOUND"):  # the latest policy unloaded version 1
            GrpcEmbeddingClient(servers.grpc, "simsiam", version=1, retries=0).embed(PNGS[:1])
        client.close()


def test_grpc_client_errors_are_one_line(server, tmp_path):
    with pytest.raises(ClientError, match=r"cannot reach the server after 2 attempt\(s\)"):
        GrpcEmbeddingClient("127.0.0.1:9", "simsiam", retries=1, backoff=0.01, timeout=5).embed(PNGS[:1])
    rest_port = server["url"].replace("http://", "")
    with pytest.raises(ClientError, match=r"is .* TF Serving's gRPC port \(8500 by default; REST is 8501"):
        GrpcEmbeddingClient(rest_port, "simsiam", retries=0, timeout=10).embed(PNGS[:1])
    image = tmp_path / "a.png"
    image.write_bytes(PNGS[0])
    for args, problem in ((["--grpc", "localhost:8500", "--url", "http://localhost:8501"], "not both"),
                          (["--grpc", "http://localhost:8500"], "expected HOST:PORT")):
        done = subprocess.run([sys.executable, "-m", "serving.client", *args, str(image)],
                              cwd=REPO, capture_output=True, text=True, timeout=60)
        lines = done.stderr.strip().splitlines()
        assert done.returncode == 2 and len(lines) == 1 and problem in lines[0], done.stderr


def test_the_rest_client_imports_neither_grpc_nor_tensorflow():
    code = ("import sys, serving.client as c; c.build_parser(); "
            "print(sorted(m for m in ('grpc', 'google.protobuf', 'tensorflow') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert done.stdout.strip() == "[]", done.stdout + done.stderr
    code = "import sys, serving.grpc_client as c; c._grpc_messages(); print('tensorflow' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert done.stdout.strip() == "False", done.stdout + done.stderr


def test_local_server_prints_both_addresses_binds_loopback_and_refuses_a_busy_port(exported):
    from simsiam_tf.tf_quiet import is_noise

    env = dict(os.environ)
    cmd = [sys.executable, "serving/local_server.py", "--model_name", "simsiam", "--model_base_path",
           exported["base"], "--rest_api_port", "0"]
    first = subprocess.Popen(cmd + ["--port", "0"], cwd=REPO, env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.DEVNULL, text=True)
    try:
        line = first.stdout.readline()
        words = line.split()
        # "listening on http://127.0.0.1:P (REST) and 127.0.0.1:Q (gRPC), model simsiam from ..."
        assert line.startswith("listening on http://127.0.0.1:") and words[3:5] == ["(REST)", "and"], line
        target = words[5]
        assert target.startswith("127.0.0.1:") and words[6] == "(gRPC),", line
        # The gRPC port answers (GetModelStatus from a client without TensorFlow) ...
        assert GrpcEmbeddingClient(target, "simsiam").status()["model_version_status"][0]["state"] == "AVAILABLE"
        # ... on loopback only.
        with pytest.raises(OSError):
            socket.create_connection((_an_outside_address(), int(target.rsplit(":", 1)[1])), timeout=2).close()
        # A second server on the same gRPC port fails in one line naming the flag.
        done = subprocess.run(cmd + ["--port", target.rsplit(":", 1)[1]], cwd=REPO, env=env, capture_output=True,
                              text=True, timeout=120)
        lines = [l for l in done.stderr.splitlines() if l.strip() and not is_noise(l) and not l.startswith("serving ")]
        assert done.returncode == 2 and len(lines) == 1, done.stderr
        assert lines[0] == (f"local_server.py: error: cannot listen on 127.0.0.1:{target.rsplit(':', 1)[1]} for gRPC "
                            "(Address already in use); pass another --port"), lines
    finally:
        first.terminate()
        first.wait(timeout=30)


def _an_outside_address():
    """An address of this host that is not loopback (the one the default route uses)."""
    probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        probe.connect(("192.0.2.1", 9))  # TEST-NET: no packet is sent for a UDP connect
        address = probe.getsockname()[0]
    except OSError:
        pytest.skip("no non-loopback address on this host")
    finally:
        probe.close()
    if address.startswith("127."):
        pytest.skip("no non-loopback address on this host")
    return address


@pytest.mark.skipif(not os.path.isdir(CIFAR_TEST), reason="needs the CIFAR-10 folder at ../shared/datasets/cifar10")
def test_bulk_benchmark_quick():
    done = subprocess.run([sys.executable, "benchmarks/serving_bulk.py", "--quick", "--images", "32",
                           "--folder", CIFAR_TEST], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["benchmark"] == "serving_bulk" and result["images"] == 32 and result["same_images"]
    assert [(r["round"], r["transport"]) for r in result["rows"]] == [(1, "rest"), (1, "grpc"), (2, "grpc"), (2, "rest")]
    assert result["max_abs_diff"] <= 1e-5
    assert result["grpc_over_rest"] == pytest.approx(result["grpc_images_per_s"] / result["rest_images_per_s"], rel=0.01)
