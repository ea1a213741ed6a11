"""Docker does not run here: the compose file, the Dockerfile and the deploy/ configs (HAProxy,
Prometheus, alert rules) are checked as data, against the CLI, the settings and the metrics the
code really has."""
from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import typer
import yaml

from api.cli import app as cli_app
from api.core.config import Settings

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((REPO / "docker-compose.yml").read_text())


def test_compose_has_the_whole_stack_with_health_checks(compose):
    services = compose["services"]
    assert set(services) == {"lb", "api", "worker", "worker-gpu", "postgres", "redis", "minio",
                             "prometheus"}
    assert services["worker"]["command"][-2:] == ["--device", "cpu"]
    assert services["worker-gpu"]["command"][-2:] == ["--device", "cuda"]
    assert services["worker-gpu"]["profiles"] == ["gpu"]
    for name, service in services.items():
        assert "healthcheck" in service, f"{name} has no health check"
    assert services["api"]["command"][:2] == ["speft", "serve"]
    assert services["worker"]["command"][:2] == ["speft", "worker"]
    declared = set(compose["volumes"])
    for service in services.values():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("./"):  # a bind mount of a file of this repository
                assert (REPO / source).is_file(), f"{source} is not in the repository"
            else:
                assert source in declared


def _parse_speft(argv: list[str]) -> typer.Context:
    """argv (after `speft`) parsed by the real CLI; a bad option raises the CLI's usage error."""
    group = typer.main.get_command(cli_app)
    with typer.Context(group, info_name="speft") as parent:
        command = group.get_command(parent, argv[0])
        if command is None:
            raise LookupError(f"no such command: {argv[0]}")
        return command.make_context(argv[0], list(argv[1:]), parent=parent)


def test_every_speft_command_in_compose_is_one_the_cli_takes(compose):
    for name in ("api", "worker", "worker-gpu"):
        command = compose["services"][name]["command"]
        assert command[0] == "speft"
        context = _parse_speft(command[1:])
        assert context.info_name == command[1]
    with pytest.raises(Exception, match="No such option: --no-such-option"):
        _parse_speft(["serve", "--no-such-option"])
    with pytest.raises(LookupError):
        _parse_speft(["no-such-command"])


def test_ports_agree_from_the_balancer_to_the_replicas(compose):
    """The API listens where compose exposes it and HAProxy sends; HAProxy binds the port the
    balancer publishes; the replicas publish nothing themselves (all traffic via the balancer)."""
    services = compose["services"]
    serve = _parse_speft(services["api"]["command"][1:])
    port = serve.params["port"]
    assert services["api"]["expose"] == [str(port)] and "ports" not in services["api"]
    haproxy = (REPO / "deploy" / "haproxy.cfg").read_text()
    servers = re.findall(r"^\s*server-template \S+ \d+ api:(\d+)", haproxy, re.MULTILINE)
    assert servers and set(servers) == {str(port)}
    bind = re.search(r"^\s*bind :(\d+)", haproxy, re.MULTILINE).group(1)
    assert services["lb"]["ports"] == [f"{bind}:{bind}"]
    prometheus = yaml.safe_load((REPO / "deploy" / "prometheus.yml").read_text())
    target = prometheus["scrape_configs"][0]["dns_sd_configs"][0]
    assert (target["names"], target["port"]) == (["api"], port)
    assert "/etc/prometheus/alerts.yml" in prometheus["rule_files"]


@pytest.mark.skipif(shutil.which("haproxy") is None, reason="haproxy not installed")
def test_the_haproxy_config_is_valid_for_haproxy_itself():
    checked = subprocess.run(["haproxy", "-c", "-f", str(REPO / "deploy" / "haproxy.cfg")],
                             capture_output=True, text=True, check=False)
    assert checked.returncode == 0, checked.stdout + checked.stderr


def test_every_metric_the_alerts_use_is_one_the_api_exposes(make_client):
    rules = yaml.safe_load((REPO / "deploy" / "alerts.yml").read_text())
    alerts = {rule["alert"]: rule["expr"] for group in rules["groups"] for rule in group["rules"]}
    assert {"SpeftQueueBacklog", "SpeftWorkerHeartbeatStale", "SpeftJobsFailing",
            "SpeftAdapterCacheHitRateLow", "SpeftInferenceLatencyHigh"} <= set(alerts)
    client = make_client()
    assert client.get("/healthz").status_code == 200  # a request: the HTTP families have samples
    exposed = set()
    for family in client.app.state.metrics_registry.collect():
        exposed.add(family.name)
        exposed.update(sample.name for sample in family.samples)
    exposed.update(f"{name}_total" for name in list(exposed))
    exposed.update(f"{name}_bucket" for name in list(exposed))
    for alert, expr in alerts.items():
        for metric in re.findall(r"\bspeft_[a-z_]+", expr):
            assert metric in exposed, f"{alert} uses {metric}, which the API does not expose"


def test_compose_settings_are_the_ones_the_code_reads(compose):
    fields = set(Settings.model_fields)
    for name in ("api", "worker", "worker-gpu"):
        env = compose["services"][name]["environment"]
        speft_vars = {k for k in env if k.startswith("SPEFT_")}
        assert speft_vars >= {"SPEFT_DATABASE_URL", "SPEFT_BROKER_URL", "SPEFT_STORAGE_URL",
                              "SPEFT_S3_ENDPOINT_URL", "SPEFT_API_KEYS"}
        for var in speft_vars:
            assert var.removeprefix("SPEFT_").lower() in fields, f"{var} is not a setting"
        values = {k: v for k, v in env.items() if k.startswith("SPEFT_") and "${" not in str(v)}
        Settings(**{k.removeprefix("SPEFT_").lower(): v for k, v in values.items()})


def test_compose_database_and_bucket_match_their_services(compose):
    env = compose["services"]["api"]["environment"]
    pg = compose["services"]["postgres"]["environment"]
    url = env["SPEFT_DATABASE_URL"]
    assert f"{pg['POSTGRES_USER']}:{pg['POSTGRES_PASSWORD']}@postgres:5432/{pg['POSTGRES_DB']}" in url
    minio = compose["services"]["minio"]["environment"]
    assert env["AWS_ACCESS_KEY_ID"] == minio["MINIO_ROOT_USER"]
    assert env["AWS_SECRET_ACCESS_KEY"] == minio["MINIO_ROOT_PASSWORD"]
    assert env["SPEFT_S3_ENDPOINT_URL"] == "http://minio:9000"
    assert env["SPEFT_BROKER_URL"].startswith("redis://redis:6379")


def test_dockerfile_is_non_root_with_a_cuda_build_arg():
    text = (REPO / "Dockerfile").read_text()
    assert re.search(r"^ARG BASE_IMAGE=", text, re.MULTILINE)
    assert re.search(r"^FROM \$\{BASE_IMAGE\}", text, re.MULTILINE)
    users = re.findall(r"^USER (\S+)", text, re.MULTILINE)
    assert users and users[-1] not in ("root", "0")
    assert "torch==${TORCH_VERSION}" in text
    for folder in re.findall(r"^COPY (\S+) \./", text, re.MULTILINE):
        for part in folder.split():
            assert (REPO / part).exists(), f"Dockerfile copies missing {part}"
