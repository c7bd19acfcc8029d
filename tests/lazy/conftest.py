"""Every lazy test starts and ends with empty lazy caches and counters, on the reference
backend unless it says otherwise."""
import pytest

from kitsune.lazy import reset_lazy_stats


@pytest.fixture(autouse=True)
def _fresh(monkeypatch):
    monkeypatch.setenv("KITSUNE_BACKEND", "reference")
    reset_lazy_stats(clear_cache=True)
    yield
    reset_lazy_stats(clear_cache=True)
