"""Progress and messages go through `logging` (module loggers under "warpkit"); entry points call this once."""

from __future__ import annotations

import logging
import sys

__all__ = ["setup_logging"]


def setup_logging(level: int = logging.INFO) -> None:
    """Show warpkit's INFO messages on stderr as `warpkit: <message>`, once; other libraries are left alone."""
    logger = logging.getLogger("warpkit")
    logger.setLevel(level)
    if not any(getattr(h, "_warpkit", False) for h in logger.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("warpkit: %(message)s"))
        handler._warpkit = True  # type: ignore[attr-defined]
        logger.addHandler(handler)
