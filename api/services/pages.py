"""Cursor pages, as OpenAI lists objects: rows ordered by creation time (ties by id), `after` the
id of the last row a client has seen, and `has_more` learnt by reading one row past the page.

A cursor is compared by its (created_at, id) key, so a page never repeats or skips a row, even
when rows share a timestamp or the cursor's own row was deleted after it was read.
"""
from __future__ import annotations

import operator
from typing import Any, Literal, TypeVar

from sqlalchemy import Select, and_, or_
from sqlalchemy.orm import Session

Row = TypeVar("Row")
SortOrder = Literal["asc", "desc"]  # by created_at, as OpenAI's `order` list parameter


def keyset_page(session: Session, query: Select[tuple[Row]], model: type[Row], *,
                cursor: Any | None, limit: int,
                order: SortOrder = "desc") -> tuple[list[Row], bool]:
    """Up to `limit` rows of `query` (a SELECT of `model`, which has `created_at` and `id`) in
    `order`, strictly after the row `cursor` (None: from the first); (rows, has_more)."""
    table: Any = model
    if cursor is not None:
        beyond = operator.lt if order == "desc" else operator.gt
        query = query.where(or_(beyond(table.created_at, cursor.created_at),
                                and_(table.created_at == cursor.created_at,
                                     beyond(table.id, cursor.id))))
    keys = (table.created_at, table.id)
    ordered = [key.desc() if order == "desc" else key.asc() for key in keys]
    rows = list(session.scalars(query.order_by(*ordered).limit(limit + 1)))
    return rows[:limit], len(rows) > limit
