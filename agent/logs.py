"""Logging for the daemon and its children: structlog, key=value lines on stderr."""

from __future__ import annotations

import logging
import sys
from types import ModuleType


def import_structlog_without_rich() -> ModuleType:
    """structlog.dev imports rich (6 MiB resident) for a console renderer the daemon never
    uses (it logs key=value lines). Hide rich while structlog loads; typer still finds it
    later for --help."""
    if "structlog" in sys.modules:
        return sys.modules["structlog"]
    saved = sys.modules.get("rich")
    sys.modules["rich"] = None  # type: ignore[assignment]
    try:
        import structlog as module
    finally:
        if saved is None:
            del sys.modules["rich"]
        else:
            sys.modules["rich"] = saved
    return module


def configure_logging(level: str = "info") -> None:
    """key=value lines on stderr (journald adds its own timestamp; files need ours)."""
    structlog = import_structlog_without_rich()
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            structlog.processors.KeyValueRenderer(
                key_order=["timestamp", "level", "event"], drop_missing=True
            ),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(
            getattr(logging, level.upper(), logging.INFO)
        ),
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
        cache_logger_on_first_use=True,
    )
