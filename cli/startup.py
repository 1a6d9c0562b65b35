"""What must be settled before PyTorch is imported, so the scripts import this module first:
Ctrl-C and SIGTERM end a run with one line even while PyTorch imports (which takes seconds), and
OpenMP's threads spin only briefly before they sleep while they wait: as fast as the default on
an idle machine, and no crawl when another process is using the cores (measured in README.md,
Speed). Only the scripts import it: the library (pruning/) settles nothing for its users."""

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



if "torch" not in sys.modules:  # imported first, as the scripts do; else there is nothing left to settle
    if "OMP_WAIT_POLICY" not in os.environ:  # the user's choice wins
        os.environ.setdefault("GOMP_SPINCOUNT", "3000")  # GNU OpenMP, which Linux builds of PyTorch use
    signal.signal(signal.SIGINT, stop_while_starting)
    signal.signal(signal.SIGTERM, stop_while_starting)
