"""Docker does not run here: the compose file and Dockerfile are checked as data."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from api.core.config import Settings

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((REPO / "docker-compose.yml").read_text())


def test_compose_has_the_whole_stack_with_health_checks(compose):
    services = compose["services"]
    assert set(services) == {"api", "worker", "worker-gpu", "postgres", "redis", "minio"}
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
            assert volume.split(":")[0] in declared


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
