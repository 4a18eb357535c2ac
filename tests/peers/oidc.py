"""A real OpenID Connect provider as a test peer: npm's ``oidc-provider``, which
``scripts/bootstrap`` installs into ``.cache/oidc-provider/`` once, run by node from
``tests/peers/oidc_provider.mjs`` on 127.0.0.1.

Its people (any password): ``rita`` (group pacsclip-radiologists), ``paul``
(pacsclip-pacs-admins and pacsclip-auditors) and ``nora`` (a group no role maps).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path
from types import TracebackType
from typing import Final, Self

from tests.peers.dcmtk import stop_process
from tests.peers.ports import free_port, wait_for_port

REPO_ROOT: Final = Path(__file__).resolve().parents[2]
OIDC_PROVIDER_VERSION: Final = "9.13.3"
MODULE: Final = (
    REPO_ROOT
    / ".cache"
    / "oidc-provider"
    / OIDC_PROVIDER_VERSION
    / "node_modules"
    / "oidc-provider"
    / "lib"
    / "index.js"
)
SCRIPT: Final = Path(__file__).with_name("oidc_provider.mjs")


def provider_installed() -> bool:
    return MODULE.is_file() and shutil.which("node") is not None


class OidcProvider:
    """``with OidcProvider(redirect_uri) as idp:`` a provider at ``idp.issuer``."""

    def __init__(
        self,
        redirect_uri: str,
        log: Path,
        *,
        client_id: str = "pacsclip-dashboard",
        client_secret: str = "test-client-secret",
        port: int | None = None,
    ) -> None:
        self.port = port or free_port()
        self.issuer = f"http://127.0.0.1:{self.port}"
        self.client_id, self.client_secret = client_id, client_secret
        self.redirect_uri, self.log = redirect_uri, log
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> Self:
        env = {
            **os.environ,
            "OIDC_PORT": str(self.port),
            "OIDC_CLIENT_ID": self.client_id,
            "OIDC_CLIENT_SECRET": self.client_secret,
            "OIDC_REDIRECT_URI": self.redirect_uri,
            "OIDC_PROVIDER_MODULE": MODULE.as_uri(),
        }
        with self.log.open("ab") as out:
            self.process = subprocess.Popen(
                ["node", str(SCRIPT)], env=env, stdout=out, stderr=subprocess.STDOUT
            )
        wait_for_port("127.0.0.1", self.port, 20, process=self.process)
        return self

    def stop(self) -> None:
        if self.process is not None:
            stop_process(self.process)
            self.process = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        self.stop()
