"""The worker's tasks wait out a catalog outage instead of failing on it."""

from __future__ import annotations

from pathlib import Path

import pytest
import sqlalchemy.exc

from plugin.settings import Settings
from plugin.task_queue import ANALYSE_STUDY, DISPATCH_RESULT, make_celery
from worker.tasks import register


@pytest.mark.parametrize("name", [ANALYSE_STUDY, DISPATCH_RESULT])
def test_a_lost_catalog_connection_retries_the_task(name: str, tmp_path: Path) -> None:
    # Seen in the soak: PostgreSQL restarted under a dispatch task; the task failed, its
    # message was acknowledged, and its job stayed pending for good.
    app = make_celery(Settings(data_dir=tmp_path))
    register(app)
    task = app.tasks[name]

    lost = sqlalchemy.exc.OperationalError("SELECT 1", {}, Exception("connection closed"))

    assert isinstance(lost, task.autoretry_for)
    assert task.retry_backoff and task.retry_backoff_max <= 60
    assert task.max_retries is None or task.max_retries * task.retry_backoff_max >= 300
