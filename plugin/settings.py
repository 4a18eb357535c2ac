"""Process settings: one object per process, built once in ``main()``.

Precedence: CLI overrides > environment (``PACSCLIP_*``) > TOML config file > defaults.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)
from sqlalchemy.engine import make_url

from plugin.errors import ConfigError


class CallerRule(BaseModel):
    """One entry of the calling-AE allow-list; ``host`` pins the AE to an address."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    ae_title: str = Field(min_length=1, max_length=16)
    host: str | None = None

    def allows(self, ae_title: str, host: str) -> bool:
        return self.ae_title == ae_title and (self.host is None or self.host == host)


class DicomPeer(BaseModel):
    """A remote DICOM application entity (a PACS to query, a destination)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    ae_title: str = Field(min_length=1, max_length=16)
    host: str
    port: int = Field(ge=1, le=65535)


class DestinationConfig(BaseModel):
    """Where pacsclip's results (SR and overlays) go: a DICOM node by C-STORE (``ae_title``,
    ``host``, ``port``, optionally over TLS) or a DICOMweb server by STOW-RS (``url``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(min_length=1, max_length=64)
    ae_title: str | None = Field(None, min_length=1, max_length=16)
    host: str | None = None
    port: int | None = Field(None, ge=1, le=65535)
    tls: bool = False
    tls_ca: Path | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None
    url: str | None = None
    bearer_token: SecretStr | None = None

    @model_validator(mode="after")
    def _one_kind(self) -> DestinationConfig:
        dicom = (self.ae_title, self.host, self.port)
        if self.url is None and None in dicom:
            raise ValueError(
                f"destination {self.name!r}: give ae_title, host and port (C-STORE) or url "
                "(STOW-RS)"
            )
        if self.url is not None and any(v is not None for v in dicom):
            raise ValueError(f"destination {self.name!r}: give either url or ae_title/host/port")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError(f"destination {self.name!r}: tls_cert and tls_key go together")
        if (self.tls_cert or self.tls_ca) and not self.tls:
            raise ValueError(f"destination {self.name!r}: TLS files given, set tls = true")
        return self


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="PACSCLIP_", extra="forbid")

    data_dir: Path = Path("pacsclip-data")
    ae_title: str = Field("PACSCLIP", min_length=1, max_length=16)
    dicom_host: str = "0.0.0.0"
    dicom_port: int = Field(11112, ge=0, le=65535)
    database_url: str | None = None
    broker_url: str | None = None

    # Receiving
    allowed_callers: list[CallerRule] = Field(default_factory=list)
    max_associations: int = Field(10, ge=1)
    min_free_disk_mb: int = Field(500, ge=0)
    # Receiver processes on the DICOM port; unset: one per core (at most 4); 0: receive in
    # the node's own process.
    receiver_processes: int | None = Field(None, ge=0, le=64)
    # On SIGTERM: how long open associations (and running tasks) may take to finish.
    drain_timeout_s: float = Field(5.0, gt=0)
    site_tags: list[str] = Field(default_factory=lambda: ["calling_ae_title", "InstitutionName"])

    # DICOM TLS: all of cert and key, optionally a CA to require client certificates
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_ca: Path | None = None

    # Study completeness
    quiet_period_s: float = Field(2.0, gt=0)
    max_wait_s: float = Field(3600.0, gt=0)
    completion_check_interval_s: float = Field(0.05, gt=0)
    # A study that came over one association is complete this long after its release
    # (unless its sender has another association open); off: the quiet period only.
    complete_on_release: bool = True
    release_grace_s: float = Field(0.1, ge=0)
    count_query_peer: DicomPeer | None = None

    rules_file: Path | None = None
    log_level: str = "INFO"

    # Workers
    result_backend_url: str | None = None
    worker_pool: Literal["solo", "prefork"] = "solo"
    worker_concurrency: int = Field(1, ge=1)
    model_bundle: Path | None = None  # default: the active bundle, else the built-in demo
    inference_threads: int | None = Field(None, ge=1)
    task_visibility_timeout_s: int = Field(300, ge=10)
    requeue_after_s: float = Field(600.0, gt=0)

    # Dispatch of results
    destinations: list[DestinationConfig] = Field(default_factory=list)
    dispatch_max_retries: int = Field(5, ge=0)
    dispatch_backoff_s: float = Field(2.0, gt=0)
    dispatch_timeout_s: float = Field(30.0, gt=0)

    # HTTP API and notifications
    api_host: str = "127.0.0.1"
    api_port: int = Field(8080, ge=0, le=65535)
    api_token: SecretStr | None = None
    # A study's linked-encounter revisit risk at or above this is flagged on the worklist.
    revisit_flag_threshold: float = Field(0.5, ge=0.0, le=1.0)
    webhook_url: str | None = None
    webhook_secret: SecretStr | None = None
    hl7_host: str | None = None
    hl7_port: int | None = Field(None, ge=1, le=65535)
    hl7_receiving_app: str = "RIS"
    worker_metrics_port: int | None = Field(None, ge=1, le=65535)

    @field_validator("allowed_callers", mode="before")
    @classmethod
    def _callers_from_titles(cls, value: Any) -> Any:
        if isinstance(value, str):
            value = json.loads(value) if value.strip() else []
        if isinstance(value, list):
            return [{"ae_title": v} if isinstance(v, str) else v for v in value]
        return value

    @model_validator(mode="after")
    def _tls_pair(self) -> Settings:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("tls_cert and tls_key must be given together")
        if self.tls_ca is not None and self.tls_cert is None:
            raise ValueError("tls_ca needs tls_cert and tls_key")
        return self

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (init_settings, env_settings, TomlConfigSettingsSource(settings_cls))

    @property
    def spool_dir(self) -> Path:
        return self.data_dir / "spool"

    @property
    def quarantine_dir(self) -> Path:
        return self.data_dir / "quarantine"

    @property
    def effective_database_url(self) -> str:
        return self.database_url or f"sqlite:///{(self.data_dir / 'catalog.sqlite3').resolve()}"

    @property
    def effective_broker_url(self) -> str:
        return self.broker_url or f"sqla+sqlite:///{(self.data_dir / 'broker.sqlite3').resolve()}"

    @property
    def effective_result_backend_url(self) -> str:
        return self.result_backend_url or (
            f"db+sqlite:///{(self.data_dir / 'task-results.sqlite3').resolve()}"
        )

    @property
    def results_dir(self) -> Path:
        return self.data_dir / "results"

    @property
    def effective_receiver_processes(self) -> int:
        if self.receiver_processes is not None:
            return self.receiver_processes
        return min(4, os.cpu_count() or 1)

    @property
    def tls_enabled(self) -> bool:
        return self.tls_cert is not None

    def masked(self) -> dict[str, Any]:
        """The effective settings as plain data, with passwords in URLs masked."""
        data = self.model_dump(mode="json")
        data["database_url"] = mask_url(self.effective_database_url)
        data["broker_url"] = mask_url(self.effective_broker_url)
        data["result_backend_url"] = mask_url(self.effective_result_backend_url)
        return data


def mask_url(url: str) -> str:
    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # an unparsable URL is shown fully masked, never raw
        return "***"


def load_settings(config_file: Path | None = None, **overrides: Any) -> Settings:
    """Build the process settings; ``overrides`` with value ``None`` are ignored."""
    if config_file is not None and not config_file.is_file():
        raise ConfigError(f"config file not found: {config_file}")

    class FileSettings(Settings):
        model_config = SettingsConfigDict(toml_file=config_file)

    try:
        return FileSettings(**{k: v for k, v in overrides.items() if v is not None})
    except ValueError as exc:
        raise ConfigError(f"invalid settings: {exc}") from exc
