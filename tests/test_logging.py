"""Logging conventions (kitsune._logging): a NullHandler on the "kitsune" logger,
KITSUNE_LOG adds a handler only while the application configured none, and
records always propagate to the application's handlers in its format."""
import logging
import os
import subprocess
import sys

import pytest

from kitsune import _logging


@pytest.fixture
def kitsune_logger():
    """The "kitsune" logger, restored to what it was after the test."""
    logger = logging.getLogger("kitsune")
    saved = (logger.level, list(logger.handlers), logger.propagate)
    yield logger
    logger.setLevel(saved[0])
    logger.handlers[:] = saved[1]
    logger.propagate = saved[2]


def test_import_adds_only_a_null_handler():
    import kitsune  # noqa: F401
    logger = logging.getLogger("kitsune")
    assert any(isinstance(h, logging.NullHandler) for h in logger.handlers)
    assert logger.propagate


def test_kitsune_log_sets_the_level_and_keeps_propagation(kitsune_logger, caplog, capsys):
    _logging.setup({"KITSUNE_LOG": "info"})
    _logging.setup({"KITSUNE_LOG": "INFO"})  # idempotent
    assert kitsune_logger.level == logging.INFO and kitsune_logger.propagate
    assert sum(isinstance(h, _logging.FallbackHandler) for h in kitsune_logger.handlers) == 1
    assert sum(isinstance(h, logging.NullHandler) for h in kitsune_logger.handlers) == 1
    # pytest's capture handler sits on the root logger: the application's handler gets
    # the record, and Kitsune's own handler writes nothing
    kitsune_logger.info("fused 3 ops")
    kitsune_logger.debug("not shown at INFO")
    assert [(r.name, r.levelname, r.getMessage()) for r in caplog.records] == [("kitsune", "INFO", "fused 3 ops")]
    assert capsys.readouterr().err == ""


def test_fallback_handler_writes_only_while_nothing_is_configured(kitsune_logger, capsys, monkeypatch):
    _logging.setup({"KITSUNE_LOG": "debug"})
    root = logging.getLogger()
    monkeypatch.setattr(root, "handlers", [])  # an application that configured nothing
    kitsune_logger.debug("fused 3 ops")
    assert capsys.readouterr().err == "kitsune DEBUG: fused 3 ops\n"  # the name once, then the message
    mine = logging.StreamHandler(sys.stderr)
    mine.setFormatter(logging.Formatter("APP %(levelname)s %(message)s"))
    monkeypatch.setattr(root, "handlers", [mine])  # basicConfig after importing kitsune
    kitsune_logger.debug("fused 4 ops")
    assert capsys.readouterr().err == "APP DEBUG fused 4 ops\n"


def test_bad_kitsune_log_value_warns_and_changes_nothing(kitsune_logger):
    level = kitsune_logger.level
    with pytest.warns(UserWarning, match="KITSUNE_LOG='loud'.*debug, info, warning"):
        _logging.setup({"KITSUNE_LOG": "loud"})
    assert kitsune_logger.level == level
    assert not any(isinstance(h, _logging.FallbackHandler) for h in kitsune_logger.handlers)


BASIC_CONFIG_SCRIPT = """
import logging, kitsune
logging.basicConfig(format="APP|%(name)s|%(levelname)s|%(message)s")
logging.getLogger("kitsune").info("hello")
logging.getLogger("kitsune").warning("careful")
"""


@pytest.mark.parametrize("level", ["", "info"])
def test_users_basic_config_gets_the_records(level):
    """A fresh process: basicConfig after importing kitsune; KITSUNE_LOG never bypasses it."""
    env = dict(os.environ, KITSUNE_LOG=level)
    result = subprocess.run([sys.executable, "-c", BASIC_CONFIG_SCRIPT], capture_output=True, text=True, env=env,
                            timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    expected = (["APP|kitsune|INFO|hello"] if level else []) + ["APP|kitsune|WARNING|careful"]
    assert result.stderr.splitlines() == expected
