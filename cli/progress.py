"""Progress as a run shows it: a tqdm bar on a terminal, one log line per item elsewhere (a pipe,
a log file), nothing with --quiet."""

import logging
import sys
import time

log = logging.getLogger("pruning")


def progress(iterable, desc, unit):
    """iterable, shown as it is consumed: a bar named desc counting units, or a line per item."""
    if not log.isEnabledFor(logging.INFO):
        return iterable
    if sys.stderr.isatty():
        from tqdm import tqdm
        return tqdm(iterable, desc=desc, leave=False, unit=unit)
    return progress_lines(list(iterable), desc, unit)


def progress_lines(items, desc, unit):
    start = time.perf_counter()
    for i, item in enumerate(items, 1):
        yield item
        log.info(f"{desc}: {unit} {i}/{len(items)} done ({time.perf_counter() - start:.1f} s)")
