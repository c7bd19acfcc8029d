"""The HTML report on a model of repeated identical blocks: kernels of one
structure shown once (×4) without losing any kernel name, repeated blocks drawn
once, reasons counted, the filter box, well-formed markup; and records whose
sizes and estimates are symbolic (SymInt, SymFloat, sympy)."""
import re
import shutil
import subprocess
from html.parser import HTMLParser

import pytest
import sympy
import torch
from torch import nn

from kitsune.fusion import FusionEngine
from kitsune.report import html as report_html
from kitsune.report.repeats import plain_number, reason_template, tandem_repeats

BLOCKS = 4


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(16, 16)
        self.norm = nn.LayerNorm(16)

    def forward(self, x):
        return self.norm(torch.relu(self.fc(x)) * 0.5)


@pytest.fixture(scope="module")
def engine():
    mp = pytest.MonkeyPatch()
    mp.setenv("KITSUNE_BACKEND", "reference")
    try:
        torch._dynamo.reset()
        torch.manual_seed(0)
        model = nn.Sequential(*[Block() for _ in range(BLOCKS)]).eval()
        engine = FusionEngine()
        x = torch.randn(3, 16)
        with torch.no_grad():
            torch.testing.assert_close(engine.fuse(model)(x), model(x))
        yield engine
    finally:
        mp.undo()


@pytest.fixture(scope="module")
def page(engine, tmp_path_factory):
    return engine.report(tmp_path_factory.mktemp("report") / "report.html").read_text()


class _Checker(HTMLParser):
    """Every element closed, in order (void elements and SVG's self-closed ones aside)."""
    VOID = {"meta", "input", "br", "img", "link", "hr", "wbr"}

    def __init__(self):
        super().__init__()
        self.stack, self.errors, self.counts = [], [], {}

    def handle_starttag(self, tag, attrs):
        self.counts[tag] = self.counts.get(tag, 0) + 1
        if tag not in self.VOID:
            self.stack.append(tag)

    def handle_endtag(self, tag):
        if not self.stack or self.stack[-1] != tag:
            self.errors.append(f"</{tag}> closes {self.stack[-1:]} at {self.getpos()}")
        else:
            self.stack.pop()


def _check_markup(page: str) -> _Checker:
    checker = _Checker()
    checker.feed(page)
    checker.close()
    assert not checker.errors, checker.errors[:5]
    assert checker.stack == [], checker.stack
    return checker


def test_kernels_of_one_structure_show_once_with_their_count(engine, page):
    kernels = [k for r in engine.records for k, _, _ in r.groups]
    assert len(kernels) == BLOCKS  # one kernel per block: bias, relu, scale and LayerNorm
    assert re.search(rf'<span class="times">×{BLOCKS}</span>', page)
    assert page.count('<tbody class="grp"') == 1  # one row for the four kernels
    assert f"{BLOCKS} instances" in page
    for kernel in kernels:  # nothing lost: each kernel keeps its row id and its name
        assert kernel in page
    for kernel_id in range(BLOCKS):
        assert f'id="row-g{kernel_id}"' in page


def test_repeated_blocks_are_drawn_once(engine, page):
    svg = page[page.index("<svg", page.index("Graph: ")):]
    svg = svg[:svg.index("</svg>")]
    drawn = svg.count('<g id="n0-')
    (record,) = engine.records
    visible = [n for n in record.graph.nodes if report_html._visible(n)]
    assert drawn < len(visible) / 2, (drawn, len(visible))
    assert f">×{BLOCKS}</text>" in svg and f"{BLOCKS - 1} more identical blocks" in svg
    for kernel, names, _ in record.groups:  # a hidden node is still found by name (showNode)
        assert f'id="n0-{names[0]}"' in svg or re.search(rf'data-nodes="[^"]*\b{names[0]}\b', svg)


def test_reasons_are_counted_not_repeated(engine, page):
    section = page[page.index("<h2>Why not fused"):page.index("<h2>Graph")]
    (record,) = engine.records
    refused = [d for d in record.decisions if not d.fused]
    rows = section.count("<tr data-row")
    assert refused and rows < len(refused)
    assert f"<span class=times>×{BLOCKS}</span>" in section  # e.g. each block's mm is opaque


def test_page_has_the_filter_and_is_well_formed(page):
    assert '<input id="kq" type="search"' in page and "function applyFilter()" in page
    for status in ("fused", "not-fused", "fallback"):
        assert f'data-status="{status}"' in page
    checker = _check_markup(page)
    assert checker.counts["details"] >= 3
    assert not re.search(r"(src|href)\s*=\s*[\"']?(https?:)?//", page)  # works offline


def test_source_sits_in_a_full_width_row(page):
    (row,) = re.findall(r'<tr class="srcrow">.*?</tr>', page, re.S)
    assert 'colspan="9"' in row and "<details><summary>show source" in row and "<pre>" in row
    assert f"the same for all {BLOCKS} up to the name" in row


def test_filter_and_group_links_run_in_headless_chromium(engine, page, tmp_path):
    browser = next((p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None)
    if browser is None:
        pytest.skip("no Chromium here (tests/fusion/test_explain_report.py installs one on CI)")
    path = tmp_path / "clicked.html"  # a search that matches nothing, then a click on the last block's kernel
    path.write_text(page.replace("<script>applyFilter()</script>", "<script>document.getElementById('kq').value="
                                 f"'matches-nothing';applyFilter();showGroup('g{BLOCKS - 1}')</script>"))
    result = subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=2000",
                             "--dump-dom", path.as_uri()], capture_output=True, text=True, timeout=120)
    dom = result.stdout
    assert re.search(r'id="kcount"[^>]*>0 of \d+ rows shown<', dom), result.stderr[-2000:]
    assert re.search(r'<tbody class="grp"[^>]*style="display: none;"', dom)
    assert re.search(rf'<li id="row-g{BLOCKS - 1}" class="hl">', dom)  # its instance, highlighted
    assert re.search(rf'<details open="">\s*<summary>{BLOCKS} instances', dom)  # and the list holding it, opened


def test_symbolic_sizes_and_estimates_are_shown(engine, monkeypatch):
    from types import SimpleNamespace

    from torch._dynamo.source import ConstantSource
    from torch.fx.experimental.symbolic_shapes import ShapeEnv

    env = ShapeEnv()
    s0 = env.create_symintnode(env.create_symbol(7, source=ConstantSource("s0")), hint=7)
    speedup, seconds = s0 * 1.5, s0 * 1e-6  # SymFloats: format(x, ".2f") raises on them
    symbol = sympy.Symbol("s1") * 4  # no value at all: shown as written
    (record,) = engine.records
    real = report_html.graph_estimates(record)
    groups = [dict(g, unfused_seconds=seconds, fused_seconds=s0 * 5e-7,
                   measured={"unfused_s": seconds, "fused_s": s0 * 5e-7, "speedup": s0 / 3.5}) for g in real["groups"]]
    estimate = SimpleNamespace(seconds=seconds, bytes=s0)
    monkeypatch.setattr(report_html, "graph_estimates",
                        lambda r: {"before": estimate, "after": estimate, "groups": groups})
    summary = dict(report_html.summarize([record]), estimated_speedup=speedup, efficiency=symbol,
                   bytes_before=s0, bytes_after="s0*2")
    monkeypatch.setattr(report_html, "summarize", lambda records: summary)
    saved = [(o, o.estimated_speedup, o.bytes_saved) for o in record.opportunities]
    try:
        for o in record.opportunities:
            o.estimated_speedup, o.bytes_saved = speedup, symbol
        page = report_html.render([record])
    finally:
        for o, was_speedup, was_bytes in saved:
            o.estimated_speedup, o.bytes_saved = was_speedup, was_bytes
    _check_markup(page)
    assert "10.50x" in page  # SymFloat hints, formatted: 7 * 1.5
    assert "7.0 µs → 3.5 µs" in page and "2.00x (" in page  # per kernel, and measured over the four
    assert "4*s1" in page  # a bare symbol, as it is
    assert not env.guards  # reading a hint adds no guard


def test_plain_number_takes_hints_and_never_guards():
    from torch._dynamo.source import ConstantSource
    from torch.fx.experimental.symbolic_shapes import ShapeEnv

    env = ShapeEnv()
    s0 = env.create_symintnode(env.create_symbol(7, source=ConstantSource("s0")), hint=7)
    assert plain_number(s0) == 7 and plain_number(s0 / 2) == 3.5
    assert plain_number(env.create_unbacked_symint()) is None
    assert plain_number(sympy.Integer(3)) == 3 and plain_number(sympy.Symbol("s1")) is None
    assert plain_number("2.5") == 2.5 and plain_number("s0") is None and plain_number(True) == 1
    assert not env.guards
    assert report_html._fmt(s0 / 2, ".2f", "x") == "3.50x"
    assert report_html._fmt(sympy.Symbol("s1"), ".2f", "x") == "s1"
    assert report_html._fmt_time(sympy.Symbol("t")) == "t"


def test_tandem_repeats_and_reason_templates():
    assert tandem_repeats("xABCDABCDABCDy") == [(1, 4, 3)]
    assert tandem_repeats("ABCABC", min_period=4) == [] and tandem_repeats("ABCDABCD", max_period=3) == []
    assert tandem_repeats("abcdabcdQQQQQwxyzwxyz") == [(0, 4, 2), (13, 4, 2)]
    names = {"add_7": "add", "mm_3": "mm", "mm": "mm"}
    assert reason_template("add_7: mm_3 is opaque", names) == reason_template("add_7: mm is opaque", names) \
        == "add: mm is opaque"


def test_report_after_a_dynamic_compile(monkeypatch, tmp_path):
    monkeypatch.setenv("KITSUNE_BACKEND", "reference")
    model, engine = Block().eval(), FusionEngine()
    compiled = engine.fuse(model, dynamic=True)
    with torch.no_grad():
        for batch in (3, 5):
            x = torch.randn(batch, 16)
            torch.testing.assert_close(compiled(x), model(x))
    page = engine.report(tmp_path / "dynamic.html").read_text()
    _check_markup(page)
    assert "<svg" in page and "Graph: " in page
    assert all(k in page for r in engine.records for k, _, _ in r.groups)
