"""Does an export load and embed the same under the TensorFlow of a TF Serving image?

    python serving/check_compat.py --saved-model exports/simsiam/1 --tensorflow 2.20.0

TensorFlow promises that a SavedModel loads in a newer TensorFlow, and only within
patch releases in an older one; the export is written by the TensorFlow in
requirements.txt, and `tensorflow/serving:X` runs TensorFlow X. This builds a throwaway
virtual environment with `tensorflow-cpu==X` from the package registry (cached in
--venv-dir), loads the export there the way tensorflow_model_server does (the TF1
session loader, tag "serve", the signature `serving_default` by name), embeds a few
JPEG and PNG images, and compares with this TensorFlow's embeddings of the same bytes.

Prints one line per check and a verdict; exit 0 when the embeddings agree within
--atol, 1 when they do not or the export does not load, 2 on bad input.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import tempfile

# Runs inside the other TensorFlow: the TF1 session loader, as TF Serving loads.
CHILD = r"""
import json, sys
import numpy as np
import tensorflow as tf
path, images_file, out_file = sys.argv[1:4]
encoded = [bytes.fromhex(h) for h in json.load(open(images_file))]
with tf.Graph().as_default(), tf.compat.v1.Session() as session:
    meta = tf.compat.v1.saved_model.loader.load(session, ["serve"], path)
    signature = meta.signature_def["serving_default"]
    out = session.run(signature.outputs["embedding"].name, {signature.inputs["image_bytes"].name: encoded})
np.save(out_file, out)
print(tf.__version__)
"""


def _test_images() -> list[bytes]:
    """Three JPEGs and two PNGs of different sizes (generated: no image data in the repo)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    out = []
    for i, (h, w) in enumerate([(32, 32), (40, 56), (300, 200), (64, 48), (17, 33)]):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(buf, format="JPEG" if i < 3 else "PNG")
        out.append(buf.getvalue())
    return out


def _venv(venv_dir: str, version: str) -> str:
    """The python of a virtual environment with tensorflow-cpu==version (made once)."""
    python = os.path.join(venv_dir, "bin", "python")
    marker = os.path.join(venv_dir, ".tensorflow-" + version)
    if not os.path.exists(marker):
        print(f"building {venv_dir} with tensorflow-cpu=={version} (once; a few minutes)", flush=True)
        subprocess.run([sys.executable, "-m", "venv", venv_dir], check=True)
        subprocess.run([python, "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
                        f"tensorflow-cpu=={version}"], check=True)
        open(marker, "w").close()
    return python


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--saved-model", required=True, help="an exported version, e.g. exports/simsiam/1")
    p.add_argument("--tensorflow", default="2.20.0", help="the TensorFlow of the serving image (default 2.20.0)")
    p.add_argument("--venv-dir", help="where to build the environment (default: ~/.cache/simsiam-tf/venv-tf-X)")
    p.add_argument("--atol", type=float, default=1e-4)
    args = p.parse_args(argv)
    if not os.path.isfile(os.path.join(args.saved_model, "saved_model.pb")):
        print(f"check_compat.py: error: {args.saved_model} holds no saved_model.pb; pass an exported version "
              "directory (exports/simsiam/N)", file=sys.stderr)
        return 2
    venv_dir = args.venv_dir or os.path.expanduser(f"~/.cache/simsiam-tf/venv-tf-{args.tensorflow}")

    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import numpy as np
    import tensorflow as tf

    encoded = _test_images()
    with tf.Graph().as_default(), tf.compat.v1.Session() as session:
        meta = tf.compat.v1.saved_model.loader.load(session, ["serve"], args.saved_model)
        signature = meta.signature_def["serving_default"]
        here = session.run(signature.outputs["embedding"].name, {signature.inputs["image_bytes"].name: encoded})
    print(f"TensorFlow {tf.__version__} (this environment): {here.shape[0]} embeddings of {here.shape[1]} dims")

    python = _venv(venv_dir, args.tensorflow)
    with tempfile.TemporaryDirectory() as tmp:
        images_file, out_file = os.path.join(tmp, "images.json"), os.path.join(tmp, "out.npy")
        with open(images_file, "w") as f:
            json.dump([b.hex() for b in encoded], f)
        child = subprocess.run([python, "-c", CHILD, args.saved_model, images_file, out_file],
                               capture_output=True, text=True, env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"))
        if child.returncode != 0:
            last = (child.stderr.strip().splitlines() or ["no output"])[-1]
            print(f"TensorFlow {args.tensorflow}: the export does NOT load with the TF1 session loader: {last[:300]}")
            print("verdict: FAIL")
            return 1
        there = np.load(out_file)
    diff = float(np.max(np.abs(there - here))) if there.shape == here.shape else float("inf")
    print(f"TensorFlow {child.stdout.strip()} (tensorflow-cpu=={args.tensorflow}, TF1 session loader, "
          f"serving_default): max |difference| {diff:.2e} over {here.size} values")
    ok = diff <= args.atol
    print(f"verdict: {'PASS' if ok else 'FAIL'} (tolerance {args.atol:g})")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
