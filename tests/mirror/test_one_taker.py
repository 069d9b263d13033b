"""One source LUN, one LUN of an array serving it. A second migration of a source that
a LUN of the same array already migrates, or serves as a remote LUN after a cancel,
would miss the writes that go through the first: its regions believed copied go stale
(I2). It is refused, the source matched by its LUN id (under any address) or, where the
source gives none, by its address. Real array daemons and nbdkit.
"""

from __future__ import annotations

import asyncio

import pytest

from control.api_client import ApiError
from tests.mirror.test_faults import LUN, MiB, make_data, new_source, two_arrays
from tests.servers import array_api, nbdkit

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]


def refused(api: object, lun: str, source: str, by: str) -> None:
    with pytest.raises(ApiError) as e:
        api.call("POST", "/api/v1/migrations", {"lun": lun, "source": source})  # type: ignore[attr-defined]
    assert e.value.status == 409 and f"is served by LUN {by!r} of array 'B' already" in e.value.message, (
        e.value
    )
    assert lun not in [x["name"] for x in api.list_luns()]  # type: ignore[attr-defined]


def test_a_source_served_by_a_lun_is_not_taken_over_again(tmp_path: str) -> None:
    with two_arrays(tmp_path) as (_, a, b):  # type: ignore[arg-type]
        asyncio.run(new_source(a, make_data(1, 8 * MiB)))  # data: the throttled copy takes 8 s
        api = array_api(b)
        uri = a.uri(LUN)
        alias = uri.replace("127.0.0.1", "localhost")  # the same LUN at another address
        api.call("POST", "/api/v1/migrations", {"lun": "m1", "source": uri, "throttle": 1})
        refused(api, "m2", uri, "m1")
        refused(api, "m2", alias, "m1")
        api.call("POST", "/api/v1/migrations/m1/cancel")  # m1 serves A's LUN as a remote LUN
        refused(api, "m2", alias, "m1")
        array_api(a).create_lun("other", 8 * MiB)  # another LUN of A: no conflict
        api.call("POST", "/api/v1/migrations", {"lun": "m3", "source": a.uri("other"), "throttle": 1})
        api.delete_lun("m1", force=True)
        st = api.call("POST", "/api/v1/migrations", {"lun": "m2", "source": alias})
        assert st["state"] in ("copying", "converging", "cutover", "completed"), st
        assert api.wait_migration("m2", 60)["state"] == "completed"
        # completed: m2 is a local LUN now, its source free for another migration
        api.call("POST", "/api/v1/migrations", {"lun": "m4", "source": uri})


def test_a_foreign_source_is_matched_by_its_address(tmp_path: str) -> None:
    with two_arrays(tmp_path) as (_, a, b), nbdkit(tmp_path, "pattern", "size=64M") as src:  # type: ignore[arg-type]
        api = array_api(b)
        api.call("POST", "/api/v1/migrations", {"lun": "m1", "source": src.uri, "throttle": 1})
        refused(api, "m2", src.uri, "m1")
