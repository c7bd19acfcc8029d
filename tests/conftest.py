"""Test-wide settings: generated Triton kernels run in Triton's interpreter on
the CPU (CI has no GPU), compiled artefacts go to a fresh cache directory so
that tests never depend on what an earlier run left behind (and compiled graphs
are not reused, KITSUNE_GRAPH_CACHE=0), and Hypothesis
draws a fixed set of examples unless KITSUNE_HYPOTHESIS=explore."""
import os
import tempfile

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("KITSUNE_CACHE_DIR", tempfile.mkdtemp(prefix="kitsune-test-cache-"))
# Compiled graphs are not reused between tests (a test that swaps a compiler stage for a
# failing one would otherwise get an earlier test's compile); the graph cache's own tests
# turn it on (tests/runtime/test_graph_cache.py).
os.environ.setdefault("KITSUNE_GRAPH_CACHE", "0")

import pytest  # noqa: E402
import torch  # noqa: E402
from hypothesis import settings  # noqa: E402

# Hypothesis draws the same examples on every run unless asked to explore: a
# test suite that passes once passes on CI (whose red means nothing lands).
# KITSUNE_HYPOTHESIS=explore draws fresh examples (and more of them, where a
# test does not fix the count): what finds new bugs, run it when changing the
# planner or a code generator.
settings.register_profile("fixed", derandomize=True, database=None)
settings.register_profile("explore", derandomize=False, max_examples=300)
settings.load_profile(os.environ.get("KITSUNE_HYPOTHESIS", "fixed"))

# torchvision from PyPI is a CUDA build whose C++ ops do not load on CI's CPU torch;
# its import (which transformers also attempts) then fails unless two schemas exist
# (kitsune._compat.import_torchvision). Loaded once, before any test imports it.
try:
    from kitsune._compat import import_torchvision
    import_torchvision()
except ImportError:
    pass


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()
