"""Near-duplicate search on a collection with planted duplicates: precision and recall.

    python benchmarks/planted_duplicates.py --run runs/contrastive/cifar-simsiam-s0
    python benchmarks/planted_duplicates.py --run RUN --images 2000 --copies 400 --split train

The collection: the first --images CIFAR-10 images of --split (the same number from each
class, in file order) of $SIMSIAM_CIFAR10 or data/cifar10, plus --copies planted
near-copies of randomly chosen ones (--seed), a quarter of each kind:

  jpeg    re-encoded as JPEG at quality 30
  resize  resized to 20 x 20 px and back to 32 x 32 (bilinear)
  crop    a 28 x 28 crop at a random offset, resized back to 32 x 32 (bicubic)
  flip    mirrored left to right

Copies other than `jpeg` are saved as JPEG at quality 95. The folder is written to a
temp dir (never into the repository) and deleted at the end.

The run is exported l2-normalised (as `export.py --normalize`) into the temp dir and
served by the local stand-in, started in this process (serving.local_server.running).
The folder is embedded over REST by the bulk client (`python -m serving.client
--folder`'s code), so the duplicate finder reads the same JSON-lines file a user has.

Then `serving.duplicates` runs on it. A found pair is a pair at or above the threshold
(cluster membership is not used). Precision: the share of found pairs that are planted;
recall: the share of planted pairs found. CIFAR-10 may hold real near-duplicates of
its own, which count against precision here. Printed at the threshold chosen from the
data and at --thresholds, with recall per kind, then one JSON line.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import CIFAR, Parser, existing_dir, missing_cifar, nonnegative_int, positive_int, report  # noqa: E402

KINDS = ("jpeg", "resize", "crop", "flip")


def plant(image, kind: str, rng):
    """(the near-copy of a PIL image, the JPEG quality to save it at)."""
    from PIL import Image

    size = image.size
    if kind == "jpeg":
        return image, 30
    if kind == "resize":
        return image.resize((20, 20), Image.Resampling.BILINEAR).resize(size, Image.Resampling.BILINEAR), 95
    if kind == "crop":
        x, y = rng.integers(0, size[0] - 28 + 1), rng.integers(0, size[1] - 28 + 1)
        return image.crop((x, y, x + 28, y + 28)).resize(size, Image.Resampling.BICUBIC), 95
    if kind == "flip":
        return image.transpose(Image.Transpose.FLIP_LEFT_RIGHT), 95
    raise ValueError(kind)


def build_collection(source: str, folder: str, images: int, copies: int, seed: int):
    """Write the collection under `folder`; return the planted pairs [(original, copy, kind)]
    as names relative to `folder`."""
    from PIL import Image

    from serving.client import find_images

    classes = sorted(d for d in os.listdir(source) if os.path.isdir(os.path.join(source, d)))
    per_class = -(-images // len(classes))
    chosen = []
    for c in classes:
        chosen += [f"{c}/{n}" for n in find_images(os.path.join(source, c))[:per_class]]
    chosen = chosen[: images] if len(chosen) >= images else chosen
    if len(chosen) < images or copies > len(chosen):
        raise SystemExit(f"planted_duplicates.py: error: {source} gives {len(chosen)} images for --images {images} "
                         f"--copies {copies}; pass smaller numbers")
    for name in chosen:
        os.makedirs(os.path.join(folder, os.path.dirname(name)), exist_ok=True)
        shutil.copyfile(os.path.join(source, name), os.path.join(folder, name))
    rng = np.random.default_rng(seed)
    planted = []
    for k, index in enumerate(sorted(rng.choice(len(chosen), copies, replace=False))):
        name, kind = chosen[index], KINDS[k % len(KINDS)]
        with Image.open(os.path.join(folder, name)) as original:
            copy, quality = plant(original.convert("RGB"), kind, rng)
        copy_name = f"{os.path.splitext(name)[0]}-{kind}.jpg"
        copy.save(os.path.join(folder, copy_name), quality=quality)
        planted.append((name, copy_name, kind))
    return planted


def score(names, found_i, found_j, planted):
    """(found pairs, true pairs, precision, recall, recall per kind)."""
    index = {n: i for i, n in enumerate(names)}
    truth = {tuple(sorted((index[a], index[b]))): kind for a, b, kind in planted}
    found = set(zip(found_i.tolist(), found_j.tolist()))
    hits = found & truth.keys()
    per_kind = {k: sum(truth[p] == k for p in hits) / max(1, sum(v == k for v in truth.values())) for k in KINDS}
    precision = len(hits) / len(found) if found else float("nan")
    return len(found), len(hits), precision, len(hits) / len(truth), per_kind


def main(argv=None) -> int:
    p = Parser(prog="planted_duplicates.py", description=__doc__)
    p.add_argument("--run", type=existing_dir, required=True, help="run directory written by train.py")
    p.add_argument("--images", type=positive_int, default=1000, help="CIFAR-10 images in the collection (default 1000)")
    p.add_argument("--copies", type=nonnegative_int, default=200, help="planted near-copies (default 200, 50 per kind)")
    p.add_argument("--split", default="test", choices=("train", "test"), help="CIFAR-10 split to take them from")
    p.add_argument("--seed", type=nonnegative_int, default=0, help="which images get copies, and the crop offsets")
    p.add_argument("--thresholds", default="0.98,0.99,0.995,0.998",
                   help="fixed cosine thresholds to score besides the chosen one (comma-separated)")
    p.add_argument("--expected", type=float, default=1.0,
                   help="serving.duplicates --expected: ordinary images allowed under the chosen threshold (default 1)")
    p.add_argument("--save", metavar="DIR", help="also keep the embeddings file and the planted pairs "
                   "(embeddings.jsonl, planted.json) in DIR, e.g. to run python -m serving.duplicates on them")
    args = p.parse_args(argv)
    try:
        fixed = [float(t) for t in args.thresholds.split(",") if t.strip()]
    except ValueError:
        p.error(f"--thresholds {args.thresholds!r}: expected numbers separated by commas")
    if any(not -1 <= t <= 1 for t in fixed):
        p.error(f"--thresholds {args.thresholds!r}: cosine thresholds lie in [-1, 1]")
    source = os.path.join(CIFAR, args.split)
    if not os.path.isdir(source):
        print(f"planted_duplicates.py: error: {missing_cifar(CIFAR) or f'no {args.split} split in {CIFAR}'}",
              file=sys.stderr)
        return 2

    from serving import local_server
    from serving.client import EmbeddingClient, embed_folder
    from serving.duplicates import describe_nearest, find_duplicates, pairs_above
    from serving.similar import load_embeddings
    from simsiam_tf import export

    work = tempfile.mkdtemp(prefix="planted-duplicates-")
    try:
        folder = os.path.join(work, "collection")
        planted = build_collection(source, folder, args.images, args.copies, args.seed)
        config, model, checkpoint = export.load_run(args.run, "best")
        base = os.path.join(work, "exports", "simsiam")
        export.export_saved_model(model, config, base, normalize=True)
        out = os.path.join(work, "embeddings.jsonl")
        started = time.monotonic()
        with local_server.running("simsiam", base, port=0) as (url, _):
            if embed_folder(EmbeddingClient(url, "simsiam", batch_size=64), folder, out, progress=False):
                print("planted_duplicates.py: error: some images could not be embedded (above)", file=sys.stderr)
                return 1
        embed_seconds = time.monotonic() - started
        names, matrix, _ = load_embeddings(out)
        if args.save:
            os.makedirs(args.save, exist_ok=True)
            shutil.copyfile(out, os.path.join(args.save, "embeddings.jsonl"))
            with open(os.path.join(args.save, "planted.json"), "w") as f:
                json.dump([{"original": a, "copy": b, "kind": k} for a, b, k in planted], f, indent=0)
        started = time.monotonic()
        found = find_duplicates(matrix, expected=args.expected)
        find_seconds = time.monotonic() - started
    finally:
        shutil.rmtree(work, ignore_errors=True)

    print(f"run {args.run} ({checkpoint}), {len(names)} images ({args.images} of CIFAR-10 {args.split} "
          f"+ {len(planted)} planted copies), {matrix.shape[1]}-d embeddings in {embed_seconds:.1f} s")
    print(describe_nearest(found.nearest))
    print(f"threshold {found.threshold:.6f} ({found.chosen.explain()}); found in {find_seconds:.2f} s")
    rows = []
    for label, threshold in [("chosen", found.threshold)] + [("fixed", t) for t in fixed]:
        i, j = (found.pair_i, found.pair_j) if label == "chosen" else pairs_above(matrix, threshold)[:2]
        count, hits, precision, recall, per_kind = score(names, i, j, planted)
        rows.append({"threshold": round(threshold, 6), "how": label, "pairs": count, "planted_found": hits,
                     "precision": round(precision, 4), "recall": round(recall, 4),
                     **{f"recall_{k}": round(v, 4) for k, v in per_kind.items()}})
    columns = [("threshold", "threshold"), ("how", "how"), ("pairs", "pairs found"), ("planted_found", "planted"),
               ("precision", "precision"), ("recall", "recall")] + [(f"recall_{k}", f"recall {k}") for k in KINDS]
    for r in rows:  # the table prints 3 decimals; the thresholds need 6
        r["threshold"] = f"{r['threshold']:.6f}"
    report("planted_duplicates", rows, columns,
           {"run": args.run, "checkpoint": str(checkpoint), "images": args.images, "copies": len(planted),
            "split": args.split, "seed": args.seed, "expected": args.expected, "embed_seconds": round(embed_seconds, 1),
            "find_seconds": round(find_seconds, 2)})
    return 0


if __name__ == "__main__":
    sys.exit(main())
