"""The ways a run can stop that a user acts on, one exception each, with train.py's
exit code. The message of each names the problem and the command that fixes it.

No imports: every module may raise these, the lowest ones included.
"""


class UsageError(Exception):
    """Bad input from the user: the message names the problem and the fix (exit code 2)."""


class TrainingDiverged(Exception):
    """The loss became NaN or infinite; training stopped, the last good checkpoint kept (exit 3)."""


class OutOfMemory(Exception):
    """Training ran out of memory; the message names a smaller --batch-size (exit 4)."""


class InputShortfall(Exception):
    """The input ended before the run had all its steps; `--resume` continues (exit 75)."""
