"""The soak's settle step must not end while an acknowledged study is missing from the catalog.

The node answers Success once an instance is in its spool and catalogs it a moment later (after
a SIGKILL, only when the restarted node reconciles its spool); a settle that looks at catalog
rows only ends in that gap, and the check then races the study's analysis and dispatch
("Orthanc holds 0 SR, the catalog made 1").
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest

from plugin.catalog.db import open_catalog
from tests.soak import run
from tests.soak.load import SITES, StudyLoad


@pytest.fixture
def deployment(tmp_path: Path) -> SimpleNamespace:
    url = f"sqlite:///{tmp_path / 'catalog.db'}"
    open_catalog(url).engine.dispose()  # the schema, empty: nothing cataloged yet
    return SimpleNamespace(postgres=SimpleNamespace(url=lambda: url), env={}, logs=tmp_path)


def test_settle_waits_for_an_acknowledged_study_not_yet_cataloged(
    deployment: SimpleNamespace, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(run.time, "sleep", lambda _s: None)
    sent = StudyLoad(0, "1.2.3", SITES[0], "CR", [], ["1.2.3.1"], acknowledged={"1.2.3.1"})
    findings = run.Findings()

    run.settle(deployment, 0.2, findings, [sent])

    assert findings.violations and findings.violations[0].startswith("not settled"), (
        "settle ended while an instance answered Success was not in the catalog"
    )


def test_settle_ends_when_nothing_is_outstanding(deployment: SimpleNamespace) -> None:
    findings = run.Findings()
    unsent = StudyLoad(0, "1.2.3", SITES[0], "CR", [], ["1.2.3.1"])

    run.settle(deployment, 5, findings, [unsent])

    assert findings.violations == []
