"""What every benchmark script does first: log to stderr, and pin torch's thread count."""
from __future__ import annotations

import logging
import sys

import torch


def start_run(threads: int | None) -> None:
    """Structured log lines on stderr (stdout holds the tables); `threads` when given."""
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(name)s %(message)s")
    if threads:
        torch.set_num_threads(threads)
