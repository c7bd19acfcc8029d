"""Test-wide settings: generated Triton kernels run in Triton's interpreter on
the CPU (CI has no GPU), and compiled artefacts go to a fresh cache directory
so that tests never depend on what an earlier run left behind."""
import os
import tempfile

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("KITSUNE_CACHE_DIR", tempfile.mkdtemp(prefix="kitsune-test-cache-"))

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()
