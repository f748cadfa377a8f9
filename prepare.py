"""Write an image folder into TFRecord shards plus an index, for streaming training.

    python prepare.py --src data/cifar10 --out data/cifar10-records
    python prepare.py --src photos/ --out data/photos --max-side 512 --quality 90

--src has train.py's folder:PATH layout: PATH/train/<class>/* and optional
PATH/test/<class>/*, or a folder of images (unlabelled). --out receives
{split}-00000-of-000NN.tfrecord shards and index.json, written last. Each split is
shuffled with --seed and dealt to its shards in turn, so every shard mixes classes and
shards differ by at most one image. Files TensorFlow cannot decode are skipped, counted
in one warning line and listed in index.json. A killed run leaves only complete shards;
run it again with --overwrite. Bad input exits with code 2 and one line naming the problem.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from simsiam_tf import tf_quiet  # no TensorFlow: bad arguments fail at once
from simsiam_tf.cli import Parser


def _int_at_least(low, high=None):
    def parse(text):
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}")
        if value < low or (high is not None and value > high):
            expected = f"{low}..{high}" if high is not None else f"at least {low}"
            raise argparse.ArgumentTypeError(f"expected {expected}, got {value}")
        return value

    return parse


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="prepare.py", description=__doc__)
    p.add_argument("--src", required=True, help="PATH/train/<class>/*.jpg [PATH/test/<class>/*], or loose images")
    p.add_argument("--out", required=True, help="directory for the shards and index.json")
    p.add_argument("--shards", type=_int_at_least(1), help="shards per split (default: ~128 MiB each, at least 16)")
    p.add_argument("--max-side", type=_int_at_least(1), metavar="PX", help="shrink images longer than PX to PX, as JPEG")
    p.add_argument("--quality", type=_int_at_least(1, 100), default=95, help="JPEG quality of shrunk images (default 95)")
    p.add_argument("--seed", type=_int_at_least(0), default=0, help="seed of the file order (default 0)")
    p.add_argument("--workers", type=_int_at_least(1), help="images decoded in parallel (default: number of CPUs)")
    p.add_argument("--overwrite", action="store_true", help="replace the shards and index.json in --out")
    return p


class _Progress:
    """images done / total and rate on stderr: redrawn in place on a terminal, a line
    every few seconds in a log file."""

    def __init__(self, stream=None):
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.started = self.drawn = time.time()
        self.done = self.width = 0

    def __call__(self, done: int, total: int) -> None:
        now = time.time()
        if done == self.done or (done < total and now - self.drawn < (0.2 if self.tty else 5.0)):
            return
        self.drawn, self.done = now, done
        rate = done / max(now - self.started, 1e-9)
        filled = int(30 * done / max(total, 1))
        line = f"{done:,}/{total:,} images [{'#' * filled}{'.' * (30 - filled)}] {rate:,.0f} images/s"
        if done < total and rate > 0:
            line += f", {(total - done) / rate:,.0f} s left"
        if self.tty:  # pad over the end of a longer previous line
            line, self.width = line.ljust(self.width), max(self.width, len(line))
        self.stream.write(f"\r{line}" if self.tty else f"{line}\n")
        if self.tty and done >= total:
            self.stream.write("\n")
        self.stream.flush()


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from simsiam_tf.config import UsageError
    from simsiam_tf.input.catalog import require_folder

    started = time.time()
    try:
        require_folder(args.src, flag="--src")  # before TensorFlow
        tf_quiet.import_tensorflow()  # only for a command that parsed
        from simsiam_tf.input import records

        index = records.write_records(
            args.src, args.out, shards=args.shards, max_side=args.max_side, seed=args.seed,
            workers=args.workers, quality=args.quality, overwrite=args.overwrite, progress=_Progress(),
        )
    except UsageError as e:
        print(f"prepare.py: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"\ninterrupted; complete shards are in {args.out}; run again with --overwrite", file=sys.stderr)
        return 130
    skipped = index["skipped"]
    if skipped:
        shown = ", ".join(skipped[:5]) + (", ..." if len(skipped) > 5 else "")
        print(
            f"prepare.py: warning: skipped {len(skipped)} file(s) TensorFlow cannot decode (empty, truncated, "
            f"not an image or unreadable): {shown}; all are listed under \"skipped\" in "
            f"{os.path.join(args.out, records.INDEX_FILE)}",
            file=sys.stderr,
        )
    written = sum(s["bytes"] for split in index["splits"].values() for s in split["shards"])
    splits = ", ".join(
        f"{name} {split['count']:,} images in {len(split['shards'])} shards" for name, split in index["splits"].items()
    )
    print(
        f"Wrote {splits}; skipped {len(skipped)}; {time.time() - started:.1f} s, "
        f"{written / 1e6:.1f} MB to {args.out}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
