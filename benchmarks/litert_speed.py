"""Model size and images/s of the SavedModel, LiteRT float32 and LiteRT dynamic-range, in one run.

    python benchmarks/litert_speed.py                       # untrained cifar preset (ResNet-18 width 64, 32 px)
    python benchmarks/litert_speed.py --run runs/contrastive/cifar-simsiam-s0
    python benchmarks/litert_speed.py --quick               # width 8, few repeats: a smoke test

The three models are made from the same weights: the SavedModel as `export.py` writes
it, and both .tflite files as `export.py --format litert [--quantize dynamic]` does.
Every model gets the same uint8 [B, S, S, 3] pixels (random, or the first images of
--folder prepared with `simsiam_tf.litert.prepare_image`): the SavedModel through its
`serving_pixels` signature, LiteRT through ai-edge-litert's Interpreter with --threads
threads (default: all cores, as TensorFlow uses). Decoding is not timed. Batches 1 and
32, median of --repeats calls after --warmup. Size: the bytes of the version directory
(SavedModel) or of model.tflite. Also the lowest cosine between the dynamic-range and
the float32 embeddings over the 32 images, and the largest |difference| float32 - SavedModel.

The weights do not matter for speed; without --run an untrained encoder of --preset is used.
"""

from __future__ import annotations

import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import Parser, existing_dir, median_seconds, positive_int, report  # noqa: E402

BATCHES = (1, 32)


def _dir_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(r, f)) for r, _, files in os.walk(path) for f in files)


def main(argv=None) -> int:
    p = Parser(prog="litert_speed.py", description=__doc__)
    p.add_argument("--run", type=existing_dir, help="a train.py run (default: an untrained model of --preset)")
    p.add_argument("--preset", default="cifar", help="preset of the untrained model (default: cifar)")
    p.add_argument("--width", type=positive_int, help="ResNet width of the untrained model (default: the preset's)")
    p.add_argument("--folder", type=existing_dir, help="take the images from this folder (JPEG/PNG, sorted) instead of random pixels")
    p.add_argument("--threads", type=positive_int, default=os.cpu_count(), help="LiteRT threads (default: all cores)")
    p.add_argument("--repeats", type=positive_int, default=20, help="timed calls per measurement (default 20)")
    p.add_argument("--warmup", type=positive_int, default=3, help="untimed calls first (default 3)")
    p.add_argument("--quick", action="store_true", help="width 8, 3 repeats, 1 warm-up: a smoke test")
    args = p.parse_args(argv)
    if args.quick:
        args.width, args.repeats, args.warmup = args.width or 8, 3, 1

    import numpy as np
    import tensorflow as tf

    from simsiam_tf import export, litert
    from simsiam_tf.config import make_config
    from simsiam_tf.model import build_model

    if args.run:
        config, model, source = export.load_run(args.run)
    else:
        config = make_config(args.preset, **({"width": args.width} if args.width else {}))
        model, source = build_model(config), None
    size = config.image_size
    if args.folder:
        from serving.client import find_images

        names = find_images(args.folder)[: max(BATCHES)]
        if len(names) < max(BATCHES):
            p.error(f"--folder {args.folder!r} holds {len(names)} images, fewer than {max(BATCHES)}; pass a larger folder")
        images = np.stack([litert.prepare_image(os.path.join(args.folder, n), size) for n in names])
    else:
        images = np.random.default_rng(0).integers(0, 256, (max(BATCHES), size, size, 3), dtype=np.uint8)

    with tempfile.TemporaryDirectory(prefix="litert-speed-") as tmp:
        saved = export.export_saved_model(model, config, os.path.join(tmp, "simsiam"), source=source)
        float32 = litert.export_litert(model, config, os.path.join(tmp, "lite"), source=source)
        dynamic = litert.export_litert(model, config, os.path.join(tmp, "lite"), source=source, quantize="dynamic")
        pixels = tf.saved_model.load(saved).signatures["serving_pixels"]
        engines = {
            "savedmodel": (lambda x: pixels(images=tf.constant(x))["embedding"].numpy(), _dir_bytes(saved)),
            "litert-float32": (litert.LiteRTEncoder(float32, num_threads=args.threads), os.path.getsize(float32)),
            "litert-dynamic": (litert.LiteRTEncoder(dynamic, num_threads=args.threads), os.path.getsize(dynamic)),
        }
        out = {name: fn(images) for name, (fn, _) in engines.items()}
        rows = []
        for name, (fn, nbytes) in engines.items():
            row = {"model": name, "bytes": nbytes}
            for batch in BATCHES:
                x = images[:batch]
                row[f"images_per_s_b{batch}"] = batch / median_seconds(lambda: fn(x), args.warmup, args.repeats)
            rows.append(row)

    a, b = out["litert-float32"], out["litert-dynamic"]
    cosine = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    extra = {
        "run": args.run, "preset": None if args.run else args.preset, "width": config.width, "image_size": size,
        "images": "folder" if args.folder else "random", "threads": args.threads, "repeats": args.repeats,
        "dynamic_vs_float32_min_cosine": float(cosine.min()),
        "float32_vs_savedmodel_max_abs": float(np.abs(a - out["savedmodel"]).max()),
        "load_average": os.getloadavg()[0],
    }
    report("litert_speed", rows, [("model", "model"), ("bytes", "bytes"), ("images_per_s_b1", "images/s b1"),
                                  ("images_per_s_b32", "images/s b32")], extra)
    print(f"dynamic vs float32, lowest cosine: {extra['dynamic_vs_float32_min_cosine']:.6f}; "
          f"float32 vs SavedModel, max |difference|: {extra['float32_vs_savedmodel_max_abs']:.2e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
