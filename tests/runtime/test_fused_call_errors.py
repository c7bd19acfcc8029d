"""How a kernel's failure is summarised in runtime_fallbacks (the cause first)."""
from kitsune.runtime.fused_call import error_summary


def test_a_long_compiler_message_leads_with_its_last_line():
    message = "at 8:9:\ndef kernel(in0, out0):\n    x = tl.arange(0, 4)\n    v1 = tl.full([], 1, tl.int64)\n\nIncompatibleTypeErrorImpl('invalid operands')"
    summary = error_summary(RuntimeError(message))
    assert summary.startswith("IncompatibleTypeErrorImpl('invalid operands')") and "at 8:9:" in summary


def test_a_short_message_stays_whole():
    assert error_summary(ValueError("bad\nthing")) == "bad thing"
    assert error_summary(ValueError("one line")) == "one line"
