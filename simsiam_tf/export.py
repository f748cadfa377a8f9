"""Export the encoder as a SavedModel that TF Serving loads.

Layout written (a TF Serving model base path):

    EXPORT_DIR/N/saved_model.pb, variables/, assets/, simsiam_export.json

Signatures:

- `serving_default`: `image_bytes` (tf.string [None], JPEG or PNG bytes of any size)
  -> `embedding` (float32 [None, D]). Decoding, resizing and normalising happen in the
  graph with `augment.eval_preprocess`, the function the kNN monitor uses in training.
- `serving_pixels`: `images` (uint8 [None, H, W, 3]) -> `embedding`.

`embedding` is the backbone's features by default (what SimSiam's linear evaluation
uses), or the projection z with `output="projection"`; with `normalize=True` it is
l2-normalised in the graph (unit length, so a dot product is the cosine similarity the
kNN monitor ranks by), and `simsiam_export.json` records `"normalized"`. Only
TensorFlow ops are used (no `py_function`), so `tensorflow_model_server` can load the
result.

Keras 3's `model.save` writes `.keras`, not SavedModel; `keras.export.ExportArchive` is
used instead, with our own `tf.function`s (its `add_endpoint` turns autograph off).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile

import keras
import tensorflow as tf

from simsiam_tf import augment as aug
from simsiam_tf.config import TrainConfig, UsageError, load_config
from simsiam_tf.model import TwoViewModel, build_model
from simsiam_tf.rundir import BEST_DIR, LAST_DIR, WEIGHTS_FILE

OUTPUTS = ("features", "projection")
METADATA_FILE = "simsiam_export.json"


def checkpoint_path(run_dir: str, which: str = "best") -> str:
    """The weights file of a run: the checkpoint chosen by kNN on the validation split
    (`callbacks.BestCheckpoint`), else the last one."""
    best = os.path.join(run_dir, BEST_DIR, WEIGHTS_FILE)
    last = os.path.join(run_dir, LAST_DIR, "latest.weights.h5")
    if which == "best" and os.path.exists(best):
        return best
    if os.path.exists(last):
        return last
    raise UsageError(
        f"{run_dir!r} has no checkpoint (looked for {best} and {last}); "
        "pass the run directory of a train.py run that completed an epoch"
    )


def checkpoint_selection(path: str) -> str:
    """How the checkpoint at `path` was chosen, as reports label it: "last (epoch N)",
    "val-selected (epoch N)", or, for runs of versions that chose on the test split,
    "test-selected (epoch N; chosen on the test split by an older version)"."""
    directory = os.path.dirname(path)
    if os.path.basename(directory) != os.path.basename(BEST_DIR):
        meta = os.path.join(directory, "training_metadata.json")
        epoch = None
        if os.path.exists(meta):
            with open(meta) as f:
                epoch = json.load(f).get("epoch")
        return "last" + (f" (epoch {epoch})" if epoch is not None else "")
    info_path = os.path.join(directory, "info.json")
    info = {}
    if os.path.exists(info_path):
        with open(info_path) as f:
            info = json.load(f)
    if info.get("selected_on") == "val":
        return f"val-selected (epoch {info['epoch']})"
    return f"test-selected (epoch {info.get('epoch', '?')}; chosen on the test split by an older version)"


# `load_run(run_dir, INIT)`: the weights the run started from, rebuilt from its seed.
INIT = "init"


def load_run(run_dir: str, which: str = "best") -> tuple[TrainConfig, TwoViewModel, str]:
    """Rebuild a run's model from config.json and load its checkpoint ("best" or "last"),
    or, for `INIT`, rebuild the initial weights training started from (the path
    returned is then `INIT`)."""
    if not os.path.isdir(run_dir):
        raise UsageError(f"--run {run_dir!r} is not a directory")
    config = load_config(os.path.join(run_dir, "config.json"))
    if which == INIT:
        keras.utils.set_random_seed(config.seed)  # as training.build seeds the model it trains
        return config, build_model(config), INIT
    path = checkpoint_path(run_dir, which)
    model = build_model(config)
    _load_model_weights(model, path)
    return config, model, path


def _load_model_weights(model: keras.Model, path: str) -> None:
    """Load a checkpoint's model weights; its optimizer state, if any, is ignored."""
    import warnings

    with warnings.catch_warnings():
        # Keras warns that the optimizer's saved variables have no counterpart.
        warnings.filterwarnings("ignore", message=".*optimizer.*")
        warnings.filterwarnings("ignore", message=".*Skipping variable loading.*")
        model.load_weights(path)


def serving_model(model: TwoViewModel, config: TrainConfig) -> TwoViewModel:
    """The model the SavedModel computes with: `model`, or for a float16-trained one the
    same weights in a float32 network.

    float16 is a GPU training format: no CPU this project serves from computes it
    natively (the CIFAR ResNet-18 backbone, called in a tf.function at batch 64,
    inferred 53 images/s in float16 against 65 in float32 on the AVX512-BF16 EPYC),
    and activations beyond 65504 would
    overflow on images unlike the training data. Mixed precision keeps every variable
    in float32, so the float32 network holds exactly the trained weights. (A bfloat16
    run's graph stays bfloat16, as before: 166 images/s on that CPU.)
    """
    return float32_twin(model, config) if config.precision == "float16" else model


def float32_twin(model: TwoViewModel, config: TrainConfig) -> TwoViewModel:
    """The same trained weights in a float32 network (`model` itself for a float32 run).
    Mixed precision keeps every variable in float32, so nothing is rounded."""
    if config.precision == "float32":
        return model
    twin = build_model(config.replace(precision="float32", augment_on="host"))
    for mine, theirs in ((twin.backbone, model.backbone), (twin.projector, model.projector)):
        mine.set_weights(theirs.get_weights())
    return twin


def encoder_fn(model: TwoViewModel, output: str = "features", normalize: bool = False):
    """The network whose output is served: float normalised images -> float32 [B, D].

    `normalize` divides each row by its l2 norm with `tf.math.l2_normalize`, the
    function the kNN monitor applies to the same features (`diagnostics.knn.knn_predict`),
    so served vectors rank neighbours exactly as training's monitor did.
    """
    if output not in OUTPUTS:
        raise UsageError(f"--output {output!r}: choose features or projection")

    def encode(x):
        features = model.backbone(x, training=False)
        if output == "projection":
            features = model.projector(features, training=False)
        features = tf.cast(features, tf.float32)
        return tf.math.l2_normalize(features, axis=1) if normalize else features

    return encode


def decode_images(image_bytes: tf.Tensor, image_size: int) -> tf.Tensor:
    """JPEG/PNG bytes [B] of any sizes -> uint8 [B, R, R, 3] that `eval_preprocess` takes.

    Each image is brought to the common size `augment.storage_resize_uint8` gives
    (S x S below 96 px, the centre square at the evaluation side above), so that
    `eval_preprocess` of the batch is the evaluation preprocessing of each original.
    """
    side = aug.eval_resize_side(image_size)

    def one(data):
        image = tf.io.decode_image(data, channels=3, dtype=tf.uint8, expand_animations=False)
        image.set_shape([None, None, 3])
        return aug.storage_resize_uint8(image[None], image_size)[0]

    return tf.map_fn(one, image_bytes, fn_output_signature=tf.TensorSpec([side, side, 3], tf.uint8))


def build_signatures(model: TwoViewModel, config: TrainConfig, output: str = "features", normalize: bool = False):
    """The two serving functions, traced (ExportArchive needs concrete functions)."""
    encode = encoder_fn(model, output, normalize)
    size = config.image_size

    @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="image_bytes")])
    def serve_bytes(image_bytes):
        images = decode_images(image_bytes, size)
        return {"embedding": encode(aug.eval_preprocess(images, size))}

    @tf.function(input_signature=[tf.TensorSpec([None, None, None, 3], tf.uint8, name="images")])
    def serve_pixels(images):
        return {"embedding": encode(aug.eval_preprocess(images, size))}

    serve_bytes.get_concrete_function()
    serve_pixels.get_concrete_function()
    return serve_bytes, serve_pixels


def next_version(export_dir: str) -> int:
    """One more than the largest integer version directory (1 for a new base path)."""
    if not os.path.isdir(export_dir):
        return 1
    versions = [int(d) for d in os.listdir(export_dir) if d.isascii() and d.isdigit()]
    return max(versions, default=0) + 1


def publish_permissions(path: str) -> None:
    """Make a version readable as a normal directory is (0755 directories, 0644 files).

    `tempfile.mkdtemp` creates 0700, which a server running as another user (a non-root
    container, Kubernetes runAsNonRoot) cannot read.
    """
    os.chmod(path, 0o755)
    for root, dirs, files in os.walk(path):
        for d in dirs:
            os.chmod(os.path.join(root, d), 0o755)
        for f in files:
            os.chmod(os.path.join(root, f), 0o644)


def export_saved_model(
    model: TwoViewModel,
    config: TrainConfig,
    export_dir: str,
    version: int | None = None,
    output: str = "features",
    source: str | None = None,
    normalize: bool = False,
) -> str:
    """Write EXPORT_DIR/N atomically and return its path.

    The SavedModel is written to a hidden temporary directory beside the versions and
    renamed into place, so a server polling EXPORT_DIR never sees a half-written
    version (TF Serving issues 631, 1086). An EXPORT_DIR that cannot be created or
    written raises UsageError before anything is traced or written.
    """
    if version is not None and version < 1:
        raise UsageError(f"--version must be a positive integer, got {version}")
    _check_writable(export_dir)
    version = version or next_version(export_dir)
    final = os.path.join(export_dir, str(version))
    if os.path.exists(final):
        raise UsageError(f"{final} already exists; choose another --version or leave it out for the next one")

    model = serving_model(model, config)
    serve_bytes, serve_pixels = build_signatures(model, config, output, normalize)
    archive = keras.export.ExportArchive()
    archive.track(model.backbone)
    if output == "projection":
        archive.track(model.projector)
    archive.add_endpoint("serving_default", serve_bytes)
    archive.add_endpoint("serving_pixels", serve_pixels)

    tmp = tempfile.mkdtemp(prefix=f".tmp-{version}-", dir=export_dir)
    try:
        archive.write_out(tmp, verbose=False)
        embedding_dim = int(serve_pixels.get_concrete_function().structured_outputs["embedding"].shape[-1])
        metadata = {
            "output": output,
            "normalized": bool(normalize),
            "embedding_dim": embedding_dim,
            "image_size": config.image_size,
            "precision": config.precision,  # the training's; serving_model says what the graph computes in
            "serving_precision": "float32" if config.precision == "float16" else config.precision,
            "backbone": config.backbone,
            # What evaluate.py --saved-model scores it on by default: the run's
            # dataset, splits, input and kNN bank, as in training.
            "dataset": config.dataset,
            "data_dir": config.data_dir,
            "train_limit": config.train_limit,
            "val_fraction": config.val_fraction,
            "input": config.input,
            "knn_train_limit": config.knn_train_limit,
            "knn_k": config.knn_k,
            "knn_temperature": config.knn_temperature,
            "source_checkpoint": source,
            "source_selection": checkpoint_selection(source) if source and os.path.exists(source) else None,
        }
        with open(os.path.join(tmp, METADATA_FILE), "w") as f:
            json.dump(metadata, f, indent=2)
        publish_permissions(tmp)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def _check_writable(export_dir: str) -> None:
    """Create EXPORT_DIR if needed and prove it writable with an empty temporary file.

    `os.access` is not enough: it says yes to root on a read-only file system.
    """
    fix = "pass an --export-dir you can write to, or fix its permissions"
    try:
        os.makedirs(export_dir, exist_ok=True)
        with tempfile.TemporaryFile(dir=export_dir):
            pass
    except OSError as e:
        raise UsageError(f"cannot write to --export-dir {export_dir!r} ({e.strerror or e}); {fix}") from None


def describe_signatures(saved_model_dir: str) -> str:
    """A short text listing of a SavedModel's signatures, inputs and outputs."""
    loaded = tf.saved_model.load(saved_model_dir)
    lines = []
    for name, fn in sorted(loaded.signatures.items()):
        inputs = fn.structured_input_signature[1]
        outs = fn.structured_outputs
        fmt = lambda spec: f"{spec.dtype.name}{[d if d is not None else -1 for d in spec.shape.as_list()]}"
        ins = ", ".join(f"{k}: {fmt(v)}" for k, v in sorted(inputs.items()))
        o = ", ".join(f"{k}: {fmt(v)}" for k, v in sorted(outs.items()))
        lines.append(f"  {name}({ins}) -> {o}")
    return "\n".join(lines)
