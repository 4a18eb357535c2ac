"""Process settings: one object per process, built once in ``main()``.

Precedence: CLI overrides > environment (``PACSCLIP_*``) > TOML config file > defaults.
"""

from __future__ import annotations

import ipaddress
import json
import os
from pathlib import Path
from typing import Any, Final, Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)
from sqlalchemy.engine import make_url

from plugin.errors import ConfigError
from plugin.roles import ALL_ROLES, DEFAULT_ROLE_GROUPS, Role
from plugin.viewer_links import OHIF_TEMPLATE, check_base, check_template


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


# The STAT webhook's and HL7 ORU's delivery jobs go to these (plugin.catalog.dispatch_jobs).
RESERVED_DESTINATION_NAMES: Final = frozenset({"webhook", "hl7"})


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
        if self.name in RESERVED_DESTINATION_NAMES:
            raise ValueError(
                f"destination {self.name!r}: the name is taken by the STAT notifications' "
                "delivery jobs; choose another"
            )
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


# What the free-disk floor of retention may delete (plugin.retention).
DiskKind = Literal["spool", "results", "quarantine", "cache"]
DISK_KINDS_DEFAULT: tuple[DiskKind, ...] = ("cache", "quarantine", "spool")


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="PACSCLIP_", extra="forbid")

    data_dir: Path = Field(
        Path("pacsclip-data"), description="Spool, quarantine, results, models, SQLite files."
    )
    ae_title: str = Field("PACSCLIP", min_length=1, max_length=16, description="Our AE title.")
    dicom_host: str = Field("0.0.0.0", description="Address the DICOM node listens on.")
    dicom_port: int = Field(11112, ge=0, le=65535, description="DICOM port of the node.")
    database_url: str | None = Field(
        None,
        description="Catalog; unset: SQLite file in the data dir. "
        "PostgreSQL: postgresql+psycopg://user:pw@host/db.",
    )
    broker_url: str | None = Field(
        None, description="Task queue; unset: SQLite transport in the data dir."
    )

    # Receiving
    allowed_callers: list[CallerRule] = Field(
        default_factory=list,
        description='JSON list of AE titles or {"ae_title", "host"}; empty: anyone (warned).',
    )
    check_called_ae_title: bool = Field(
        False,
        description="Reject an association whose called AE title is not ae_title (A-ASSOCIATE-RJ "
        "called AE title not recognised); off: any called AE title is accepted.",
    )
    max_associations: int = Field(
        10, ge=1, description="Concurrent associations of the whole node; more are rejected."
    )
    min_free_disk_mb: int = Field(
        500, ge=0, description="Below this free space C-STORE answers 0xA700."
    )
    max_pdu_bytes: int = Field(
        4 * 2**20,
        ge=4096,
        le=64 * 2**20,
        description="Largest P-DATA PDU the node announces: senders split each object into "
        "PDUs of at most this size (pynetdicom's default, 16 KiB, costs throughput).",
    )
    receiver_processes: int | None = Field(
        None,
        ge=0,
        le=64,
        description="Receiver processes on the DICOM port; unset: one per core (at most 4); "
        "0: in the node's own process.",
    )
    drain_timeout_s: float = Field(
        5.0,
        gt=0,
        description="On SIGTERM: how long open associations (and running tasks) may take.",
    )
    site_tags: list[str] = Field(
        default_factory=lambda: ["calling_ae_title", "InstitutionName"],
        description="Tags joined into each study's site key.",
    )

    # DICOM TLS: all of cert and key, optionally a CA to require client certificates
    tls_cert: Path | None = Field(None, description="DICOM TLS certificate (with tls_key).")
    tls_key: Path | None = Field(None, description="DICOM TLS private key (with tls_cert).")
    tls_ca: Path | None = Field(
        None, description="CA that callers' client certificates must be signed by."
    )
    dicom_tls_port: int | None = Field(
        None,
        ge=0,
        le=65535,
        description="With tls_cert and tls_key: a second port that speaks DICOM TLS while "
        "dicom_port stays plain (both at once); unset: dicom_port speaks TLS.",
    )

    # Study completeness
    quiet_period_s: float = Field(
        2.0, gt=0, description="A study is complete this long after its last association."
    )
    max_wait_s: float = Field(
        3600.0, gt=0, description="Hard maximum from a study's first instance to completion."
    )
    completion_check_interval_s: float = Field(
        0.05, gt=0, description="How often the node checks studies for completeness."
    )
    complete_on_release: bool = Field(
        True,
        description="A study from one association is complete release_grace_s after its "
        "release (unless its sender has another open); off: the quiet period only.",
    )
    release_grace_s: float = Field(
        0.1, ge=0, description="Wait after a release before a study counts as complete."
    )
    count_query_peer: DicomPeer | None = Field(
        None,
        description='{"ae_title", "host", "port"} of a PACS asked (C-FIND) for the instance count.',
    )

    rules_file: Path | None = Field(None, description="Routing rules (YAML).")
    log_level: str = Field("INFO", description="DEBUG, INFO, WARNING, ...")

    # Workers
    result_backend_url: str | None = Field(
        None, description="Celery results; unset: SQLite file in the data dir."
    )
    worker_pool: Literal["solo", "prefork"] = Field(
        "solo", description="Celery pool of pacsclip worker."
    )
    worker_concurrency: int = Field(1, ge=1, description="Celery concurrency of pacsclip worker.")
    model_bundle: Path | None = Field(
        None,
        description="Bundle folder the workers run; unset: the active bundle, else the built-in "
        "demo as demo_model says.",
    )
    demo_model: Literal["live", "shadow"] = Field(
        "live",
        description="Where the built-in demo runs while no bundle is active: live (its results "
        "go to the destinations, the quick start) or shadow (scored and validated only, "
        "nothing sent: the deploy examples, so no demo result reaches a clinical PACS).",
    )
    inference_threads: int | None = Field(
        None, ge=1, description="onnxruntime threads per worker; unset: all cores."
    )
    ood_guard: bool = Field(
        True,
        description="Out-of-distribution guard: a study unlike the bundle's reference images "
        "is stored and indexed but not scored (no findings). Off: findings on every image.",
    )
    result_regions: bool = Field(
        True,
        description="Where each present finding is: its regions outlined in the SR (SCOORD), "
        "the overlay and the dashboard. Off: the overlays keep their heat maps, but findings "
        "carry no region: the SR says none was computed, and no SEG is made.",
    )
    result_seg: bool = Field(
        True,
        description="A DICOM SEG (one BINARY segment per present finding with a region) sent "
        "with the SR and the overlay, in its own series.",
    )
    report_vocabulary_file: Path | None = Field(
        None,
        description="YAML file adding report words per finding (terms, patterns, normal) to "
        "the report labeler's defaults; see docs/validation.md.",
    )
    validation_min_positives: int = Field(
        20,
        ge=1,
        description="Validation gives figures for a finding only with this many "
        "positive labeled studies (and the gate needs them).",
    )
    validation_min_negatives: int = Field(
        20, ge=1, description="The same for negative labeled studies."
    )
    golive_auroc_floor: float = Field(
        0.70,
        ge=0.0,
        le=1.0,
        description="Go-live gate: lowest AUROC a candidate may have at "
        "a site, per finding, against the site's report labels.",
    )
    monitor_window_studies: int = Field(
        200,
        ge=10,
        description="Monitoring after go-live: the last this many labeled studies "
        "per site and model (within monitor_window_days).",
    )
    monitor_window_days: int = Field(
        30, ge=1, description="Monitoring: only studies received in the last this many days."
    )
    monitor_alert_rate_tolerance: float = Field(
        0.10,
        gt=0.0,
        le=1.0,
        description="Monitoring: alert when a finding's alert rate in "
        "the window moves further than this from its rate before the window.",
    )
    monitor_interval_s: float = Field(
        300.0,
        ge=0.0,
        description="How often a worker recomputes monitoring after a report "
        "is labeled (0: after every report).",
    )
    task_visibility_timeout_s: int = Field(
        300,
        ge=10,
        description="Redis broker: an unacknowledged task (its worker died) is redelivered "
        "after this; workers look for such tasks every tenth of it, at most every 10 s.",
    )
    requeue_after_s: float = Field(
        600.0, gt=0, description="A complete study still without analysis is queued again."
    )

    # Dispatch of results
    destinations: list[DestinationConfig] = Field(
        default_factory=list,
        description="JSON list of C-STORE or STOW-RS destinations that receive results.",
    )
    dispatch_max_retries: int = Field(
        36,
        ge=0,
        description="Retries before a dead letter; with the default delays they span about "
        "two hours, longer than a PACS restart or a network change.",
    )
    dispatch_backoff_s: float = Field(
        2.0, gt=0, description="First retry delay; it doubles, up to dispatch_backoff_max_s."
    )
    dispatch_backoff_max_s: float = Field(
        240.0,
        gt=0,
        description="Longest retry delay (each delay varies by up to 20% so that jobs spread "
        "out); below task_visibility_timeout_s, or Redis would hand the retry to another "
        "worker early.",
    )
    dispatch_timeout_s: float = Field(30.0, gt=0, description="Timeout of one delivery.")
    destination_probe_interval_s: float = Field(
        60.0,
        gt=0,
        description="How often the DICOM node probes a destination that dead-lettered jobs "
        "or jobs on a long backoff wait for (C-ECHO, its DICOMweb endpoint, or a TCP connect "
        "to the webhook or HL7 receiver); when it answers, those jobs are queued again.",
    )

    # Retention (unset: kept for ever; nothing is deleted unless configured)
    retention_spool_days: int | None = Field(
        None,
        ge=1,
        description="Received originals (the spool) of finished studies are deleted this "
        "many days after completion; the study stays, marked as having no originals.",
    )
    retention_results_days: int | None = Field(
        None,
        ge=1,
        description="pacsclip's result objects (SR, overlays, SEG) whose every delivery "
        "succeeded are deleted this many days after the analysis; its findings stay.",
    )
    retention_quarantine_days: int | None = Field(
        None, ge=1, description="Quarantined objects (and their entries) older than this."
    )
    retention_embeddings_days: int | None = Field(
        None,
        ge=1,
        description="Image and report embeddings of finished studies older than this, and "
        "their similar-case index entries.",
    )
    retention_cache_days: int | None = Field(
        None, ge=1, description="Images the dashboard rendered (its cache) older than this."
    )
    retention_access_log_days: int | None = Field(
        None,
        ge=1,
        description="Age after which access-log entries go (HIPAA asks for 6 years: 2190). "
        "Purging a patient's data never removes them.",
    )
    retention_free_disk_floor_mb: int | None = Field(
        None,
        ge=1,
        description="When free space under the data dir falls below this, the oldest of the "
        "kinds in retention_disk_kinds are deleted, oldest first, until it is back above.",
    )
    retention_disk_kinds: list[DiskKind] = Field(
        default_factory=lambda: list(DISK_KINDS_DEFAULT),
        description="What the free-disk floor may delete: cache, quarantine, spool, results.",
    )
    retention_interval_s: float = Field(
        3600.0,
        gt=0,
        description="How often the DICOM node applies retention (when any is configured).",
    )

    # HTTP API and notifications
    api_host: str = Field(
        "127.0.0.1", description="Address of the HTTP API (and of a worker's metrics port)."
    )
    api_port: int = Field(8080, ge=0, le=65535, description="HTTP API port.")
    api_token: SecretStr | None = Field(
        None, description="Bearer token of /api; unset: every call but health answers 503."
    )
    api_token_roles: list[Role] = Field(
        default_factory=lambda: sorted(ALL_ROLES),
        description="Roles of api_token, for machines and for a dashboard login with it: all "
        "four unless narrowed. Named tokens with their own roles: `pacsclip tokens create`.",
    )
    session_secret: SecretStr | None = Field(
        None,
        description="Key that signs the dashboard's session cookies; unset: derived from "
        "api_token, else a random key kept in the data dir (`session-secret`).",
    )
    dashboard_token_login: bool | None = Field(
        None,
        description="Whether the dashboard's login page takes api_token; unset: only while no "
        "OpenID Connect provider is configured (people then sign in as themselves).",
    )
    oidc_issuer: str | None = Field(
        None,
        description="OpenID Connect issuer of the hospital's identity provider (e.g. "
        "`https://login.microsoftonline.com/TENANT/v2.0`, "
        "`https://keycloak.example.org/realms/hospital`); its "
        "`/.well-known/openid-configuration` is read at start. Unset: no single sign-on.",
    )
    oidc_client_id: str | None = Field(
        None, description="pacsclip's client (application) id at the provider."
    )
    oidc_client_secret: SecretStr | None = Field(
        None, description="The client's secret (a confidential client; PKCE is always used)."
    )
    oidc_scopes: str = Field(
        "openid profile email", description="Scopes asked for at sign-in, space-separated."
    )
    oidc_groups_claim: str = Field(
        "groups",
        description="The ID token (or userinfo) claim that lists the person's groups.",
    )
    oidc_role_groups: dict[Role, list[str]] = Field(
        default_factory=lambda: {role: list(g) for role, g in DEFAULT_ROLE_GROUPS.items()},
        description="Which provider groups give which role (JSON in the environment): Entra "
        "sends group object IDs, Keycloak group names (or paths with full path on).",
    )
    oidc_redirect_uri: str | None = Field(
        None,
        description="The redirect URI registered at the provider; unset: the dashboard's own "
        "address + `/auth/callback` (set it behind a reverse proxy).",
    )
    oidc_provider_name: str = Field(
        "single sign-on", description="The provider as the login button names it."
    )
    oidc_timeout_s: float = Field(
        5.0, gt=0, description="How long a call to the identity provider may take."
    )
    viewer_base_url: str | None = Field(
        None,
        description="The site's image viewer (e.g. `https://pacs.example.org/ohif`, or `/` "
        "when it is served from the dashboard's own address); unset: a relative "
        "viewer_url_template gives no link.",
    )
    viewer_url_template: str = Field(
        OHIF_TEMPLATE,
        description="Link from the worklist and the study page into the viewer: a path "
        "after viewer_base_url, or a full http(s) URL; `{study_uid}` is replaced by the Study "
        "Instance UID (no other field: patient data never goes into a URL); empty: no link.",
    )
    revisit_flag_threshold: float = Field(
        0.5,
        ge=0.0,
        le=1.0,
        description="Revisit risk at or above this is flagged on the worklist.",
    )
    webhook_url: str | None = Field(None, description="POSTed on each STAT result.")
    webhook_secret: SecretStr | None = Field(
        None, description="HMAC-SHA256 key of the webhook signature."
    )
    hl7_host: str | None = Field(
        None, description="Host sent an HL7 v2.5 ORU^R01 (MLLP) on each STAT result."
    )
    hl7_port: int | None = Field(None, ge=1, le=65535, description="HL7 MLLP port.")
    hl7_receiving_app: str = Field("RIS", description="HL7 receiving application.")

    # Reports received as HL7 v2 ORU^R01 over MLLP (`pacsclip hl7-listen`)
    hl7_listen_host: str = Field(
        "127.0.0.1", description="Address `pacsclip hl7-listen` receives ORU^R01 reports on."
    )
    hl7_listen_port: int = Field(
        2575, ge=0, le=65535, description="MLLP port of `pacsclip hl7-listen`."
    )
    hl7_allowed_hosts: list[str] = Field(
        default_factory=list,
        description="JSON list of IP addresses that may send HL7 reports; empty: any (warned).",
    )
    hl7_tls_cert: Path | None = Field(
        None, description="TLS certificate of the HL7 listener (with hl7_tls_key)."
    )
    hl7_tls_key: Path | None = Field(
        None, description="TLS private key of the HL7 listener (with hl7_tls_cert)."
    )
    hl7_tls_ca: Path | None = Field(
        None, description="CA that HL7 senders' client certificates must be signed by."
    )
    worker_metrics_port: int | None = Field(
        None,
        ge=1,
        le=65535,
        description="Port of a standalone worker's /metrics and /health (on api_host).",
    )
    node_metrics_host: str = Field(
        "127.0.0.1", description="Address of a standalone node's /metrics and /health."
    )
    node_metrics_port: int | None = Field(
        None, ge=1, le=65535, description="Port of a standalone node's /metrics and /health."
    )
    metrics_scrape_urls: list[str] = Field(
        default_factory=list,
        description="JSON list of /metrics URLs of the node and workers that the dashboard's "
        "plots add to the API process' own figures.",
    )

    # IHE AIW-I task performer (`pacsclip performer`): pulls workitems from a UPS-RS Task Manager
    ups_url: str | None = Field(
        None,
        description="UPS-RS root of the Task Manager (its workitems are at {ups_url}/workitems); "
        "unset: no task performer.",
    )
    ups_ae_title: str | None = Field(
        None,
        min_length=1,
        max_length=16,
        description="This performer's AE title, in the Performed Station Name and the claims "
        "journal; one per performer process; unset: ae_title.",
    )
    ups_task_codes: list[str] = Field(
        default_factory=lambda: ["PACSCLIP-TRIAGE"],
        description="Scheduled Workitem Code values this performer takes (pacsclip's own are "
        "in coding scheme 99PACSCLIP; the scheme is not compared); others are left alone.",
    )
    ups_calling_ae_title: str = Field(
        "AIW-I",
        min_length=1,
        max_length=16,
        description="Stands for the sender's AE title of studies pulled for workitems (site "
        "key, routing rules, audit); the PACS's AE title gives them the push path's site.",
    )
    ups_bearer_token: SecretStr | None = Field(
        None,
        description="Sent as Authorization: Bearer to the Task Manager and to the WADO-RS and "
        "STOW-RS URLs its workitems name.",
    )
    ups_tls_ca: Path | None = Field(
        None, description="CA bundle that verifies an https Task Manager (system CAs: unset)."
    )
    ups_tls_cert: Path | None = Field(
        None, description="Client certificate for mutual TLS to the Task Manager (with key)."
    )
    ups_tls_key: Path | None = Field(
        None, description="Private key of ups_tls_cert (with ups_tls_cert)."
    )
    ups_poll_interval_s: float = Field(
        2.0,
        gt=0,
        description="How often the Task Manager is asked for scheduled workitems; a workitem "
        "waits half of it on average before it is claimed.",
    )
    ups_max_in_flight: int = Field(
        4, ge=1, le=64, description="Workitems one performer holds claimed at a time."
    )
    ups_output_destination: str | None = Field(
        None,
        description="Name of a STOW-RS destination (in destinations) for workitems that name "
        "no Output Destination; unset: such a workitem is cancelled with that reason.",
    )
    ups_give_up_after_s: float = Field(
        3600.0,
        gt=0,
        description="A claimed workitem whose inputs or output destination keep failing with "
        "errors worth a retry is cancelled this long after its claim.",
    )

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
        if self.dicom_tls_port is not None:
            if self.tls_cert is None:
                raise ValueError("dicom_tls_port needs tls_cert and tls_key")
            if self.dicom_tls_port == self.dicom_port != 0:
                raise ValueError("dicom_tls_port must differ from dicom_port")
        return self

    @model_validator(mode="after")
    def _retry_below_visibility(self) -> Settings:
        # Only Redis redelivers an unacknowledged (waiting) task after the visibility timeout;
        # jitter may lengthen a delay by a fifth, and it must still end before that.
        on_redis = (self.broker_url or "").startswith(("redis://", "rediss://"))
        if on_redis and self.dispatch_backoff_max_s * 1.2 >= self.task_visibility_timeout_s:
            raise ValueError(
                f"dispatch_backoff_max_s ({self.dispatch_backoff_max_s:g}) times 1.2 must stay "
                f"below task_visibility_timeout_s ({self.task_visibility_timeout_s}): lower the "
                "first or raise the second"
            )
        return self

    @model_validator(mode="after")
    def _single_sign_on(self) -> Settings:
        if self.oidc_issuer is None:
            return self
        issuer = make_url_parts(self.oidc_issuer)
        if issuer is None:
            raise ValueError(f"oidc_issuer {self.oidc_issuer!r} is not an http(s) URL")
        scheme, host = issuer
        if scheme != "https" and host not in ("127.0.0.1", "localhost", "::1"):
            raise ValueError(
                f"oidc_issuer must be https (got {self.oidc_issuer!r}): tokens and codes "
                "would cross the network in clear"
            )
        if not self.oidc_client_id:
            raise ValueError("oidc_issuer needs oidc_client_id (and usually oidc_client_secret)")
        if "openid" not in self.oidc_scopes.split():
            raise ValueError(f"oidc_scopes must include openid (got {self.oidc_scopes!r})")
        if not any(self.oidc_role_groups.values()):
            raise ValueError("oidc_role_groups maps no group to any role: nobody could sign in")
        return self

    @model_validator(mode="after")
    def _viewer_link(self) -> Settings:
        check_template(self.viewer_url_template)
        check_base(self.viewer_base_url)
        return self

    @model_validator(mode="after")
    def _hl7_listener(self) -> Settings:
        if (self.hl7_tls_cert is None) != (self.hl7_tls_key is None):
            raise ValueError("hl7_tls_cert and hl7_tls_key must be given together")
        if self.hl7_tls_ca is not None and self.hl7_tls_cert is None:
            raise ValueError("hl7_tls_ca needs hl7_tls_cert and hl7_tls_key")
        for host in self.hl7_allowed_hosts:
            try:
                ipaddress.ip_address(host)
            except ValueError as exc:
                raise ValueError(f"hl7_allowed_hosts: {host!r} is not an IP address") from exc
        return self

    @model_validator(mode="after")
    def _task_performer(self) -> Settings:
        if (self.ups_tls_cert is None) != (self.ups_tls_key is None):
            raise ValueError("ups_tls_cert and ups_tls_key must be given together")
        if self.ups_url is not None and make_url_parts(self.ups_url) is None:
            raise ValueError(f"ups_url {self.ups_url!r} is not an http(s) URL")
        if not self.ups_task_codes:
            raise ValueError("ups_task_codes is empty: the performer would take no workitem")
        named = self.ups_output_destination
        if named is not None:
            found = [d for d in self.destinations if d.name == named]
            if not found or found[0].url is None:
                raise ValueError(
                    f"ups_output_destination {named!r} names no STOW-RS destination in "
                    "destinations (one with a url)"
                )
        return self

    @property
    def performer_ae_title(self) -> str:
        return self.ups_ae_title or self.ae_title

    @property
    def oidc_enabled(self) -> bool:
        return self.oidc_issuer is not None

    @property
    def token_login_enabled(self) -> bool:
        if self.dashboard_token_login is None:
            return not self.oidc_enabled
        return self.dashboard_token_login

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


def make_url_parts(url: str) -> tuple[str, str] | None:
    """(scheme, host) of an http(s) URL, or None."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return None
    return parts.scheme, parts.hostname
