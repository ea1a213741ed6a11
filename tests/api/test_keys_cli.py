"""`speft keys`: API keys made, listed and revoked from the command line, stored only as sha256 and
a display prefix; open mode only while neither SPEFT_API_KEYS nor the database holds a key."""
from __future__ import annotations

import logging
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
from click.testing import Result
from fastapi.testclient import TestClient
from sqlalchemy import create_engine, select, text
from typer.testing import CliRunner

from api.cli import app as cli
from api.cli.launcher import serves_open
from api.core.config import Settings
from api.core.models import ApiKey, hash_api_key
from api.main import create_app
from tests.api.conftest import ClientFactory
from tests.fixtures.processes import REPO, kill, service_env, spawn_cli
from tests.fixtures.s3 import _free_port

runner = CliRunner()
KEY_RE = re.compile(r"^sk-[A-Za-z0-9_-]{43}$")
LONG_A = "alice-key-0123456789abcdef"
LONG_B = "bob-key-0123456789abcdef"
SERVE_EXIT_TIMEOUT_S = 60.0


def keys(database_url: str, *args: str) -> Result:
    """Run `speft keys ARGS` against `database_url` with no SPEFT_API_KEYS."""
    return runner.invoke(cli, ["keys", *args],
                         env={"SPEFT_DATABASE_URL": database_url, "SPEFT_API_KEYS": ""})


def create_key(database_url: str, tenant: str) -> str:
    """A new key for `tenant`, as `speft keys create` prints it."""
    result = keys(database_url, "create", "--tenant", tenant)
    assert result.exit_code == 0, result.output
    key = result.stdout.strip()
    assert KEY_RE.match(key), result.stdout
    assert "shown only now" in result.stderr and key not in result.stderr
    return key


def bearer(key: str) -> dict[str, str]:
    """The Authorization header for `key`."""
    return {"Authorization": f"Bearer {key}"}


def test_created_key_authenticates_and_revoked_key_is_401_at_once(
        backend_settings: dict[str, Any], make_client: ClientFactory) -> None:
    key = create_key(backend_settings["database_url"], "acme")
    client = make_client(**backend_settings)  # SPEFT_API_KEYS empty: the stored key closes it
    assert client.get("/v1/files").status_code == 401
    uploaded = client.post("/v1/files", files={"file": ("d.jsonl", b'{"text": "a"}\n')},
                           data={"purpose": "fine-tune"}, headers=bearer(key))
    assert uploaded.status_code == 200, uploaded.text
    assert client.get("/v1/files", headers=bearer(key)).json()["data"][0]["id"] == (
        uploaded.json()["id"])

    revoked = keys(backend_settings["database_url"], "revoke", key[:8])
    assert revoked.exit_code == 0, revoked.output
    response = client.get("/v1/files", headers=bearer(key))  # the same running API
    assert response.status_code == 401
    assert response.json()["error"]["code"] == "invalid_api_key"
    assert keys(backend_settings["database_url"], "revoke", key[:8]).exit_code == 0  # idempotent


def test_database_holds_no_plaintext_key(backend_settings: dict[str, Any]) -> None:
    url = backend_settings["database_url"]
    key = create_key(url, "acme")
    engine = create_engine(url)
    try:
        with engine.connect() as connection:
            rows = connection.execute(text("SELECT * FROM api_keys")).all()
            stored = connection.execute(select(ApiKey.key_hash, ApiKey.prefix)).one()
    finally:
        engine.dispose()
    assert rows and not any(key in str(value) for row in rows for value in row)
    assert stored == (hash_api_key(key), key[:8])
    if url.startswith("sqlite"):  # not in the file either (nor its write-ahead log)
        database = Path(url.removeprefix("sqlite:///"))
        for path in (database, database.with_name(database.name + "-wal")):
            assert not path.exists() or key.encode() not in path.read_bytes()


def test_list_shows_ids_and_prefixes_never_keys(sqlite_url: str) -> None:
    first, second = create_key(sqlite_url, "acme"), create_key(sqlite_url, "beta")
    assert keys(sqlite_url, "revoke", first[:8]).exit_code == 0
    listed = keys(sqlite_url, "list")
    assert listed.exit_code == 0, listed.output
    assert first not in listed.output and second not in listed.output
    assert "2 key(s)" in listed.stdout
    rows = {line.split()[1]: line.split() for line in listed.stdout.splitlines()
            if line.strip().startswith("key-")}  # the first line of each row: id, prefix, tenant
    assert rows.keys() == {first[:8], second[:8]}
    assert (rows[first[:8]][2], rows[second[:8]][2]) == ("acme", "beta")
    only_beta = keys(sqlite_url, "list", "--tenant", "beta").stdout
    assert "1 key(s)" in only_beta and second[:8] in only_beta and first[:8] not in only_beta


@pytest.mark.parametrize("database", ["sqlite_url", "empty_postgres_url"])
def test_keys_work_on_a_fresh_database(database: str, request: pytest.FixtureRequest) -> None:
    url = request.getfixturevalue(database)  # never migrated: the command migrates it
    create_key(url, "acme")
    assert "1 key(s)" in keys(url, "list").stdout


def test_create_refuses_a_bad_tenant_and_revoke_an_unknown_key(sqlite_url: str) -> None:
    bad_tenant = keys(sqlite_url, "create", "--tenant", "no spaces")
    assert bad_tenant.exit_code == 2 and "(tenant)" in bad_tenant.stderr
    unknown = keys(sqlite_url, "revoke", "sk-nope")
    assert unknown.exit_code == 2 and "no API key has the id or prefix" in unknown.stderr


def test_revoke_needs_an_unambiguous_prefix(make_client: ClientFactory, tmp_path: Path) -> None:
    client = make_client(api_keys=f"{LONG_A}:alice,{LONG_A[:8]}-other-key-xyz:bob")
    url = f"sqlite:///{tmp_path / 'speft.db'}"
    ambiguous = keys(url, "revoke", LONG_A[:8])
    assert ambiguous.exit_code == 2 and "give the id" in ambiguous.stderr
    with client.app.state.sessions() as session:
        key_id = session.scalar(select(ApiKey.id).where(ApiKey.key_hash == hash_api_key(LONG_A)))
    assert keys(url, "revoke", key_id).exit_code == 0
    assert client.get("/v1/files", headers=bearer(LONG_A)).status_code == 401


def test_open_mode_only_without_configured_or_stored_keys(make_client: ClientFactory,
                                                          tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'speft.db'}"
    settings = Settings(database_url=url)
    open_client = make_client()
    assert open_client.get("/v1/files").status_code == 200 and serves_open(settings)

    key = create_key(url, "acme")
    assert not serves_open(settings)
    assert open_client.get("/v1/files").status_code == 200  # decided at start-up: until restart
    restarted = make_client()
    assert restarted.get("/v1/files").status_code == 401
    assert restarted.get("/v1/files", headers=bearer(key)).status_code == 200

    assert keys(url, "revoke", key[:8]).exit_code == 0
    assert serves_open(settings) and make_client().get("/v1/files").status_code == 200
    assert not serves_open(Settings(database_url=url, api_keys=f"{LONG_A}:alice"))


def test_serve_says_open_mode_considers_stored_keys(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'speft.db'}"
    env = {"SPEFT_DATABASE_URL": url, "SPEFT_API_KEYS": ""}
    refused = runner.invoke(cli, ["serve", "--host", "0.0.0.0"], env=env)
    assert refused.exit_code == 2
    assert "open mode binds to 127.0.0.1 only; set SPEFT_API_KEYS or create a key" in (
        refused.stderr)


def test_key_taken_out_of_the_environment_is_refused_until_configured_again(
        make_client: ClientFactory, caplog: pytest.LogCaptureFixture) -> None:
    make_client(api_keys=f"{LONG_A}:alice,{LONG_B}:bob")
    with caplog.at_level(logging.WARNING, logger="api.services.tenants"):
        client = make_client(api_keys=f"{LONG_B}:bob")
    assert LONG_A[:8] in caplog.text and LONG_A not in caplog.text  # the prefix, never the key
    assert LONG_B[:8] not in caplog.text
    assert client.get("/v1/files", headers=bearer(LONG_A)).status_code == 401
    assert client.get("/v1/files", headers=bearer(LONG_B)).status_code == 200
    again = make_client(api_keys=f"{LONG_A}:alice,{LONG_B}:bob")
    assert again.get("/v1/files", headers=bearer(LONG_A)).status_code == 200


def test_configured_key_works_again_after_one_start_without_any(make_client: ClientFactory) -> None:
    make_client(api_keys=f"{LONG_A}:alice")
    assert make_client().get("/v1/files").status_code == 200  # a start without SPEFT_API_KEYS
    client = make_client(api_keys=f"{LONG_A}:alice")
    response = client.get("/v1/files", headers=bearer(LONG_A))
    assert response.status_code == 200, response.text


def test_revoked_configured_key_stays_revoked_when_configured_again(
        make_client: ClientFactory, tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'speft.db'}"
    make_client(api_keys=f"{LONG_A}:alice,{LONG_B}:bob")
    assert keys(url, "revoke", LONG_A[:8]).exit_code == 0
    make_client(api_keys=f"{LONG_B}:bob")
    again = make_client(api_keys=f"{LONG_A}:alice,{LONG_B}:bob")
    assert again.get("/v1/files", headers=bearer(LONG_A)).status_code == 401
    assert again.get("/v1/files", headers=bearer(LONG_B)).status_code == 200


def _serve_until_exit(args: list[str], tmp_path: Path, **speft: str) -> tuple[int | None, str]:
    """Run `speft serve ARGS` as a real process until it exits (its code and output), or for
    SERVE_EXIT_TIMEOUT_S (None: it was still serving, then killed)."""
    log_path = tmp_path / "serve.log"
    env = service_env(SPEFT_DATABASE_URL=f"sqlite:///{tmp_path / 'speft.db'}",
                      SPEFT_STORAGE_URL=f"file://{tmp_path / 'storage'}", **speft)
    with log_path.open("wb") as log:
        process = spawn_cli(["serve", *args, "--port", str(_free_port())], env, REPO, log)
        try:
            code: int | None = process.wait(timeout=SERVE_EXIT_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            code = None
        finally:
            kill(process)
    return code, log_path.read_text(errors="replace")


def test_serve_refuses_a_public_host_when_the_configuration_drops_every_key(
        make_client: ClientFactory, tmp_path: Path) -> None:
    make_client(api_keys=f"{LONG_A}:alice")  # a keyed start stored the configured key
    code, output = _serve_until_exit(["--host", "0.0.0.0"], tmp_path, SPEFT_API_KEYS="")
    assert code == 2, f"speft serve kept serving open mode on 0.0.0.0:\n{output}"
    assert "open mode binds to 127.0.0.1 only" in output
    assert LONG_A[:8] in output and LONG_A not in output  # the dropped key, named by prefix


@pytest.mark.parametrize(("value", "problem"), [
    (",,,", "entry 1 is empty"),
    ("k1:a;k2:b", "entry 1 has 2 ':'"),
])
def test_serve_refuses_malformed_api_keys_naming_the_problem(tmp_path: Path, value: str,
                                                             problem: str) -> None:
    code, output = _serve_until_exit([], tmp_path, SPEFT_API_KEYS=value)
    assert code == 2, f"speft serve started with SPEFT_API_KEYS={value!r}:\n{output}"
    assert f"SPEFT_API_KEYS: {problem}" in output
    assert "k1" not in output.replace(value, "")  # no part of a key echoed back


def test_app_keeps_the_open_mode_decision_it_is_given(tmp_path: Path) -> None:
    settings = Settings(database_url=f"sqlite:///{tmp_path / 'speft.db'}",
                        storage_url=f"file://{tmp_path / 'storage'}")
    with TestClient(create_app(settings, open_mode=False)) as client:  # decided by `speft serve`
        assert client.get("/v1/files").status_code == 401  # the app does not decide it again
    with TestClient(create_app(settings)) as client:  # not given: the app decides (open)
        assert client.get("/v1/files").status_code == 200


def test_short_configured_key_is_stored_without_a_prefix(make_client: ClientFactory) -> None:
    client = make_client(api_keys=f"ka:alice,{LONG_A}:bob")
    with client.app.state.sessions() as session:
        prefixes = dict(session.execute(select(ApiKey.key_hash, ApiKey.prefix)).all())
    assert prefixes == {hash_api_key("ka"): "", hash_api_key(LONG_A): LONG_A[:8]}
