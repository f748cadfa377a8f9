"""What every command line of the project shares: one-line argument errors.

Argparse prints its usage before an error; the project's rule is one line that names
the problem, `prog: error: ...`, and exit code 2. Importing this imports no TensorFlow,
so a bad argument fails before anything slow starts.
"""

from __future__ import annotations

import argparse


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line (`prog: error: ... (see --help)`,
    exit 2) and whose description keeps its own line breaks."""

    def __init__(self, **kwargs):
        kwargs.setdefault("formatter_class", argparse.RawDescriptionHelpFormatter)
        super().__init__(**kwargs)

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")
