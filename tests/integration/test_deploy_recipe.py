"""The systemd recipe in docs/deploy.md, run as written into a scratch root.

The shell blocks marked ``<!-- recipe:systemd -->`` are taken from the document itself and run
in one bash with ``PREFIX`` set to a temporary folder (the recipe's own switch: every file goes
under it, the paths inside point there, and the user goes into ``$PREFIX/etc/passwd``). The
block marked ``recipe:systemd:python`` (a virtualenv with torch and every dependency: minutes
and the package index) is replaced by a link to this checkout's virtualenv, where the units
expect theirs. Then the installed units pass ``systemd-analyze verify``, and node and worker
start the way their units say (command line, environment, environment file, working
directory) against the PostgreSQL database and RabbitMQ virtual host the recipe created, with
names of their own per run; everything is dropped at the end.
"""

from __future__ import annotations

import os
import re
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import tomllib
import urllib.request
from collections.abc import Iterator, Mapping
from pathlib import Path

import pytest

from plugin.settings import DestinationConfig
from plugin.task_queue import WORKER_QUEUES
from tests.peers.dcmtk import ECHOSCU, dcmtk_env
from tests.peers.ports import free_port, wait_for_port
from tests.peers.rabbitmq import rabbitmq_reachable

pytestmark = pytest.mark.postgres

ROOT = Path(__file__).parents[2]
DEPLOY_DOC = ROOT / "docs" / "deploy.md"
RECIPE = "recipe:systemd"
PYTHON_STEP = "recipe:systemd:python"
VENV_IN_PREFIX = Path("opt/pacsclip/.venv")
TOOLS = ("bash", "runuser", "psql", "rabbitmqctl", "envsubst", "openssl", "useradd", "awk")
COMMAND_TIMEOUT_S = 60
START_TIMEOUT_S = 60
# The example TOML allows this calling AE title from any address.
ALLOWED_CALLER = "PACS_MAIN"


def recipe_blocks(text: str, mark: str) -> list[str]:
    """The fenced bash blocks that directly follow ``<!-- mark -->``."""
    pattern = rf"^<!-- {re.escape(mark)} -->\n```bash\n(.*?)^```$"
    return re.findall(pattern, text, flags=re.MULTILINE | re.DOTALL)


def unit_service(unit: Path) -> dict[str, list[str]]:
    """The ``[Service]`` keys of a unit file, each with its values in order."""
    keys: dict[str, list[str]] = {}
    section = ""
    for raw in unit.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line
        elif section == "[Service]":
            key, _, value = line.partition("=")
            keys.setdefault(key, []).append(value)
    return keys


def read_env_file(path: Path) -> dict[str, str]:
    """``KEY=VALUE`` lines of a systemd environment file (these hold no quotes)."""
    pairs = (line.split("=", 1) for line in path.read_text().splitlines())
    return {kv[0].strip(): kv[1] for kv in pairs if len(kv) == 2 and not kv[0].startswith("#")}


def unit_process(
    unit: Path, instance: str, overrides: Mapping[str, str]
) -> tuple[list[str], dict[str, str], Path]:
    """Command line, environment and working directory that systemd would give the unit:
    ``Environment=``, then ``EnvironmentFile=`` over it, then ``overrides`` (a drop-in's)."""
    service = unit_service(unit)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PACSCLIP_")}
    for assignments in service.get("Environment", []):
        for item in shlex.split(assignments):
            key, _, value = item.partition("=")
            env[key] = value
    for name in service.get("EnvironmentFile", []):
        path = Path(name.removeprefix("-"))
        if path.is_file() or not name.startswith("-"):
            env.update(read_env_file(path))
    env.update(overrides)
    [exec_start] = service["ExecStart"]
    specifiers = {"%i": instance, "%H": socket.gethostname()}
    argv = [
        re.sub(r"%[iH]", lambda m: specifiers[m.group()], arg) for arg in shlex.split(exec_start)
    ]
    [workdir] = service["WorkingDirectory"]
    return argv, env, Path(workdir)


def run(*args: str, **kwargs: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(  # type: ignore[call-overload, no-any-return]
        args, capture_output=True, text=True, timeout=COMMAND_TIMEOUT_S, **kwargs
    )


def as_postgres(sql: str, **variables: str) -> subprocess.CompletedProcess[str]:
    """``sql`` through psql as the server's superuser, the way the recipe runs it."""
    options = [f"--variable={name}={value}" for name, value in variables.items()]
    return run(
        "runuser", "-u", "postgres", "--", "psql", "-q", "-At", "-v", "ON_ERROR_STOP=1",
        *options, input=sql, cwd="/",
    )  # fmt: skip


def drop_database_and_role(name: str) -> None:
    dropped = as_postgres(
        'DROP DATABASE IF EXISTS :"name" WITH (FORCE);\nDROP ROLE IF EXISTS :"name";\n', name=name
    )
    assert dropped.returncode == 0, dropped.stderr


def drop_vhost_and_user(name: str) -> None:
    for command in ("delete_vhost", "delete_user"):
        deleted = run("rabbitmqctl", "-q", command, name)
        output = deleted.stdout + deleted.stderr
        assert deleted.returncode == 0 or "does not exist" in output, output


@pytest.fixture
def names() -> Iterator[dict[str, str]]:
    """Throwaway names for the recipe's database, role, vhost and broker user; whatever the
    recipe made of them is dropped afterwards."""
    if os.geteuid() != 0:
        pytest.skip("the recipe runs as root (useradd, chown, runuser, rabbitmqctl)")
    missing = [tool for tool in TOOLS if shutil.which(tool) is None]
    if missing or not Path(ECHOSCU).exists() or shutil.which("systemd-analyze") is None:
        pytest.skip(f"missing tools: {missing or 'echoscu or systemd-analyze'}")
    if as_postgres("SELECT 1;").returncode != 0 or not rabbitmq_reachable():
        pytest.skip("PostgreSQL (local postgres account) or RabbitMQ on 127.0.0.1 is not running")
    suffix = secrets.token_hex(4)
    pg_name, mq_name = f"pacsclip_recipe_{suffix}", f"pacsclip-recipe-{suffix}"
    try:
        yield {"PG_DB": pg_name, "PG_USER": pg_name, "MQ_VHOST": mq_name, "MQ_USER": mq_name}
    finally:
        drop_database_and_role(pg_name)
        drop_vhost_and_user(mq_name)


def start(argv: list[str], env: dict[str, str], cwd: Path, log: Path) -> subprocess.Popen[bytes]:
    with log.open("ab") as out:
        return subprocess.Popen(
            argv, env=env, cwd=cwd, stdin=subprocess.DEVNULL, stdout=out, stderr=out,
            start_new_session=True,
        )  # fmt: skip


def stop(process: subprocess.Popen[bytes], timeout_s: float = 30) -> int:
    """SIGTERM to the process group we started (by its PID), as systemd stops a unit."""
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=timeout_s)
    return process.returncode


def wait_for_metrics(port: int, process: subprocess.Popen[bytes], log: Path) -> str:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        assert process.poll() is None, f"worker exited:\n{log.read_text()}"
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as answer:
                return str(answer.read().decode())
        except OSError:
            time.sleep(0.2)
    raise TimeoutError(f"worker metrics not served within {START_TIMEOUT_S} s:\n{log.read_text()}")


def test_systemd_recipe_installs_units_that_start_node_and_worker(
    names: dict[str, str], tmp_path: Path
) -> None:
    doc = DEPLOY_DOC.read_text()
    steps = recipe_blocks(doc, RECIPE)
    assert len(steps) >= 5 and len(recipe_blocks(doc, PYTHON_STEP)) == 1
    prefix = tmp_path / "root"
    (prefix / VENV_IN_PREFIX).parent.mkdir(parents=True)
    (prefix / VENV_IN_PREFIX).symlink_to(Path(sys.prefix), target_is_directory=True)

    env = {k: v for k, v in os.environ.items() if not k.startswith("PACSCLIP_")}
    installed = run(
        "bash", "-euo", "pipefail", "-c", "\n".join(steps),
        cwd=ROOT, env={**env, **names, "PREFIX": str(prefix)},
    )  # fmt: skip
    assert installed.returncode == 0, installed.stderr

    # Files, modes and the user, all under the prefix.
    etc = prefix / "etc" / "pacsclip"
    assert (etc / "pacsclip.env").stat().st_mode & 0o777 == 0o600
    passwd = {line.split(":")[0]: line.split(":") for line in (prefix / "etc/passwd").open()}
    data_dir = prefix / "var/lib/pacsclip"
    assert data_dir.stat().st_uid == int(passwd["pacsclip"][2])
    config = tomllib.loads((etc / "pacsclip.toml").read_text())
    assert Path(config["data_dir"]) == data_dir
    assert Path(config["rules_file"]) == etc / "rules.yaml" and (etc / "rules.yaml").is_file()
    assert [DestinationConfig.model_validate(d) for d in config["destinations"]]

    units = sorted((prefix / "etc/systemd/system").glob("*.service"))
    assert [u.name for u in units] == [
        "pacsclip-api.service",
        "pacsclip-node.service",
        "pacsclip-performer.service",
        "pacsclip-worker@.service",
    ]
    unit = {u.name: u for u in units}
    verified = run("systemd-analyze", "verify", "--man=no", *map(str, units))
    if "System has not been booted with systemd" in verified.stderr:
        pytest.skip("systemd-analyze verify cannot run here")
    assert verified.returncode == 0 and verified.stderr.strip() == "", verified.stderr

    # Node and worker as their units run them; a drop-in would move the node to a free
    # loopback port and give the worker a metrics port (both are off the recipe's defaults).
    dicom_port, metrics_port = free_port(), free_port()
    node_argv, node_env, node_cwd = unit_process(
        unit["pacsclip-node.service"],
        "",
        {"PACSCLIP_DICOM_HOST": "127.0.0.1", "PACSCLIP_DICOM_PORT": str(dicom_port)},
    )
    worker_argv, worker_env, worker_cwd = unit_process(
        unit["pacsclip-worker@.service"],
        "recipe",
        {"PACSCLIP_WORKER_METRICS_PORT": str(metrics_port)},
    )
    assert node_argv[0] == str(prefix / VENV_IN_PREFIX / "bin" / "pacsclip")
    assert worker_argv[-2:] == ["--name", f"recipe@{socket.gethostname()}"]
    assert names["PG_DB"] in node_env["PACSCLIP_DATABASE_URL"]
    node_log, worker_log = tmp_path / "node.log", tmp_path / "worker.log"
    node = start(node_argv, {**node_env, "TCP_NODELAY": "1"}, node_cwd, node_log)
    worker = start(worker_argv, worker_env, worker_cwd, worker_log)
    try:
        wait_for_port("127.0.0.1", dicom_port, START_TIMEOUT_S, process=node)
        echo = run(
            ECHOSCU, "-aet", ALLOWED_CALLER, "-aec", config["ae_title"], "127.0.0.1",
            str(dicom_port), env=dcmtk_env(),
        )  # fmt: skip
        assert echo.returncode == 0, echo.stdout + echo.stderr + node_log.read_text()

        assert "pacsclip_" in wait_for_metrics(metrics_port, worker, worker_log)
        consumed = run("rabbitmqctl", "-q", "list_consumers", "-p", names["MQ_VHOST"])
        queues = {line.split()[0] for line in consumed.stdout.splitlines() if line.strip()}
        assert set(WORKER_QUEUES) <= queues, consumed.stdout + consumed.stderr

        # The node made the catalog as the recipe's role, in the recipe's database.
        owners = run(
            "runuser", "-u", "postgres", "--", "psql", "-At", "-d", names["PG_DB"], "-c",
            "SELECT DISTINCT tableowner FROM pg_tables WHERE schemaname = 'public'", cwd="/",
        )  # fmt: skip
        assert owners.stdout.split() == [names["PG_USER"]], owners.stdout + owners.stderr
    finally:
        worker_status = stop(worker)
        node_status = stop(node)
    assert node_status == 0, node_log.read_text()
    assert worker_status == 0, worker_log.read_text()
