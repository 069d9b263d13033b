"""bench.suite's report: the table, the summary and the goals say the same thing."""

from __future__ import annotations

from typing import Any

import pytest

from bench.suite import CLAIM_LOSS, goals, print_table, summarize


def doc_with(migrating: float) -> dict[str, Any]:
    median = {
        "source_iops": 20000.0,
        "ratios_iops": {"source": 1.0, "migrating": migrating, "after": 1.0},
        "rate_iops": 10000.0,
        "source_p99_us": 500.0,
        "ratios_p99": {"source": 1.0, "migrating": 2.0, "after": 1.1},
        "copy_in_progress": True,
    }
    profile = {"title": "OLTP", "saturated": [{}], "rate": [{}], "median": median}
    return {
        "quick": True,
        "elapsed_s": 1.0,
        "loadavg_before": [0.0, 0.0, 0.0],
        "loadavg_after": [0.0, 0.0, 0.0],
        "cpus": 2,
        "fabrics": {"fc": {"namespaced": True, "shaper": "wire"}},
        "results": {"fc": {"ssd": {"profiles": {"oltp": profile}, "peers": {}}}},
    }


@pytest.mark.parametrize("migrating", [0.8496, 0.8504, 0.85, 0.5])
def test_the_goal_is_judged_as_the_table_shows_it(
    migrating: float, capsys: pytest.CaptureFixture[str]
) -> None:
    doc = doc_with(migrating)
    doc["goals"] = goals(doc)
    summary = summarize(doc)
    shown = summary["fc/ssd"]["profiles"]["oltp"]["loss_migrating"]
    met = doc["goals"]["oltp_loss_migrating_le_15pct_fc_ssd"]
    assert met == (shown <= CLAIM_LOSS), (shown, met)
    print_table(doc, summary)
    table = capsys.readouterr().out
    row = next(line for line in table.splitlines() if line.strip().startswith("fc/ssd"))
    assert row.rstrip().endswith("met") != row.rstrip().endswith("MISSED")
    assert ("MISSED" in row) == (not met), row
    assert f"goal oltp_loss_migrating_le_15pct_fc_ssd: {'met' if met else 'MISSED'}" in table
