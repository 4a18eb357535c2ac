"""The STAT webhook: one signed JSON POST per STAT result, retried on transient failures.

urllib only (no HTTP client dependency). The body carries the study's accession number, as a
clinical system-to-system message must; the log carries the study UID and HTTP status only.
"""

from __future__ import annotations

import hashlib
import hmac
import http.client
import json
import logging
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Mapping
from typing import Any, Final

from plugin.errors import ConfigError
from plugin.notify import NotificationError, disclaimers, triggering_findings

logger = logging.getLogger(__name__)

SIGNATURE_HEADER: Final = "X-Pacsclip-Signature"
USER_AGENT: Final = "pacsclip-webhook/1"


def stat_payload(flag: Mapping[str, Any]) -> dict[str, Any]:
    """The webhook body for a STAT flag (see `plugin.notify` for the flag's keys)."""
    algorithm = flag["algorithm"]
    return {
        "event": "stat_result",
        "study_instance_uid": flag["study_instance_uid"],
        "accession_number": flag.get("accession_number"),
        "priority": flag["priority"],
        "findings": [
            {"name": f["name"], "probability": f["probability"], "decision": f.get("decision")}
            for f in triggering_findings(flag)
        ],
        "algorithm": {
            "name": algorithm["name"],
            "version": algorithm["version"],
            "synthetic": bool(algorithm.get("synthetic", False)),
        },
        "disclaimer": "; ".join(disclaimers(algorithm)),
    }


def sign(body: bytes, secret: str) -> str:
    """The signature header's value: HMAC-SHA256 of the exact body bytes, hex, as GitHub does."""
    return "sha256=" + hmac.new(secret.encode("utf-8"), body, hashlib.sha256).hexdigest()


def notify_stat(
    url: str,
    payload: Mapping[str, Any],
    *,
    timeout_s: float = 5.0,
    secret: str | None = None,
    retries: int = 3,
    backoff_s: float = 0.5,
    sleep: Callable[[float], None] = time.sleep,
) -> None:
    """POST `payload` as JSON; retry `retries` times on connection errors, 429 and 5xx.

    Waits `backoff_s`, then twice as long each retry. Raises `NotificationError` when the
    receiver refuses the flag (other 3xx/4xx, not worth retrying) or after the last retry.
    """
    _check_url(url)
    if retries < 0:
        raise ValueError("retries must be 0 or more")
    body = json.dumps(payload, separators=(",", ":"), sort_keys=True).encode("utf-8")
    request = _build_request(url, body, secret)
    opener = urllib.request.build_opener(_RefuseRedirect())
    study_uid = payload.get("study_instance_uid")
    status: int | None = None
    for attempt in range(retries + 1):
        status = _post_once(opener, request, timeout_s)
        logger.info(
            "stat webhook study_uid=%s attempt=%d status=%s",
            study_uid,
            attempt + 1,
            status if status is not None else "no response",
        )
        if status is not None and 200 <= status < 300:
            return
        if not _worth_retrying(status):
            raise NotificationError(
                f"the webhook refused the STAT flag: HTTP {status}", retryable=False
            )
        if attempt < retries:
            sleep(backoff_s * 2**attempt)
    last = f"HTTP {status}" if status is not None else "no response"
    raise NotificationError(
        f"the webhook did not accept the STAT flag after {retries + 1} attempts (last: {last})"
    )


def _check_url(url: str) -> None:
    # urllib also opens file:// and ftp:// URLs; a webhook must never read local files.
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ConfigError("the webhook URL must be an http:// or https:// URL")


def _build_request(url: str, body: bytes, secret: str | None) -> urllib.request.Request:
    headers = {"Content-Type": "application/json", "User-Agent": USER_AGENT}
    if secret:
        headers[SIGNATURE_HEADER] = sign(body, secret)
    return urllib.request.Request(url, data=body, headers=headers, method="POST")


def _post_once(
    opener: urllib.request.OpenerDirector, request: urllib.request.Request, timeout_s: float
) -> int | None:
    """The HTTP status of one attempt, or None when no response came back."""
    try:
        with opener.open(request, timeout=timeout_s) as response:
            status: int = response.status
            return status
    except urllib.error.HTTPError as exc:
        exc.close()
        return exc.code
    except (OSError, http.client.HTTPException) as exc:
        # URLError and timeouts are OSErrors; a garbled response is an HTTPException.
        logger.debug("stat webhook: no response (%s)", type(exc).__name__)
        return None


def _worth_retrying(status: int | None) -> bool:
    return status is None or status == 429 or status >= 500


class _RefuseRedirect(urllib.request.HTTPRedirectHandler):
    """Surface a redirect as an error: urllib would follow a 302 as a GET, dropping the body."""

    def redirect_request(
        self,
        req: urllib.request.Request,
        fp: Any,
        code: int,
        msg: str,
        headers: Any,
        newurl: str,
    ) -> urllib.request.Request | None:
        return None
