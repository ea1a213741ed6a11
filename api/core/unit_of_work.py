"""One owner commits: the request's session dependency or the worker task, then runs what follows.

Services only flush. What must happen once the transaction is settled is registered on the
session (kept in `session.info`) and run by the owner:

- `after_commit(session, action)`: after a successful commit (send a job, delete a stored
  object). Each action is guarded: one that raises is logged, the commit stands, and the request
  that made it still answers its 2xx.
- `after_rollback(session, action)`: after a rollback or a failed commit, to undo a side effect
  made before the commit (delete the object an upload just put). Also guarded.

`unit_of_work(session)` wraps a block: commit and run the after-commit actions when it succeeds,
else roll back and run the after-rollback actions, then re-raise. `commit_and_run(session)` is
its success half, for an owner that commits at a point of its own choosing.
"""
from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator

from sqlalchemy.orm import Session

log = logging.getLogger(__name__)

Action = Callable[[], object]
AFTER_COMMIT = "speft.after_commit"
AFTER_ROLLBACK = "speft.after_rollback"


def after_commit(session: Session, action: Action) -> None:
    """Run `action` once the session's current transaction has committed (dropped on rollback)."""
    session.info.setdefault(AFTER_COMMIT, []).append(action)


def after_rollback(session: Session, action: Action) -> None:
    """Run `action` if the session's current transaction is rolled back or fails to commit."""
    session.info.setdefault(AFTER_ROLLBACK, []).append(action)


def _run_guarded(actions: list[Action], when: str) -> None:
    """Run each action; log (never raise) the failure of one and go on with the next."""
    for action in actions:
        try:
            action()
        except Exception:
            log.exception("speft.unit_of_work %s action failed: %r", when, action)


def commit_and_run(session: Session) -> None:
    """Commit, then run the after-commit actions; a failed commit rolls back, runs the
    after-rollback actions and re-raises."""
    try:
        session.commit()
    except BaseException:
        rollback_and_undo(session)
        raise
    session.info.pop(AFTER_ROLLBACK, None)
    _run_guarded(session.info.pop(AFTER_COMMIT, []), "after-commit")


def rollback_and_undo(session: Session) -> None:
    """Roll back, drop the after-commit actions and run the after-rollback ones."""
    session.info.pop(AFTER_COMMIT, None)
    undo = session.info.pop(AFTER_ROLLBACK, [])
    try:
        with contextlib.suppress(Exception):  # a dead connection: the server rolled back already
            session.rollback()
    finally:
        _run_guarded(undo, "after-rollback")


@contextlib.contextmanager
def unit_of_work(session: Session) -> Iterator[Session]:
    """Commit the block's work and run its after-commit actions; on an exception roll back, run
    its after-rollback actions and re-raise."""
    try:
        yield session
    except BaseException:
        rollback_and_undo(session)
        raise
    commit_and_run(session)
