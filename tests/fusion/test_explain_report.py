"""explain() text, the HTML report (rendered in headless Chromium where one is
installed) and `python -m kitsune explain|report`."""
import html
import io
import os
import re
import shutil
import subprocess
import textwrap

import pytest
import torch

from kitsune.cli import main as cli_main
from kitsune.fusion import FusionEngine


@pytest.fixture(autouse=True)
def reference_backend(monkeypatch):
    monkeypatch.setenv("KITSUNE_BACKEND", "reference")


def _mm_relu_scale(a, w):
    return torch.relu(a @ w) * 2


@pytest.fixture
def engine():
    engine = FusionEngine()
    a, w = torch.randn(4, 8), torch.randn(8, 8)
    torch.testing.assert_close(engine.fuse(_mm_relu_scale)(a, w), _mm_relu_scale(a, w))
    return engine


def test_explain_before_compiling_says_so():
    assert "nothing compiled yet" in FusionEngine().explanation()


def test_explain_on_a_known_graph(engine):
    text = engine.explanation()
    lines = text.splitlines()
    assert lines[0].startswith("Kitsune fusion report: 1 graph(s) (inference)")
    assert "Kernels: eager PyTorch ≈ 3 | captured aten ops 3 | Kitsune 2 (1 fused kernel)" in text
    table = {line.split()[0]: line.split()[1:] for line in lines if line.startswith("  ") and
             line.split()[0] in ("linear_activation", "elementwise_chain")}
    assert table == {"linear_activation": ["1", "1", "0", "0", "0"], "elementwise_chain": ["1", "1", "0", "0", "0"]}
    (fused,) = [line for line in lines if "kitsune_pointwise" in line and "ops," in line]
    assert "relu → mul: 2 ops" in fused and "[elementwise_chain, linear_activation]" in fused
    # the matmul by the library, the rest in one kernel: applied, and said how
    assert any("linear_activation: matmul → relu → CPU BLAS matmul + its epilogue in one generated kernel" in line
               for line in lines)
    assert any("mm (matmul) [PyTorch]" in line for line in lines if "%" in line)
    out = io.StringIO()
    engine.explain(file=out)
    assert out.getvalue().strip() == text.strip()


def test_report_is_self_contained_and_shows_the_groups(engine, tmp_path):
    path = engine.report(tmp_path / "report.html")
    page = path.read_text()
    (kernel,) = [k for rec in engine.records for k, _, _ in rec.groups]
    assert page.count(kernel) >= 3  # graph box, groups table, opportunities
    assert "<svg" in page and "show source" in page
    assert "load(in0)" in page  # the reference backend has no source text: the spec is rendered
    assert 'class="applied"' in page and "CPU BLAS matmul + its epilogue in one generated kernel" in page
    assert not re.search(r"(src|href)\s*=\s*[\"']?(https?:)?//", page)
    assert "<link" not in page and "@import" not in page
    assert page.rstrip().endswith("</html>")


def test_report_holds_generated_source(monkeypatch, tmp_path):
    monkeypatch.setenv("KITSUNE_BACKEND", "cpu")
    engine = FusionEngine()
    x = torch.randn(16)
    try:
        engine.fuse(lambda a: torch.sigmoid(a) * a + 1)(x)
    except Exception as error:  # noqa: BLE001
        pytest.skip(f"CPU backend unavailable here: {error}")
    calls = [c for rec in engine.records for c in rec.kernel_calls.values() if c.kernel is not None]
    if not calls:
        pytest.skip("CPU backend built no kernel here (no C compiler?)")
    page = engine.report(tmp_path / "r.html").read_text()
    from kitsune.codegen.cpu import kernel_name
    name = kernel_name(calls[0].spec)
    signature = next(line for line in calls[0].kernel.source.splitlines() if name + "(" in line)
    assert html.escape(signature) in page


_BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


def _find_browser():
    return next((path for path in map(shutil.which, _BROWSERS) if path), None)


def _browser() -> tuple[str | None, str]:
    """A headless-capable Chromium, installed from the system packages when
    this runs as root with apt (a fresh CI machine) and none is there
    (KITSUNE_NO_BROWSER_INSTALL=1 turns that off); else (None, why)."""
    found = _find_browser()
    if found or os.environ.get("KITSUNE_NO_BROWSER_INSTALL"):
        return found, "KITSUNE_NO_BROWSER_INSTALL is set"
    if not shutil.which("apt-get") or not hasattr(os, "geteuid") or os.geteuid() != 0:
        return None, "no apt-get, or not root: cannot install Chromium from the system packages"
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    why = ""
    for command in (["apt-get", "install", "-y", "-q", "--no-install-recommends", "chromium"],
                    ["apt-get", "update", "-q"],
                    ["apt-get", "install", "-y", "-q", "--no-install-recommends", "chromium"]):
        try:
            result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
            why = (result.stderr or result.stdout).strip().splitlines()[-1:] or [""]
            why = f"{' '.join(command)}: exit {result.returncode}: {why[0]}"
        except (OSError, subprocess.TimeoutExpired) as error:
            why = f"{' '.join(command)}: {error}"
        found = _find_browser()
        if found:
            return found, ""
    return None, why


def test_report_renders_in_headless_chromium(engine, tmp_path):
    browser, why = _browser()
    if browser is None:
        pytest.skip(f"no Chromium to render the HTML report, and none could be installed ({why})")
    path = engine.report(tmp_path / "report.html")
    result = subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--enable-logging=stderr",
                             "--v=0", "--virtual-time-budget=2000", "--dump-dom", path.as_uri()],
                            capture_output=True, text=True, timeout=120)
    dom = result.stdout
    (kernel,) = [k for rec in engine.records for k, _, _ in rec.groups]
    assert "<svg" in dom and kernel in dom, result.stderr[-2000:]
    assert 'id="row-g0"' in dom  # the groups table, with the row a click on a group opens
    assert "Uncaught" not in result.stderr


SCRIPT = textwrap.dedent("""
    import torch
    from torch import nn

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(8, 8)

        def forward(self, x):
            return torch.relu(self.fc(x)) * 0.5

    model = Block()
    example_inputs = (torch.randn(4, 8),)

    def make():
        return Block(), torch.randn(2, 8, requires_grad=True)

    if __name__ == "__main__":
        raise SystemExit("the CLI must not run the script's main block")
""")


def test_cli_explain_and_report(tmp_path, capsys):
    script = tmp_path / "script.py"
    script.write_text(SCRIPT)
    html = tmp_path / "out.html"
    assert cli_main(["explain", f"{script}:model", "--report", str(html)]) == 0
    out = capsys.readouterr().out
    assert "Kitsune fusion report: 1 graph(s) (inference)" in out and "linear_activation" in out
    assert html.exists() and "<svg" in html.read_text()
    assert cli_main(["report", f"{script}:make", "--backward", "-o", str(tmp_path / "r.html")]) == 0
    assert "(forward, backward)" in capsys.readouterr().out
    assert cli_main(["explain", f"{script}:model", "--profile"]) == 0
    assert "Measured on first inputs (1 kernels: " in capsys.readouterr().out
    assert cli_main(["explain", f"{script}:missing"]) == 2
    assert "defines no 'missing'" in capsys.readouterr().err
    assert cli_main(["explain", f"{tmp_path / 'nope.py'}:model"]) == 2


def test_report_draws_each_group_contiguously():
    from kitsune.report.html import _order, _visible

    def f(a, b):
        e = a.exp()
        m = b @ b  # runs through PyTorch, between the group's members in graph order
        return e.t() * 2 + m

    engine = FusionEngine()
    a, b = torch.randn(4, 4), torch.randn(4, 4)
    torch.testing.assert_close(engine.fuse(f)(a, b), f(a, b))
    (record,) = engine.records
    group_of = {n: k for k, names, _ in record.groups for n in names}
    assert any({"exp", "mul"} <= set(names) for _, names, _ in record.groups)
    order = [n.name for n in _order(record, group_of) if _visible(n)]
    assert order != [n.name for n in record.graph.nodes if _visible(n)]
    for kernel, names, _ in record.groups:
        rows = sorted(order.index(n) for n in names if n in order)
        assert rows == list(range(rows[0], rows[0] + len(rows))), (kernel, order)
