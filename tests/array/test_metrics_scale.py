"""/metrics of an array with many LUNs: small, and made without holding hosts' I/O.

Before: prometheus_client made 126 samples a LUN (a 16-sample latency histogram for
each of 7 ops, used or not) in one go on the event loop: 31 MB and 4.4 s for 3000
LUNs, during which no host request of any LUN was answered. Now the text is made
by hand (a sample is a string join), an op's histogram is left out until the op is
used (its counters say 0), and the loop is handed back every CHUNK LUNs.
"""

from __future__ import annotations

import asyncio
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from emulator.array.stats import CHUNK, LunStats, exposition
from emulator.nbd.client import NbdClient
from tests.loop_turns import loop_turns_during
from tests.servers import array_api, array_daemon

LUNS = 1000


@pytest.mark.slow
def test_a_scrape_of_many_luns_is_small_and_parses(tmp_path: Path) -> None:
    with array_daemon(tmp_path / "a", "A") as a:
        api = array_api(a)
        for i in range(LUNS):
            api.create_lun(f"l{i}", 1 << 20)

        async def read() -> None:
            async with await NbdClient.connect(a.uri("l0")) as c:
                await c.read(0, 4096)

        asyncio.run(read())
        req = urllib.request.Request(f"{a.api}/metrics", headers={"Authorization": f"Bearer {a.token}"})
        with urllib.request.urlopen(req, timeout=60) as r:
            body, ctype = r.read(), r.headers["Content-Type"]
    assert ctype.startswith("text/plain; version=0.0.4")
    assert len(body) / LUNS < 4000, len(body) / LUNS  # 10.5 KB a LUN before
    samples = {
        (s.name, s.labels["lun"], s.labels["op"]): s.value
        for fam in text_string_to_metric_families(body.decode())
        for s in fam.samples
    }
    assert samples[("blockmig_lun_ops_total", "l0", "read")] == 1
    assert samples[("blockmig_lun_latency_seconds_count", "l0", "read")] == 1
    assert samples[("blockmig_lun_ops_total", "l999", "write")] == 0
    assert ("blockmig_lun_latency_seconds_count", "l999", "read") not in samples
    assert len({lun for _, lun, _ in samples}) == LUNS


def test_the_loop_runs_between_chunks_of_luns() -> None:
    """Other callbacks (hosts' I/O) run while a scrape is made: at least once a chunk."""

    async def main() -> None:
        luns = [(f"l{i}", LunStats()) for i in range(10 * CHUNK)]
        for _, st in luns:
            st.ops["read"].record(4096, 0.0002)
        text, turns = await loop_turns_during(exposition("A", luns))
        assert turns >= 9
        assert text.count(b'op="read",le="+Inf"} 1.0') == 10 * CHUNK

    asyncio.run(main())
