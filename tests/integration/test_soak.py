"""A one-minute soak (tests/soak/run.py): node, workers on RabbitMQ, API, private PostgreSQL and
Orthanc, with kill -9 of workers and node, an Orthanc outage and a PostgreSQL restart."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.peers.postgres import postgres_bin_dir
from tests.soak.run import SoakConfig, run_soak


@pytest.mark.timeout(600)
def test_short_soak_loses_nothing_and_duplicates_nothing(tmp_path: Path) -> None:
    if postgres_bin_dir() is None:
        pytest.skip("PostgreSQL server binaries (initdb, pg_ctl) are not installed")
    # One minute keeps the default run short; kills come more often than in a long soak so
    # that each kind of failure still happens several times.
    config = SoakConfig(
        studies=50,
        minutes=1.0,
        workers=2,
        seed=7,
        worker_kill_every_s=12.0,
        node_kill_every_s=40.0,
        orthanc_outage_s=15.0,
        settle_timeout_s=240,
    )

    text, passed = run_soak(config, tmp_path)

    print(text)
    assert passed, text
    assert "instances lost: 0; duplicates: 0" in text
    kills = re.search(r"kills survived: (\d+) workers, (\d+) node; Orthanc stops (\d+)", text)
    assert kills is not None
    assert int(kills[1]) >= 4 and int(kills[2]) >= 1 and int(kills[3]) == 1
