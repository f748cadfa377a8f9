"""Write tests/data/torchvision_colour_reference.npz: torchvision's own colour ops on
seeded synthetic images, the reference `tests/test_augment.py` compares our ops with.

Run it with a Python that has torch and torchvision (never the project's own Python:
torch is not a dependency of this project):

    /work/torchvenv/bin/python tests/data/make_torchvision_colour_reference.py

(written with torch 2.14.1 and torchvision 0.29.1; the versions are stored in the
file). The images are random and constructed pixels, never dataset images.

Three paths, as torchvision runs them:
- `uint8`: torchvision.transforms.functional on uint8 tensors [3, H, W] (what a
  pipeline of uint8 tensors gets: each op converts back to uint8, by truncation);
- `float`: the same functions on float32 tensors in [0, 1] (no rounding);
- `pil`: the same functions on PIL images (the official SimSiam pipeline: ImageFolder
  loads PIL images and ColorJitter / RandomGrayscale run on them).

Stored arrays (N images, H x W, channels last):
    images            uint8 [N, H, W, 3]
    factors           float32 [N, 4]  brightness, contrast, saturation factors, hue delta
    {path}_{op}       the op with that image's factor; op in brightness, contrast,
                      saturation, hue, grayscale (grayscale: [N, H, W], one channel)
    jitter_factors    float32 [N, 4]  drawn by ColorJitter(0.4, 0.4, 0.4, 0.1).get_params
    jitter_order      int32 [N, 4]    its fn_idx: 0 brightness, 1 contrast, 2 saturation, 3 hue
    {path}_jitter     ColorJitter(0.4, 0.4, 0.4, 0.1)(image) with those parameters
"""

import os
import sys

import numpy as np
import torch
import torchvision
from PIL import Image
from torchvision import transforms
from torchvision.transforms import functional as F

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "torchvision_colour_reference.npz")
N, SIZE = 12, 10
OPS = ("brightness", "contrast", "saturation", "hue")


def make_images(rng):
    """Random images with varied statistics, and two of constructed edge cases."""
    images = rng.integers(0, 256, (N, SIZE, SIZE, 3)).astype(np.uint8)
    images[6:8] = rng.integers(0, 80, (2, SIZE, SIZE, 3))  # dark: brightness up stays in range
    images[8:10] = rng.integers(180, 256, (2, SIZE, SIZE, 3))  # bright: brightness and contrast clip
    # Greys, primaries, secondaries, black, white and ties of the largest channel (the
    # branches of RGB -> HSV), then random pixels.
    special = np.array(
        [[0, 0, 0], [255, 255, 255], [128, 128, 128], [255, 0, 0], [0, 255, 0], [0, 0, 255],
         [255, 255, 0], [0, 255, 255], [255, 0, 255], [200, 200, 10], [10, 200, 200], [200, 10, 200],
         [1, 0, 0], [254, 255, 255], [37, 200, 120], [250, 5, 128]], np.uint8,
    )
    flat = images[10:12].reshape(-1, 3)
    flat[: len(special)] = special
    flat[len(special) : 2 * len(special)] = special[::-1]
    images[10:12] = flat.reshape(2, SIZE, SIZE, 3)
    return images


def make_factors(rng):
    """Per-image factors over ColorJitter(0.4, 0.4, 0.4, 0.1)'s ranges, ends included,
    and two images with large hue deltas (wrap-around of the hue circle)."""
    factors = np.stack(
        [rng.uniform(0.6, 1.4, N), rng.uniform(0.6, 1.4, N), rng.uniform(0.6, 1.4, N), rng.uniform(-0.1, 0.1, N)], 1
    )
    factors[0] = (0.6, 0.6, 0.6, -0.1)
    factors[1] = (1.4, 1.4, 1.4, 0.1)
    factors[10, 3], factors[11, 3] = 0.45, -0.45
    return factors.astype(np.float32)


def to_tensor_uint8(image):
    return torch.from_numpy(image).permute(2, 0, 1).contiguous()


def to_tensor_float(image):
    return to_tensor_uint8(image).to(torch.float32) / 255.0


def from_tensor(t):
    return t.permute(1, 2, 0).numpy()


def apply(path, image, fn):
    """fn on one uint8 image [H, W, 3] through `path`; result channels last."""
    if path == "uint8":
        return from_tensor(fn(to_tensor_uint8(image)))
    if path == "float":
        return from_tensor(fn(to_tensor_float(image)))
    return np.asarray(fn(Image.fromarray(image, "RGB")))


def single_op(op, factor):
    return {
        "brightness": lambda x: F.adjust_brightness(x, factor),
        "contrast": lambda x: F.adjust_contrast(x, factor),
        "saturation": lambda x: F.adjust_saturation(x, factor),
        "hue": lambda x: F.adjust_hue(x, factor),
    }[op]


def main():
    rng = np.random.default_rng(20261202)
    torch.manual_seed(20261202)
    images = make_images(rng)
    factors = make_factors(rng)
    out = {"images": images, "factors": factors}
    for path in ("uint8", "float", "pil"):
        for k, op in enumerate(OPS):
            # float(): the float32 factor exactly, as a Python float (what F.adjust_* take).
            out[f"{path}_{op}"] = np.stack(
                [apply(path, images[i], single_op(op, float(factors[i, k]))) for i in range(N)]
            )
        gray = np.stack([apply(path, images[i], lambda x: F.rgb_to_grayscale(x, 1)) for i in range(N)])
        out[f"{path}_grayscale"] = gray.reshape(N, SIZE, SIZE)

    # ColorJitter itself: its get_params draws the factors and the order (fn_idx) from
    # torch's generator; they are recorded and replayed for the three paths.
    jitter = transforms.ColorJitter(0.4, 0.4, 0.4, 0.1)
    drawn = [jitter.get_params(jitter.brightness, jitter.contrast, jitter.saturation, jitter.hue) for _ in range(N)]
    out["jitter_order"] = np.array([d[0].numpy() for d in drawn], np.int32)
    out["jitter_factors"] = np.array([d[1:] for d in drawn], np.float32)
    for path in ("uint8", "float", "pil"):
        results = []
        for i in range(N):
            # Replay image i's draw (as float32-rounded factors, which our ops receive).
            params = (torch.as_tensor(out["jitter_order"][i]), *map(float, out["jitter_factors"][i]))
            jitter.get_params = lambda *args, params=params: params
            results.append(apply(path, images[i], jitter))
        out[f"{path}_jitter"] = np.stack(results)
    for key, value in out.items():
        if key.startswith("float_"):
            out[key] = value.astype(np.float32)
    out["versions"] = np.array(f"torch {torch.__version__}, torchvision {torchvision.__version__}")
    np.savez_compressed(OUT, **out)
    print(f"wrote {OUT} ({os.path.getsize(OUT)} bytes) with {torchvision.__version__}", file=sys.stderr)


if __name__ == "__main__":
    main()
