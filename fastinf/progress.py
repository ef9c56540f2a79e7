"""Progress bars with rate and ETA for long jobs; silenced with FASTINF_PROGRESS=0."""

from __future__ import annotations

import os
import sys
from contextlib import contextmanager

from tqdm import tqdm

__all__ = ["progress_bar"]


@contextmanager
def progress_bar(total: int, desc: str, unit: str = "img"):
    """A tqdm bar on stderr, disabled when FASTINF_PROGRESS=0 or stderr is not a terminal."""
    setting = os.environ.get("FASTINF_PROGRESS")
    enabled = setting == "1" or (setting != "0" and sys.stderr.isatty())
    with tqdm(total=total, desc=desc, unit=unit, disable=not enabled, dynamic_ncols=True) as bar:
        yield bar
