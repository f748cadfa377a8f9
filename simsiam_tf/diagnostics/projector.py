"""TensorBoard embedding-projector files for the backbone features of the test split.

Keras 3's `TensorBoard(embeddings_freq=...)` writes `.h5` files that the projector
cannot read, so the files are written here with `tensorboard.plugins.projector`:

    TB_DIR/projector_config.pbtxt     the projector's configuration
    TB_DIR/checkpoint, embedding.ckpt-1.*   a TF checkpoint holding one variable,
                                      the features [N, F] (float32)
    TB_DIR/metadata.tsv               one row per image: label id and class name
    TB_DIR/sprite.png                 the images as a grid of thumbnails, row-major

TB_DIR is the run's `tb/` directory, so `tensorboard --logdir RUN` (or `--logdir runs`)
shows them under the Projector tab. The checkpoint path is not written into the config:
the projector finds it through the `checkpoint` file, so the run directory can move.
"""

from __future__ import annotations

import math
import os

import numpy as np
import tensorflow as tf
from PIL import Image
from tensorboard.plugins import projector

from simsiam_tf.diagnostics.embed import FeatureExtractor
from simsiam_tf.input.catalog import subset

TENSOR_NAME = "embedding/.ATTRIBUTES/VARIABLE_VALUE"
SPRITE_MAX_PIXELS = 8192  # the projector's limit on each side of the sprite image


def sprite_image(images: np.ndarray) -> tuple[np.ndarray, int]:
    """A square grid of thumbnails of uint8 images [N, H, W, 3], row-major.

    Thumbnails are the images themselves, or smaller when the grid would exceed the
    projector's 8192-pixel limit. Returns (uint8 [G * T, G * T, 3], T).
    """
    n, h, _, _ = images.shape
    grid = max(1, math.ceil(math.sqrt(n)))
    thumb = min(h, SPRITE_MAX_PIXELS // grid)
    if thumb != h:
        images = np.stack([np.asarray(Image.fromarray(x).resize((thumb, thumb), Image.BILINEAR)) for x in images])
    canvas = np.zeros((grid * thumb, grid * thumb, 3), np.uint8)
    for i, image in enumerate(images):
        r, c = divmod(i, grid)
        canvas[r * thumb : (r + 1) * thumb, c * thumb : (c + 1) * thumb] = image
    return canvas, thumb


def write_projector(
    tb_dir: str,
    backbone,
    images: np.ndarray,
    labels: np.ndarray,
    class_names: list[str],
    image_size: int,
    max_images: int = 2000,
) -> int:
    """Write the projector files for backbone features of `images` into `tb_dir`.

    Args:
        backbone: the Keras backbone; features use the evaluation preprocessing.
        images: uint8 [N, H, W, 3], usually the labelled test split.
        labels: int [N]; class_names: their names ([] to use the ids).
        max_images: keep a fixed random subset of at most this many images.
    Returns:
        The number of images written.
    """
    keep = subset(len(images), max_images)
    images, labels = images[keep], np.asarray(labels)[keep]
    features = FeatureExtractor(backbone, image_size)(images)
    os.makedirs(tb_dir, exist_ok=True)

    # The manager keeps one checkpoint and writes the `checkpoint` index with a relative
    # path, which is how the projector finds the tensor.
    checkpoint = tf.train.Checkpoint(embedding=tf.Variable(features))
    tf.train.CheckpointManager(checkpoint, tb_dir, max_to_keep=1, checkpoint_name="embedding.ckpt").save()
    with open(os.path.join(tb_dir, "metadata.tsv"), "w") as f:
        # With more than one column the projector expects a header row.
        f.write("label\tclass\n")
        for label in labels:
            name = class_names[label] if label < len(class_names) else str(label)
            f.write(f"{int(label)}\t{name}\n")
    sprite, thumb = sprite_image(images)
    Image.fromarray(sprite).save(os.path.join(tb_dir, "sprite.png"))

    config = projector.ProjectorConfig()
    embedding = config.embeddings.add()
    embedding.tensor_name = TENSOR_NAME
    embedding.metadata_path = "metadata.tsv"
    embedding.sprite.image_path = "sprite.png"
    embedding.sprite.single_image_dim.extend([thumb, thumb])
    projector.visualize_embeddings(tb_dir, config)
    return len(images)
