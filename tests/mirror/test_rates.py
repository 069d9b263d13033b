"""Copy rates (MB/s) as every entry point takes them: one parser (units.parse_rate)
for the API's throttle, `array serve --migration-throttle`, `migration start
--throttle` and the config's migration_throttle. A finite number >= 0, nothing else."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest

from control.api_client import ApiError
from emulator.units import parse_rate
from tests.servers import array_api, array_daemon

BAD = [-1, -0.5, math.nan, math.inf, True, None, [1], "fast", "-1", "nan", "inf", ""]


@pytest.mark.parametrize("good", [(0, 0.0), (5, 5.0), (2.5, 2.5), ("2.5", 2.5), ("0", 0.0)])
def test_rates_that_parse(good: tuple[object, float]) -> None:
    assert parse_rate(good[0]) == good[1]


@pytest.mark.parametrize("bad", BAD, ids=repr)
def test_rates_refused(bad: object) -> None:
    with pytest.raises(ValueError, match=r"a rate in MB/s >= 0 \(0 = unlimited\), not "):
        parse_rate(bad)


@pytest.mark.timeout(60)
def test_the_api_and_the_cli_refuse_a_rate_that_is_not_finite(tmp_path: Path) -> None:
    with array_daemon(tmp_path / "b", "B") as b:
        api = array_api(b, timeout=20)
        for bad in (math.nan, math.inf, -1, "fast", True):  # json.dumps writes NaN and Infinity
            with pytest.raises(ApiError) as e:
                api.call(
                    "POST",
                    "/api/v1/migrations",
                    {"lun": "v", "source": "nbd://127.0.0.1:1/x", "throttle": bad},
                )
            assert e.value.status == 400 and "throttle must be MB/s >= 0" in e.value.message, e.value.message
        cmd = [
            sys.executable,
            "-m",
            "control.cli",
            "migration",
            "start",
            "--api",
            b.api,
            "--token",
            "test-token",
        ]
        p = subprocess.run(
            [*cmd, "--source", "nbd://127.0.0.1:1/x", "--lun", "v", "--throttle", "inf"],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert p.returncode == 2 and "--throttle: a rate in MB/s >= 0" in p.stderr, p.stderr
