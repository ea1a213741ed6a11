"""What every benchmark script does first: log to stderr, and pin torch's thread count.

Importing it also makes the run offline (no hub lookups) and the repository importable, so a
script that imports it first needs no set-up of its own.
"""
from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
for _name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
    os.environ.setdefault(_name, "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def start_run(threads: int | None) -> None:
    """Structured log lines on stderr (stdout holds the tables); `threads` when given."""
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(name)s %(message)s")
    if threads:
        torch.set_num_threads(threads)
