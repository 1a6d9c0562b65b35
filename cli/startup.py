"""What must be settled before PyTorch is imported, so the scripts import this module first:
Ctrl-C and SIGTERM end a run with one line even while PyTorch imports (which takes seconds), and
OpenMP's threads spin only briefly before they sleep while they wait: as fast as the default on
an idle machine, and no crawl when another process is using the cores (measured in README.md,
Speed). Only the scripts import it: the library (pruning/) settles nothing for its users."""

import contextlib
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


def ignore_signals():
    """A second Ctrl-C or SIGTERM while the first is being handled changes nothing."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def interrupt(signum, frame):
    """The first signal unwinds the run (its temporary files are removed); any later one is ignored."""
    ignore_signals()
    raise KeyboardInterrupt if signum == signal.SIGINT else Terminated


@contextlib.contextmanager
def signals_deferred():
    """Ctrl-C or SIGTERM inside the block (an ONNX export, which cannot be unwound cleanly: it
    leaves the exporter half set up) takes effect when the block ends."""
    received = []
    handlers = {s: signal.signal(s, lambda signum, frame: received.append(signum))
                for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, handler in handlers.items():
            signal.signal(s, handler)
    if received:
        interrupt(received[0], None)


if "torch" not in sys.modules:  # imported first, as the scripts do; else there is nothing left to settle
    if "OMP_WAIT_POLICY" not in os.environ:  # the user's choice wins
        os.environ.setdefault("GOMP_SPINCOUNT", "3000")  # GNU OpenMP, which Linux builds of PyTorch use
    signal.signal(signal.SIGINT, stop_while_starting)
    signal.signal(signal.SIGTERM, stop_while_starting)
