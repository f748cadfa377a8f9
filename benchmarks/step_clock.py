"""A Keras callback timing every training step, and the process's memory per epoch."""

from __future__ import annotations

import time

import keras


def rss_mb() -> tuple[float, float]:
    """(current RSS, peak RSS) of this process in MiB."""
    values = {}
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(("VmRSS:", "VmHWM:")):
                key, amount = line.split()[:2]
                values[key] = int(amount) / 1024
    return values["VmRSS:"], values["VmHWM:"]


class StepClock(keras.callbacks.Callback):
    """Wall time of each training step (batch begin to batch end) and RSS per epoch."""

    def __init__(self):
        super().__init__()
        self.steps, self.rss = [], []

    def on_train_batch_begin(self, batch, logs=None):
        self._t = time.perf_counter()

    def on_train_batch_end(self, batch, logs=None):
        self.steps.append(time.perf_counter() - self._t)

    def on_epoch_end(self, epoch, logs=None):
        self.rss.append(rss_mb())
