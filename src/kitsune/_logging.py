"""Kitsune's logging setup, following the `logging` conventions for libraries.

Kitsune logs to the "kitsune" logger and, like any library, adds only a
`logging.NullHandler` to it: what is shown, where and in which format is the
application's choice (`logging.basicConfig(...)`, or handlers of its own).

`KITSUNE_LOG=<level>` (debug, info, warning, error, critical; any case) is the
one way to ask Kitsune for output from the environment. It sets the "kitsune"
logger's level and never stops its records from propagating:

- if the application configured logging (the root logger has a handler, e.g.
  from `logging.basicConfig`, set up before or after importing kitsune),
  Kitsune's records go there, in the application's format;
- only while nothing is configured does Kitsune's own handler write them to
  stderr, as ``kitsune INFO: <message>``.

Without `KITSUNE_LOG` the "kitsune" logger keeps the level and handlers the
application gives it (`logging.getLogger("kitsune").setLevel(logging.INFO)`
with a configured root logger shows each fusion).
"""
from __future__ import annotations

import logging
import os
import sys
import warnings

LOGGER_NAME = "kitsune"
ENV_VAR = "KITSUNE_LOG"
LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
FORMAT = "%(name)s %(levelname)s: %(message)s"


class FallbackHandler(logging.Handler):
    """Writes Kitsune's records to the current `sys.stderr`, only while no other
    handler would get them (none on the "kitsune" logger or the root logger):
    once the application configures logging, the records reach its handlers by
    propagation and this handler stays silent (no record is shown twice)."""

    def __init__(self):
        super().__init__()
        self.setFormatter(logging.Formatter(FORMAT))

    def emit(self, record: logging.LogRecord) -> None:
        if _configured(logging.getLogger(record.name)):
            return
        try:
            sys.stderr.write(self.format(record) + "\n")
        except Exception:  # noqa: BLE001 - logging must never break the program
            self.handleError(record)


def _configured(logger: logging.Logger) -> bool:
    """Whether a handler of the application's sits on `logger` or on a logger its
    records propagate to (Kitsune's NullHandler and FallbackHandler do not count)."""
    current = logger
    while current is not None:
        if any(not isinstance(h, (logging.NullHandler, FallbackHandler)) for h in current.handlers):
            return True
        current = current.parent if current.propagate else None
    return False


def setup(environ=None) -> logging.Logger:
    """The "kitsune" logger with its NullHandler, and `KITSUNE_LOG` applied (see
    the module docstring). Idempotent: a second call adds no second handler."""
    environ = os.environ if environ is None else environ
    logger = logging.getLogger(LOGGER_NAME)
    if not any(isinstance(h, logging.NullHandler) for h in logger.handlers):
        logger.addHandler(logging.NullHandler())
    value = environ.get(ENV_VAR, "").strip()
    if not value:
        return logger
    level = value.upper()
    if level not in LEVELS:
        warnings.warn(f"{ENV_VAR}={value!r} is not a logging level; use one of "
                      f"{', '.join(name.lower() for name in LEVELS)}", UserWarning, stacklevel=2)
        return logger
    logger.setLevel(level)
    if not any(isinstance(h, FallbackHandler) for h in logger.handlers):
        logger.addHandler(FallbackHandler())
    return logger
