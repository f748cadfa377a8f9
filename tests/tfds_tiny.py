"""A real tensorflow-datasets dataset, small and generated offline, for tests.

`tfds.testing.mock_data` replaces reading with generated examples, so it cannot test
code that reads the stored records (SkipDecoding, ReadConfig with an input context,
file instructions). This builder writes real TFRecord shards into a temporary data_dir
with TFDS's own writer; nothing is downloaded.

    builder = prepare(tmp_path, num_train=64, num_test=16, shards=4)
    # --dataset tiny_images --data-dir str(tmp_path)
"""

import numpy as np
import tensorflow_datasets as tfds

CLASSES = ("red", "green", "blue", "grey")


def image(label: int, index: int, shape=(36, 52)) -> np.ndarray:
    """A non-square image whose mean colour encodes its class and index."""
    rgb = np.zeros(shape + (3,), np.uint8)
    rgb[..., label % 3] = 60 + 40 * (label // 3)
    rgb[..., (label + 1) % 3] = index % 200
    return rgb


class TinyImages(tfds.core.GeneratorBasedBuilder):
    """`num_train` + `num_test` JPEG images of 4 classes (set on the class before preparing)."""

    VERSION = tfds.core.Version("1.0.0")
    num_train = 64
    num_test = 16
    num_val = 0  # a "validation" split beside "test" when > 0

    def _info(self):
        # DatasetInfo directly: dataset_info_from_configs looks for metadata files in the
        # builder's package, and a test module is not a package.
        return tfds.core.DatasetInfo(
            builder=self,
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Image(shape=(None, None, 3), encoding_format="jpeg"),
                    "label": tfds.features.ClassLabel(names=list(CLASSES)),
                }
            ),
            supervised_keys=("image", "label"),
        )

    def _split_generators(self, dl_manager):
        splits = {"train": self._generate_examples(0, self.num_train), "test": self._generate_examples(1, self.num_test)}
        if self.num_val:
            splits["validation"] = self._generate_examples(2, self.num_val)
        return splits

    def _generate_examples(self, split, count):
        for i in range(count):
            label = i % len(CLASSES)
            yield f"{split}-{i}", {"image": image(label, i), "label": label}


def prepare(data_dir, num_train: int = 64, num_test: int = 16, shards: int = 4, num_val: int = 0):
    """Write tiny_images into `data_dir` with `shards` shards per split; the builder."""
    TinyImages.num_train, TinyImages.num_test, TinyImages.num_val = num_train, num_test, num_val
    builder = TinyImages(data_dir=str(data_dir))
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(num_shards=shards))
    return builder
