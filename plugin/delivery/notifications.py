"""A STAT flag delivered as a dispatch job: the webhook POST or the HL7 ORU over MLLP.

One attempt per call (the webhook client's own retries are off): the dispatch job retries with
the results' backoff and dead-letters like them. A receiver's refusal is not retryable.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from plugin.catalog.dispatch_jobs import HL7, WEBHOOK
from plugin.delivery.outcome import DispatchError
from plugin.errors import ConfigError
from plugin.notify import NotificationError
from plugin.notify.hl7 import build_oru, send_mllp
from plugin.notify.webhook import notify_stat, stat_payload
from plugin.settings import Settings


def configured(kind: str, settings: Settings) -> bool:
    """Whether the settings name a receiver for this kind of notification."""
    if kind == WEBHOOK:
        return bool(settings.webhook_url)
    if kind == HL7:
        return bool(settings.hl7_host and settings.hl7_port)
    return False


def configured_kinds(settings: Settings) -> list[str]:
    return [kind for kind in (WEBHOOK, HL7) if configured(kind, settings)]


def send_notification(
    kind: str, analysis_id: int, flag: Mapping[str, Any], settings: Settings
) -> None:
    """Send the STAT flag once; DispatchError (retryable or not) when it was not accepted."""
    timeout = settings.dispatch_timeout_s
    try:
        if kind == WEBHOOK and settings.webhook_url:
            secret = settings.webhook_secret.get_secret_value() if settings.webhook_secret else None
            notify_stat(
                settings.webhook_url,
                stat_payload(flag),
                secret=secret,
                retries=0,
                timeout_s=timeout,
            )
        elif kind == HL7 and settings.hl7_host and settings.hl7_port:
            message = build_oru(
                flag,
                receiving_app=settings.hl7_receiving_app,
                # The same control id on every attempt: the receiver can tell a resend.
                control_id=f"PACSCLIP{analysis_id}",
                timestamp=datetime.now(UTC),
            )
            send_mllp(settings.hl7_host, settings.hl7_port, message, timeout_s=timeout)
        else:
            raise DispatchError(f"{kind} is not configured", destination=kind, retryable=False)
    except NotificationError as exc:
        raise DispatchError(
            f"STAT {kind}: {exc}", destination=kind, retryable=exc.retryable
        ) from exc
    except ConfigError as exc:  # a webhook URL that is not http(s)
        raise DispatchError(f"STAT {kind}: {exc}", destination=kind, retryable=False) from exc
