"""Shared fixtures: settings for a throwaway data directory."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from plugin.settings import Settings, load_settings


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Tests build their own settings; a developer's PACSCLIP_* variables must not leak in."""
    import os

    for name in list(os.environ):
        if name.startswith("PACSCLIP_"):
            monkeypatch.delenv(name)
    yield


@pytest.fixture
def make_settings(tmp_path: Path) -> Any:
    def make(**overrides: Any) -> Settings:
        values: dict[str, Any] = {
            "data_dir": tmp_path / "data",
            "dicom_host": "127.0.0.1",
            "dicom_port": 0,
            "quiet_period_s": 0.5,
            "completion_check_interval_s": 0.05,
            "min_free_disk_mb": 0,
            # Receive in the test's own process (starts in milliseconds); the receiver
            # processes are tested through `pacsclip node` and `pacsclip serve`.
            "receiver_processes": 0,
        }
        values.update(overrides)
        return load_settings(**values)

    return make
