"""A RabbitMQ virtual host of its own for one test, on the server running on this machine."""

from __future__ import annotations

import shutil
import socket
import subprocess
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

HOST, PORT = "127.0.0.1", 5672


def rabbitmq_reachable() -> bool:
    try:
        with socket.create_connection((HOST, PORT), timeout=2):
            return True
    except OSError:
        return False


def _rabbitmqctl(*args: str) -> None:
    subprocess.run(["rabbitmqctl", "-q", *args], check=True, capture_output=True, timeout=60)


@contextmanager
def rabbitmq_vhost() -> Iterator[str]:
    """A fresh vhost (guest may use it); yields its broker URL; deleted afterwards."""
    if shutil.which("rabbitmqctl") is None or not rabbitmq_reachable():
        pytest.skip(f"RabbitMQ is not running on {HOST}:{PORT} (or rabbitmqctl is missing)")
    vhost = f"pacsclip-test-{uuid.uuid4().hex[:12]}"
    _rabbitmqctl("add_vhost", vhost)
    try:
        _rabbitmqctl("set_permissions", "-p", vhost, "guest", ".*", ".*", ".*")
        yield f"amqp://guest:guest@{HOST}:{PORT}/{vhost}"
    finally:
        _rabbitmqctl("delete_vhost", vhost)
