"""One commit owner: side effects follow the commit (deletes) or are undone by its failure
(uploads); a failing after-commit action never fails the request; the sweep removes orphans.

Commits fail for real: an SQLAlchemy `before_commit` listener on the app's session maker raises
the disconnect error a dropped server gives, so the session dependency's commit raises. Storage
fails for real: the storage folder's `files/` turns into a symlink loop right after the delete's
commit (the OS refuses the unlink, as a broken mount would), and is put back afterwards.
Both databases; the upload and delete tests also on both storage backends (folder, moto S3).
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import Engine, event, select
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session, sessionmaker

from api.core.models import File, Tenant
from api.core.unit_of_work import after_commit, after_rollback, commit_and_run, unit_of_work
from api.services.files import file_storage_key
from api.services.reconciler import sweep_orphan_objects
from tests.api.test_files_api import _stored_keys, _upload

CONTENT = b"".join(b'{"text": "example %d", "label": "%s"}\n' % (i, b"ab"[i % 2:i % 2 + 1])
                   for i in range(8))


def _refuse(session: Session) -> None:
    raise OperationalError("COMMIT", {}, ConnectionError("server closed the connection"))


@contextlib.contextmanager
def commits_refused(sessions: sessionmaker[Session]) -> Iterator[None]:
    """While inside, every commit of a session from `sessions` fails as a dropped server would."""
    event.listen(sessions, "before_commit", _refuse)
    try:
        yield
    finally:
        event.remove(sessions, "before_commit", _refuse)


@contextlib.contextmanager
def unlink_refused_after_next_commit(sessions: sessionmaker[Session], root: Path) -> Iterator[None]:
    """Right after the next commit, `root/files` becomes a symlink loop (unlink fails with an OS
    error); the folder is put back on exit, its objects untouched."""
    files, aside = root / "files", root / "files.aside"

    def break_folder(_session: Session) -> None:
        files.rename(aside)
        files.symlink_to(files.name)  # files -> files: every path under it loops

    event.listen(sessions, "after_commit", break_folder, once=True)
    try:
        yield
    finally:
        with contextlib.suppress(Exception):
            event.remove(sessions, "after_commit", break_folder)
        if aside.exists():
            files.unlink()
            aside.rename(files)


def _row(client: TestClient, file_id: str) -> File:
    with client.app.state.sessions() as session:
        row = session.get(File, file_id)
        assert row is not None
        return row


def test_a_delete_whose_commit_fails_leaves_the_row_live_and_its_object_readable(
        backend_client: TestClient):
    file_id = _upload(backend_client, CONTENT).json()["id"]
    with commits_refused(backend_client.app.state.sessions):
        response = backend_client.delete(f"/v1/files/{file_id}")
    assert response.status_code == 503, response.text
    assert response.json()["error"]["param"] == "database"
    assert backend_client.get(f"/v1/files/{file_id}").status_code == 200  # still live
    content = backend_client.get(f"/v1/files/{file_id}/content")
    assert content.status_code == 200 and content.content == CONTENT  # and its bytes are there
    assert _row(backend_client, file_id).deleted_at is None


def test_an_upload_whose_commit_fails_leaves_no_object_and_no_row(backend_client: TestClient):
    with commits_refused(backend_client.app.state.sessions):
        response = _upload(backend_client, CONTENT)
    assert response.status_code == 503, response.text
    assert _stored_keys(backend_client) == []
    assert backend_client.get("/v1/files").json()["data"] == []
    with backend_client.app.state.sessions() as session:
        assert session.scalars(select(File)).all() == []


def test_a_delete_commits_then_removes_the_object_and_marks_it_purged(
        backend_client: TestClient):
    file_id = _upload(backend_client, CONTENT).json()["id"]
    assert backend_client.delete(f"/v1/files/{file_id}").status_code == 200
    assert _stored_keys(backend_client) == []
    row = _row(backend_client, file_id)
    assert row.deleted_at is not None and row.purged_at is not None


@pytest.fixture
def folder_client(migrated_db: Engine, make_client: Any, tmp_path: Path) -> TestClient:
    """Open mode on each database, with a storage folder."""
    return make_client(database_url=migrated_db.url.render_as_string(hide_password=False),
                       storage_url=f"file://{tmp_path / 'objects'}")


def test_a_failing_object_delete_after_the_commit_answers_200_and_the_sweep_removes_the_orphan(
        folder_client: TestClient, caplog: pytest.LogCaptureFixture):
    storage, sessions = folder_client.app.state.storage, folder_client.app.state.sessions
    file_id = _upload(folder_client, CONTENT).json()["id"]
    with unlink_refused_after_next_commit(sessions, storage.root):
        response = folder_client.delete(f"/v1/files/{file_id}")
    # the after-commit delete failed (logged), the delete stands and still answers 200
    assert response.status_code == 200, response.text
    assert "after-commit action failed" in caplog.text
    assert folder_client.get(f"/v1/files/{file_id}").status_code == 404
    key = file_storage_key(file_id)
    assert storage.exists(key)  # an orphan: deleted, not purged
    row = _row(folder_client, file_id)
    assert row.deleted_at is not None and row.purged_at is None

    with sessions() as session, unit_of_work(session):  # within the grace: left alone
        assert sweep_orphan_objects(session, storage=storage) == []
    assert storage.exists(key)
    with sessions() as session, unit_of_work(session):
        assert sweep_orphan_objects(session, storage=storage, grace_s=0) == [file_id]
    assert not storage.exists(key) and _row(folder_client, file_id).purged_at is not None
    with sessions() as session, unit_of_work(session):  # purged once
        assert sweep_orphan_objects(session, storage=storage, grace_s=0) == []


def test_after_commit_actions_run_once_committed_and_a_failing_one_is_contained(
        db_sessions: sessionmaker[Session], caplog: pytest.LogCaptureFixture):
    ran: list[str] = []

    def fail() -> None:
        raise RuntimeError("object store refused")

    with db_sessions() as session:
        session.add(Tenant(id="tenant-uow", name="uow"))
        session.flush()
        after_commit(session, fail)
        after_commit(session, lambda: ran.append("commit"))
        after_rollback(session, lambda: ran.append("rollback"))
        assert ran == []  # nothing before the commit
        commit_and_run(session)
    assert ran == ["commit"]  # the failing one was logged, the next one ran
    assert "object store refused" in caplog.text
    with db_sessions() as session:
        assert session.get(Tenant, "tenant-uow") is not None  # the commit stands


def test_a_failed_commit_runs_the_after_rollback_actions_only(
        db_sessions: sessionmaker[Session]):
    ran: list[str] = []
    with db_sessions() as session:
        with commits_refused(db_sessions), pytest.raises(OperationalError), \
                unit_of_work(session):
            session.add(Tenant(id="tenant-uow", name="uow"))
            after_commit(session, lambda: ran.append("commit"))
            after_rollback(session, lambda: ran.append("rollback"))
        assert ran == ["rollback"]
        commit_and_run(session)  # the actions were used up: a later commit runs none
    assert ran == ["rollback"]
    with db_sessions() as session:
        assert session.get(Tenant, "tenant-uow") is None
