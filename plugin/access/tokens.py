"""Named machine tokens (scripts, integrations, Prometheus), each with its roles.

Kept in ``<data_dir>/api-tokens.json`` (mode 0600) as SHA-256 digests only: the token itself
is shown once, when it is made. Revoking keeps the entry, marked, so ``pacsclip tokens list``
still shows what existed. The API re-reads the file when it changes, so a revocation takes
effect at the next request of every API process, without a restart.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
import threading
from dataclasses import asdict, dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Final

from plugin.errors import PacsclipError
from plugin.roles import Role

TOKENS_FILE: Final = "api-tokens.json"
TOKEN_PREFIX: Final = "pcl_"
NAME_PATTERN: Final = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


class TokenError(PacsclipError):
    """A token cannot be made or revoked as asked."""


@dataclass(frozen=True)
class MachineToken:
    name: str
    sha256: str
    roles: tuple[Role, ...]
    created_at: str
    revoked_at: str | None = None

    @property
    def active(self) -> bool:
        return self.revoked_at is None


def digest(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


class TokenStore:
    """The tokens file of one data directory."""

    def __init__(self, data_dir: Path) -> None:
        self.path = Path(data_dir) / TOKENS_FILE
        self._lock = threading.Lock()
        self._seen: tuple[int, int] | None = None
        self._cached: list[MachineToken] = []

    def all(self) -> list[MachineToken]:
        """Every token ever made here, revoked ones included; re-read when the file changed."""
        try:
            stat = self.path.stat()
        except FileNotFoundError:
            return []
        seen = (stat.st_mtime_ns, stat.st_size)
        with self._lock:
            if seen != self._seen:
                self._cached = _parse(self.path)
                self._seen = seen
            return list(self._cached)

    def match(self, presented: str) -> MachineToken | None:
        """The active token that ``presented`` is, if any (compared in constant time)."""
        candidate = digest(presented)
        found = None
        for token in self.all():
            if secrets.compare_digest(candidate, token.sha256) and token.active:
                found = token
        return found

    def create(self, name: str, roles: list[Role]) -> str:
        """Make a token; returns the token itself, which is stored nowhere."""
        if not NAME_PATTERN.fullmatch(name):
            raise TokenError(
                f"token name {name!r}: use letters, digits, '.', '_' or '-' (at most 64)"
            )
        if not roles:
            raise TokenError("a token needs at least one role: --role " + " | --role ".join(Role))
        existing = self.all()
        if any(t.name == name and t.active for t in existing):
            raise TokenError(f"a token named {name!r} exists: revoke it first or pick another")
        token = TOKEN_PREFIX + secrets.token_urlsafe(32)
        entry = MachineToken(
            name=name,
            sha256=digest(token),
            roles=tuple(sorted(set(roles))),
            created_at=datetime.now(UTC).isoformat(timespec="seconds"),
        )
        self._write([*existing, entry])
        return token

    def revoke(self, name: str) -> MachineToken:
        existing = self.all()
        active = [t for t in existing if t.name == name and t.active]
        if not active:
            raise TokenError(f"no active token named {name!r} (see pacsclip tokens list)")
        now = datetime.now(UTC).isoformat(timespec="seconds")
        revoked = replace(active[0], revoked_at=now)
        self._write([revoked if t is active[0] else t for t in existing])
        return revoked

    def _write(self, tokens: list[MachineToken]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        text = json.dumps({"tokens": [_as_json(t) for t in tokens]}, indent=2) + "\n"
        partial = self.path.with_suffix(".tmp")
        fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            out.write(text)
            out.flush()
            os.fsync(out.fileno())
        os.replace(partial, self.path)


def _as_json(token: MachineToken) -> dict[str, object]:
    data = asdict(token)
    data["roles"] = [str(r) for r in token.roles]
    return data


def _parse(path: Path) -> list[MachineToken]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        return [
            MachineToken(
                name=str(item["name"]),
                sha256=str(item["sha256"]),
                roles=tuple(Role(r) for r in item["roles"]),
                created_at=str(item["created_at"]),
                revoked_at=item.get("revoked_at"),
            )
            for item in data["tokens"]
        ]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise TokenError(
            f"{path} is not a pacsclip tokens file ({type(exc).__name__}): restore it from a "
            "backup, or remove it and make the tokens again with pacsclip tokens create"
        ) from exc
