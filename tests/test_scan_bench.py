"""``benchmarks/bench_scan.py`` prints its table and leaves docs/benchmarks.md alone unless ``--write-docs``
is given (the timing itself is stubbed: this checks the script's behaviour, not the machine)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "bench_scan.py"


@pytest.fixture
def bench(monkeypatch):
    spec = importlib.util.spec_from_file_location("bench_scan_under_test", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.setattr(module, "time_case", lambda name, l, bwd, repeats: (0.002 if bwd else 0.001, repeats))
    monkeypatch.setattr(module, "machine_limit", lambda repeats: 10.0)
    monkeypatch.setattr(module, "interleaved_limit", lambda l, threads, repeats: [])
    monkeypatch.setattr(module, "unavailable", lambda name: None)
    writes = []
    monkeypatch.setattr(module, "write_section", lambda path, table: writes.append((path, table)))
    return module, writes


ARGS = ["--lengths", "64", "--impls", "ours (cpu)", "ours (chunked)", "--no-memory", "--repeats", "1"]


def test_prints_and_does_not_touch_the_docs_by_default(bench, capsys):
    module, writes = bench
    module.main(ARGS)
    assert writes == []
    out = capsys.readouterr().out
    assert "| 64 | ours (cpu) | 1.0 ms" in out and "issue" not in out and "CPU model:" in out


def test_write_docs_replaces_the_section(bench):
    module, writes = bench
    module.main([*ARGS, "--write-docs"])
    assert len(writes) == 1
    path, table = writes[0]
    assert path == SCRIPT.parent.parent / "docs" / "benchmarks.md" and "| 64 | ours (chunked) |" in table


def test_write_section_keeps_the_other_sections(tmp_path):
    spec = importlib.util.spec_from_file_location("bench_scan_sections", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    doc = tmp_path / "benchmarks.md"
    doc.write_text("# Benchmarks\n\n## Selective scan\n\nold\n\n## Other\n\nkept\n")
    module.write_section(doc, "new table")
    assert doc.read_text() == "# Benchmarks\n\n## Selective scan\n\nnew table\n\n## Other\n\nkept\n"
