"""bench/adapter.py's table: a row without neighbours (`--no-locality`) shows "-" and the heading
says they were not measured; a measured row keeps its figure."""

from __future__ import annotations

import argparse

from conftest import load_bench_script

from contract.settings import DEFAULTS

adapter = load_bench_script("adapter")


def _row(locality: float | None, efficacy: float) -> dict:
    return {"efficacy": efficacy, "generalization": 0.1, "locality": locality,
            "ppl_change_pct": 1.5, "kl": 0.02}  # fmt: skip


def test_a_table_without_neighbours_says_so(tmp_path):
    args = argparse.Namespace(start=0, run=None, chat_template="off", tokens=2048,
                              no_locality=True)  # fmt: skip
    ranked = {**_row(None, 0.5), "ranks": [8, 8], "error": 0.4}
    results = [("full delta", None, _row(None, 1.0)), ("rank 8", 8, ranked)]
    out = tmp_path / "adapter.md"
    adapter.write(out, args, DEFAULTS, results, 12.0, 2)
    text = out.read_text()
    assert "neighbours not measured (`--no-locality`)" in text
    assert "| full delta | - | - | - | 1.00 | 1.000 | 0.10 | - | +1.50 % | 0.0200 |" in text
    assert "| rank 8 | 8 | 8,8 | 0.400 | 0.50 | 0.500 | 0.10 | - | +1.50 % | 0.0200 |" in text

    args.no_locality = False
    results = [("full delta", None, _row(0.25, 1.0))]
    adapter.write(out, args, DEFAULTS, results, 12.0, 2)
    text = out.read_text()
    assert "not measured" not in text and "| 0.250 |" in text
