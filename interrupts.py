"""Ctrl-C and SIGTERM end a run with one line, even while PyTorch is still importing (which takes
seconds): the scripts import this module first."""

import os
import signal
import sys
from pathlib import Path


class Terminated(BaseException):
    """SIGTERM, handled like Ctrl-C."""


def stop_while_starting(signum, frame):
    """Leave at once: nothing is written yet, and unwinding a half-done import can itself fail."""
    print(f"{Path(sys.argv[0]).name}: interrupted while starting; nothing was written", file=sys.stderr, flush=True)
    os._exit(128 + signum)


def raise_terminated(signum, frame):
    raise Terminated


signal.signal(signal.SIGINT, stop_while_starting)
signal.signal(signal.SIGTERM, stop_while_starting)
