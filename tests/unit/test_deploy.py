"""The deployment files: the settings table in docs/deploy.md, the PACSCLIP_* names they use,
the Kubernetes manifests, the compose file and the systemd units."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from typer.testing import CliRunner

from plugin.cli.main import app
from plugin.settings import Settings

ROOT = Path(__file__).parents[2]
DEPLOY = ROOT / "deploy"
DEPLOY_DOC = ROOT / "docs" / "deploy.md"
COMPOSE_FILE = DEPLOY / "compose" / "compose.yaml"
K8S_FILES = sorted((DEPLOY / "k8s").glob("*.yaml"))
SYSTEMD_UNITS = sorted((DEPLOY / "systemd").glob("*.service"))
# Environment names that are not fields of Settings but are read by the command line.
CLI_ENV_VARS = {"PACSCLIP_CONFIG"}
ENV_NAME = re.compile(r"\bPACSCLIP_[A-Z0-9]+(?:_[A-Z0-9]+)*")
SUBPROCESS_TIMEOUT_S = 60


def load_all(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def test_settings_table_in_the_deploy_doc_is_the_generated_reference() -> None:
    result = CliRunner().invoke(app, ["config", "reference"])
    assert result.exit_code == 0, result.output

    text = DEPLOY_DOC.read_text()
    begin, end = "<!-- settings:begin -->\n", "<!-- settings:end -->"
    documented = text[text.index(begin) + len(begin) : text.index(end)]

    assert documented == result.output, "regenerate with `pacsclip config reference`"
    for name in Settings.model_fields:
        assert f"`PACSCLIP_{name.upper()}`" in documented


def test_reference_masks_secrets_and_shows_defaults() -> None:
    out = CliRunner().invoke(app, ["config", "reference"]).output
    rows = {line.split(" | ")[0].strip("| `"): line for line in out.splitlines()[2:]}

    assert set(rows) == set(Settings.model_fields)
    assert "| `11112` |" in rows["dicom_port"]
    assert "| unset |" in rows["api_token"]
    assert '`["calling_ae_title", "InstitutionName"]`' in rows["site_tags"]
    assert "`str \\| None`" in rows["database_url"]


def deploy_text_files() -> list[Path]:
    files = [COMPOSE_FILE, DEPLOY / "compose" / ".env.example", *K8S_FILES, *SYSTEMD_UNITS]
    files += sorted((DEPLOY / "systemd").glob("*.example"))
    return files


def test_every_pacsclip_variable_in_deploy_is_a_real_setting() -> None:
    known = {f"PACSCLIP_{name.upper()}" for name in Settings.model_fields} | CLI_ENV_VARS
    used: dict[str, set[str]] = {}
    for path in deploy_text_files():
        for name in ENV_NAME.findall(path.read_text()):
            used.setdefault(name, set()).add(str(path.relative_to(ROOT)))

    unknown = {name: sorted(files) for name, files in used.items() if name not in known}
    assert not unknown, f"not settings: {unknown}"
    # The parse found what the files are built on, so an empty scan cannot pass.
    assert {"PACSCLIP_DATABASE_URL", "PACSCLIP_BROKER_URL", "PACSCLIP_API_TOKEN"} <= set(used)


def test_k8s_manifests_parse_with_the_expected_kinds() -> None:
    docs = [doc for path in K8S_FILES for doc in load_all(path)]
    kinds = {doc["kind"] for doc in docs}

    assert {
        "StatefulSet",
        "Deployment",
        "HorizontalPodAutoscaler",
        "Service",
        "Ingress",
        "Secret",
        "ConfigMap",
    } <= kinds
    by_kind_name = {(doc["kind"], doc["metadata"]["name"]): doc for doc in docs}
    node = by_kind_name[("StatefulSet", "pacsclip-node")]["spec"]["template"]["spec"]
    probe = node["containers"][0]["livenessProbe"]["exec"]["command"]
    assert probe[:5] == ["pacsclip", "echo", "127.0.0.1", "11112", "--aec"]
    assert node["terminationGracePeriodSeconds"] > Settings.model_fields["drain_timeout_s"].default
    service = by_kind_name[("Service", "pacsclip-node")]["spec"]
    assert service["ports"][0]["port"] == 11112
    hpa = by_kind_name[("HorizontalPodAutoscaler", "pacsclip-worker")]
    assert hpa["apiVersion"] == "autoscaling/v2"
    api = by_kind_name[("Deployment", "pacsclip-api")]["spec"]["template"]["spec"]
    assert api["containers"][0]["readinessProbe"]["httpGet"]["path"] == "/api/health"


def run_tool(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, timeout=SUBPROCESS_TIMEOUT_S)


@pytest.mark.parametrize("manifest", K8S_FILES, ids=lambda p: p.name)
def test_k8s_manifest_passes_kubectl(manifest: Path) -> None:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not on PATH")
    applied = run_tool(
        kubectl, "apply", "--dry-run=client", "--validate=false", "-o", "name", "-f", str(manifest)
    )
    if applied.returncode != 0 and "unable to recognize" in applied.stderr:
        # `apply --dry-run=client` still asks a cluster for its API groups; without one,
        # decode the objects offline instead.
        applied = run_tool(
            kubectl, "label", "--local", "--dry-run=client", "-o", "name", "-f", str(manifest),
            "pacsclip.dev/checked=yes",
        )  # fmt: skip
    assert applied.returncode == 0, applied.stderr

    expected = [doc["metadata"]["name"] for doc in load_all(manifest)]
    printed = [line.rsplit("/", 1)[-1] for line in applied.stdout.split()]
    assert printed == expected


def test_compose_file_parses_with_the_expected_services() -> None:
    compose = yaml.safe_load(COMPOSE_FILE.read_text())
    services = compose["services"]

    assert set(services) >= {"node", "worker", "api", "postgres", "rabbitmq", "orthanc"}
    assert all("healthcheck" in service for service in services.values())
    assert services["node"]["command"] == ["node"]
    assert services["worker"]["command"] == ["worker"]
    assert "container_name" not in services["worker"]  # --scale worker=N needs that
    assert "ports" not in services["worker"]
    assert {"pacsclip-data", "pacsclip-models"} <= set(compose["volumes"])


def test_compose_file_passes_docker_compose_config() -> None:
    docker = shutil.which("docker")
    if docker is None:
        pytest.skip("docker is not on PATH")
    try:
        version = run_tool(docker, "compose", "version")
    except subprocess.TimeoutExpired:
        pytest.skip("`docker compose version` did not answer")
    if version.returncode != 0:
        reason = (version.stderr.strip().splitlines() or ["no output"])[0]
        pytest.skip(f"`docker compose` is not available: {reason}")
    env = COMPOSE_FILE.with_name(".env.example")
    checked = run_tool(
        docker, "compose", "-f", str(COMPOSE_FILE), "--env-file", str(env), "config", "-q"
    )
    assert checked.returncode == 0, checked.stderr


def test_systemd_units_pass_systemd_analyze_verify(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not on PATH")
    # The units run /opt/pacsclip/.venv/bin/pacsclip, which does not exist here: verify copies
    # that run this checkout's command instead (verify checks that ExecStart is executable).
    pacsclip = Path(sys.executable).with_name("pacsclip")
    for unit in SYSTEMD_UNITS:
        text = unit.read_text().replace("/opt/pacsclip/.venv/bin/pacsclip", str(pacsclip))
        (tmp_path / unit.name).write_text(text)
    names = {unit.name for unit in SYSTEMD_UNITS}
    assert names == {
        "pacsclip-node.service",
        "pacsclip-worker@.service",
        "pacsclip-api.service",
        "pacsclip-performer.service",
    }

    checked = run_tool(analyze, "verify", "--man=no", *sorted(str(p) for p in tmp_path.iterdir()))
    if checked.returncode != 0 and "System has not been booted with systemd" in checked.stderr:
        pytest.skip("systemd-analyze verify cannot run here")
    # verify exits 0 on unknown keys or bad values, but says so: any output is a finding.
    assert checked.returncode == 0, checked.stderr
    assert checked.stderr.strip() == "", checked.stderr


def test_systemd_units_are_hardened_and_read_the_environment_file() -> None:
    for unit in SYSTEMD_UNITS:
        lines = set(unit.read_text().splitlines())
        for line in (
            "Restart=on-failure",
            "User=pacsclip",
            "EnvironmentFile=-/etc/pacsclip/pacsclip.env",
            "ProtectSystem=strict",
            "ReadWritePaths=/var/lib/pacsclip",
            "NoNewPrivileges=yes",
            "PrivateTmp=yes",
            "ProtectHome=yes",
            "KillSignal=SIGTERM",
            "TimeoutStopSec=30",
        ):
            assert line in lines, f"{unit.name}: {line}"
    worker = (DEPLOY / "systemd" / "pacsclip-worker@.service").read_text()
    assert "worker --name %i@%H" in worker


def test_every_deploy_example_starts_with_no_live_model() -> None:
    """A clinical install must not send the synthetic demo's results: each example runs the
    demo in shadow, while the embedded default (the quick start) keeps it live."""
    from plugin.settings import load_settings

    compose_env = yaml.safe_load(COMPOSE_FILE.read_text())["x-pacsclip"]["environment"]
    configmap = next(
        doc for doc in load_all(DEPLOY / "k8s" / "configmap.yaml") if doc["kind"] == "ConfigMap"
    )
    toml_settings = load_settings(DEPLOY / "pacsclip.example.toml")

    assert compose_env["PACSCLIP_DEMO_MODEL"] == "shadow"
    assert configmap["data"]["PACSCLIP_DEMO_MODEL"] == "shadow"
    assert toml_settings.demo_model == "shadow"
    assert Settings().demo_model == "live"


def test_every_example_config_names_a_destination_marked_to_edit() -> None:
    """Each example sends results somewhere, says where to edit that, and the TOML example
    configures every destination its routing rules example names."""
    from dicom_node.routing import ALL_DESTINATIONS, load_rules
    from plugin.settings import DestinationConfig, load_settings

    toml_file = DEPLOY / "pacsclip.example.toml"
    configmap_file = DEPLOY / "k8s" / "configmap.yaml"
    compose_env = yaml.safe_load(COMPOSE_FILE.read_text())["x-pacsclip"]["environment"]
    configmap = next(doc for doc in load_all(configmap_file) if doc["kind"] == "ConfigMap")

    toml_settings = load_settings(toml_file)
    for listed in (
        compose_env["PACSCLIP_DESTINATIONS"],
        configmap["data"]["PACSCLIP_DESTINATIONS"],
    ):
        parsed = [DestinationConfig.model_validate(d) for d in yaml.safe_load(listed)]
        assert parsed
    named = {d.name for d in toml_settings.destinations}
    rules = load_rules(DEPLOY / "rules.example.yaml")
    assert rules.destination_names - {ALL_DESTINATIONS} <= named
    for path in (toml_file, configmap_file, COMPOSE_FILE):
        lines = path.read_text().splitlines()
        at = next(
            i
            for i, line in enumerate(lines)
            if re.match(r"\s*(destinations|PACSCLIP_DESTINATIONS)\b", line)
        )
        assert "EDIT" in "\n".join(lines[max(0, at - 4) : at]), f"{path.name}: no EDIT note"


def test_image_and_systemd_recipe_install_every_features_dependencies() -> None:
    """Every pyproject extra but the test tools, and medspacy (not in pyproject), go into the
    image and into the recipe's virtualenv the same way scripts/bootstrap installs them."""
    import tomllib

    extras = set(
        tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    )
    runtime = ",".join(sorted(extras - {"dev"}))
    dockerfile = (DEPLOY / "compose" / "Dockerfile").read_text()
    python_step = DEPLOY_DOC.read_text().split("<!-- recipe:systemd:python -->", 1)[1]
    python_step = python_step.split("```", 2)[1]

    for text in (dockerfile, python_step):
        assert f'".[{runtime}]"' in text
        assert "scripts/install-medspacy" in text
    assert (
        "!scripts/install-medspacy" in (DEPLOY / "compose" / "Dockerfile.dockerignore").read_text()
    )
    assert (
        "scripts/install-medspacy .venv/bin/python" in (ROOT / "scripts" / "bootstrap").read_text()
    )
    assert "medspacy==" in (ROOT / "scripts" / "install-medspacy").read_text()


def test_compose_mounts_a_folder_of_bundles_to_install() -> None:
    volumes = yaml.safe_load(COMPOSE_FILE.read_text())["x-pacsclip"]["volumes"]

    assert "./models:/models:ro" in volumes
    assert "pacsclip-models:/var/lib/pacsclip/models" in volumes
    assert "pacsclip model install /models/" in DEPLOY_DOC.read_text()


def test_the_recipe_fills_in_every_placeholder_of_the_environment_file() -> None:
    placeholders = set(
        re.findall(r"\$\{(\w+)\}", (DEPLOY / "systemd" / "pacsclip.env.example").read_text())
    )
    [listed] = re.findall(r"envsubst '([^']*)'", DEPLOY_DOC.read_text())

    assert placeholders == {name.lstrip("$") for name in listed.split()}
    assert {"PG_PASSWORD", "MQ_PASSWORD", "API_TOKEN"} <= placeholders


def test_worker_and_node_probes_call_their_health_endpoints() -> None:
    docs = [doc for path in K8S_FILES for doc in load_all(path)]
    by_kind_name = {(doc["kind"], doc["metadata"]["name"]): doc for doc in docs}
    for kind, name, env_name in (
        ("Deployment", "pacsclip-worker", "PACSCLIP_WORKER_METRICS_PORT"),
        ("StatefulSet", "pacsclip-node", "PACSCLIP_NODE_METRICS_PORT"),
    ):
        [container] = by_kind_name[(kind, name)]["spec"]["template"]["spec"]["containers"]
        env = {item["name"]: item["value"] for item in container["env"]}
        ports = {port["name"]: port["containerPort"] for port in container["ports"]}
        assert ports["metrics"] == int(env[env_name]), name
        assert container["startupProbe"]["httpGet"] == {"path": "/health", "port": "metrics"}
    [worker] = by_kind_name[("Deployment", "pacsclip-worker")]["spec"]["template"]["spec"][
        "containers"
    ]
    assert worker["readinessProbe"]["httpGet"]["path"] == "/health"

    services = yaml.safe_load(COMPOSE_FILE.read_text())["services"]
    for name, env_name in (
        ("worker", "PACSCLIP_WORKER_METRICS_PORT"),
        ("node", "PACSCLIP_NODE_METRICS_PORT"),
    ):
        port = services[name]["environment"][env_name]
        assert f"http://127.0.0.1:{port}/health" in " ".join(services[name]["healthcheck"]["test"])
