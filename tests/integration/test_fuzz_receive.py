"""A short run of the receive-path fuzzer (tests/fuzz/receive.py) against a `pacsclip node`."""

from __future__ import annotations

from pathlib import Path

from tests.fuzz.receive import run_fuzz

CASES = 400
# The node's RSS reaches its working set only after several hundred cases (the largest
# objects, the thread per connection, what the allocator keeps): measured from there.
WARMUP = 1000


def test_fuzzed_datasets_and_raw_pdus_get_clear_answers_and_the_node_stays_up(
    tmp_path: Path,
) -> None:
    report = run_fuzz(
        CASES, seed=1, workdir=tmp_path, keep_dir=tmp_path / "violations", warmup=WARMUP
    )

    print(report.text())
    assert report.cases == report.warmup + CASES
    assert report.node_alive
    assert report.problems == []
    # The run exercised every path it claims to check: stored, refused, and raw bytes.
    outcomes = " ".join(report.outcomes)
    assert "valid -> 0x0000" in outcomes
    assert "-> 0xC000" in outcomes
    assert "raw_" in outcomes
