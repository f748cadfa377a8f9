"""`--help` says the defaults a user needs and shows its examples as they are typed."""

import subprocess
import sys

import pytest
from conftest import REPO


def _help(*command):
    result = subprocess.run([sys.executable, *command, "--help"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    return " ".join(result.stdout.split())  # argparse wraps lines where it likes


@pytest.mark.parametrize("command, shown", [
    (["export.py"], "--export-dir EXPORT_DIR TF Serving model base path (default: exports/simsiam)"),
    (["-m", "simsiam_tf.data_service", "dispatcher"], "--port PORT port to serve on (default 5050)"),
    (["-m", "simsiam_tf.data_service", "worker"], "--port PORT port to serve on (default 5051; 0: any free port)"),
    (["-m", "simsiam_tf.data_service", "worker"], "seconds to wait for the dispatcher at start (default 60)"),
    # N is taken first and the validation split comes out of it: fewer than N train.
    (["train.py"], "--train-limit N use a fixed random subset of N images of the training split (0 = all). "
                   "--val-fraction of them (per class, rounded) is then held out for validation"),
    (["train.py"], "so fewer than N train; the start line prints how many"),
    (["evaluate.py"], "On the run's own dataset its validation part is held out of the N"),
])
def test_help_names_the_defaults(command, shown):
    assert shown in _help(*command)


def test_a_continued_example_line_keeps_its_backslash():
    # A backslash-newline inside a docstring joins the lines; the example must show it.
    text = subprocess.run([sys.executable, "-m", "serving.similar", "--help"], cwd=REPO, capture_output=True,
                          text=True, timeout=120).stdout
    assert "--root photos \\\n        --query cat.jpg dogs/" in text
