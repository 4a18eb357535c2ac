"""pacsclip's own processes (node, worker, API) as subprocesses, stopped by PID.

Each runs in its own process group, so that a node's receiver processes go with it; the
figures the soak and the fuzzer read (RSS, open file descriptors) come from ``/proc``.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

PACSCLIP = str(Path(sys.executable).with_name("pacsclip"))


def pacsclip_env(settings: Mapping[str, str]) -> dict[str, str]:
    """This environment without any PACSCLIP_* variable, plus ``settings`` and TCP_NODELAY."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PACSCLIP_")}
    return {**env, "TCP_NODELAY": "1", **settings}


class PacsclipProcess:
    """One ``pacsclip`` command; its output appended to ``log``."""

    def __init__(self, args: Sequence[str], env: Mapping[str, str], log: Path) -> None:
        self.args = list(args)
        self.env = dict(env)
        self.log = log
        self.process: subprocess.Popen[bytes] | None = None
        self.starts = 0

    def start(self) -> None:
        with self.log.open("ab") as out:
            self.process = subprocess.Popen(
                [PACSCLIP, *self.args],
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=out,
                start_new_session=True,
            )
        self.starts += 1

    @property
    def pid(self) -> int:
        if self.process is None:
            raise RuntimeError(f"pacsclip {' '.join(self.args)} is not started")
        return self.process.pid

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def kill9(self) -> None:
        """SIGKILL the whole process group (the node's receivers die with it anyway)."""
        if self.alive():
            os.killpg(self.pid, signal.SIGKILL)
            assert self.process is not None
            self.process.wait(timeout=30)

    def stop(self, timeout_s: float = 20) -> int | None:
        """SIGTERM, then SIGKILL after ``timeout_s``; returns the exit status."""
        if self.process is None:
            return None
        if self.process.poll() is None:
            os.killpg(self.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                os.killpg(self.pid, signal.SIGKILL)
                self.process.wait(timeout=30)
        _kill_group_leftovers(self.pid)
        return self.process.returncode


def _kill_group_leftovers(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        return


def process_tree(pid: int) -> list[int]:
    """``pid`` and its descendants (from /proc/PID/task/*/children)."""
    found, todo = [], [pid]
    while todo:
        current = todo.pop()
        found.append(current)
        for task in Path(f"/proc/{current}/task").glob("*"):
            try:
                todo += [int(c) for c in (task / "children").read_text().split()]
            except OSError:
                continue
    return found


def rss_kib(pids: Sequence[int]) -> int:
    total = 0
    for pid in pids:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                total += int(line.split()[1])
    return total


def fd_count(pids: Sequence[int], *, ignore_suffixes: tuple[str, ...] = ()) -> int:
    """Open file descriptors of ``pids``, leaving out files whose names end so."""
    count = 0
    for pid in pids:
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            try:
                target = os.readlink(fd)
            except OSError:
                continue  # closed meanwhile
            count += not target.endswith(ignore_suffixes) if ignore_suffixes else 1
    return count


def wait_until(
    predicate: Callable[[], bool], timeout_s: float, what: str, interval_s: float = 0.1
) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(interval_s)
    raise TimeoutError(f"{what} not within {timeout_s:.0f} s")
