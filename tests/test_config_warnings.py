"""FusionConfig fields that are accepted but not acted on yet say so."""
import warnings

import pytest

from kitsune.config import FusionConfig


def test_enable_matmul_warns_once(monkeypatch):
    import kitsune.config
    monkeypatch.setattr(kitsune.config, "_matmul_warned", False)
    with pytest.warns(UserWarning, match=r"FusionConfig.enable_matmul=True: matmul fusion is not generated yet"):
        FusionConfig(enable_matmul=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        FusionConfig(enable_matmul=True)  # once per process
        FusionConfig()
