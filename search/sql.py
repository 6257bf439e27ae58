"""`search sql`: anyone's ad-hoc SQL against the tables, unable to change anything, reach the server or run forever.

The statement runs on the reader (ingest.reader): a separate login whose role can only SELECT the project's tables,
in a read-only transaction, under the statement timeout, sent as one statement of the extended protocol (so
`SELECT 1; DROP TABLE images` is refused whole). A query (SELECT, VALUES, TABLE, WITH) streams through a
server-side cursor, `BATCH` rows a fetch, and rows are written as they come, so a client's memory stays flat
however many there are; at most `max_rows` are written (0: all). Other statements (EXPLAIN, SHOW) answer in a few
rows and are fetched whole. The transaction is always rolled back and the connection closed, not pooled, so
nothing a statement leaves in its session reaches another.
"""
from __future__ import annotations

import json
import math
import sys
from contextlib import contextmanager
from dataclasses import dataclass, field
from decimal import Decimal
from itertools import chain, islice
from typing import Iterator

import psycopg
import sqlalchemy as sa

from ingest import Database, limit_statements, reading, to_json
from ingest.errors import RisError, first_line

DEFAULT_MAX_ROWS = 10_000
BATCH = 1_000  # rows a fetch brings, and the rows the table's column widths are measured on


@dataclass
class Result:
    """The columns and a stream of rows of one statement; `cut` becomes True when `max_rows` stopped the stream."""

    columns: list[str]
    rows: Iterator[tuple]
    cut: bool = field(default=False)


@contextmanager
def run_sql(db: Database, query: str, *, timeout: str | None = None, max_rows: int = DEFAULT_MAX_ROWS) -> Iterator[Result]:
    """Run one read-only statement on the reader; iterate `result.rows` inside the block (they stream from the
    server). A refused or failing statement is a RisError with one line, also when it fails mid-stream."""
    if not query.strip():
        raise RisError("no SQL given")
    if max_rows < 0:
        raise RisError(f"--max-rows must be 0 (no cap) or more, got {max_rows}")
    streamed = is_query(query)
    try:
        with reading(db, timeout) as conn:
            try:
                raw = conn.connection.driver_connection
                cursor = raw.cursor(name="search_sql") if streamed else raw.cursor()
                cursor.execute(query, **({} if streamed else {"prepare": True}))  # prepared: extended protocol, one statement
                result = Result([c.name for c in cursor.description or ()], iter(()))
                if cursor.description:
                    result.rows = capped(fetched(conn, cursor, timeout), max_rows, result)
                yield result
            finally:
                release(conn)
    except sa.exc.DBAPIError as e:
        raise RisError(refusal(e.orig)) from None
    except psycopg.Error as e:  # raised from the raw cursor, which SQLAlchemy does not wrap
        raise RisError(refusal(e)) from None


def release(conn: sa.Connection) -> None:
    """Roll back and close the connection rather than pool it: whatever the statement left in its session
    (advisory locks, a PREPAREd statement, a name taken) goes with it and reaches no later statement."""
    try:
        conn.rollback()
    finally:
        conn.invalidate()


def is_query(text: str) -> bool:
    """True if the text parses (with PostgreSQL's grammar) as one SELECT, VALUES, TABLE or WITH query: a cursor
    can stream it. Text that does not parse is sent as it is, for the server to say what is wrong."""
    from pglast import ast, parse_sql
    from pglast.parser import ParseError

    try:
        statements = parse_sql(text)
    except ParseError:
        return False
    if len(statements) > 1:
        raise RisError("refused: search sql runs one statement at a time")
    return bool(statements) and isinstance(statements[0].stmt, ast.SelectStmt) and statements[0].stmt.intoClause is None


def fetched(conn: sa.Connection, cursor, timeout: str | None) -> Iterator[tuple]:
    """The cursor's rows, BATCH a fetch. Each FETCH of a server-side cursor is a statement of its own, started
    under `timeout` afresh: the query cannot lift the limit for the next ones (set_config('statement_timeout', ...))."""
    while True:
        limit_statements(conn, timeout)
        rows = cursor.fetchmany(BATCH)
        yield from rows
        if len(rows) < BATCH:
            return


def capped(rows: Iterator[tuple], max_rows: int, result: Result) -> Iterator[tuple]:
    """The rows, stopping after `max_rows` (0: never) and marking the result cut if more were there."""
    for n, row in enumerate(rows):
        if max_rows and n == max_rows:
            result.cut = True
            return
        yield row


def refusal(error) -> str:
    """One line that says why the SQL did not run, calling a refused write or privilege what it is."""
    message = first_line(str(error))
    if "read-only transaction" in message or "permission denied" in message or "multiple commands" in message \
            or "must be superuser" in message or "must be a member" in message:
        return f"refused: search sql only reads the tables, one statement at a time ({message})"
    return f"SQL error: {message}"


def write_table(result: Result, out=None) -> None:
    """An aligned text table, written as rows come: column widths are measured on the first BATCH rows (a longer
    value later only widens its own line). Values show as in `search similar`'s tables (search.cli.cell_text)."""
    from search.cli import cell_text

    out = out or sys.stdout
    rows = (tuple(cell_text(v) for v in row) for row in result.rows)
    head = list(islice(rows, BATCH))
    widths = [max([len(c)] + [len(r[i]) for r in head]) for i, c in enumerate(result.columns)]
    out.write("  ".join(c.ljust(w) for c, w in zip(result.columns, widths)).rstrip() + "\n")
    out.write("  ".join("-" * w for w in widths) + "\n")
    for row in chain(head, rows):
        out.write("  ".join(v.ljust(w) for v, w in zip(row, widths)).rstrip() + "\n")
    out.flush()


def write_json(result: Result, out=None) -> None:
    """A JSON array of one object per row, written as rows come, that a strict parser accepts: NaN and ±Infinity
    become null, bytea hex text (\\x...), vectors arrays. One key per line, each value on its line."""
    out = out or sys.stdout
    keys = [json.dumps(column, ensure_ascii=False) for column in result.columns]
    count = 0
    for row in result.rows:
        fields = ",\n".join(f"    {key}: {json.dumps(json_value(value), ensure_ascii=False, allow_nan=False)}"
                            for key, value in zip(keys, row))
        out.write(("[\n" if count == 0 else ",\n") + "  {\n" + fields + "\n  }")
        count += 1
    out.write("[]\n" if count == 0 else "\n]\n")
    out.flush()


def json_value(value):
    """A value JSON can hold exactly: finite numbers, text, booleans, null, and lists and objects of them."""
    if value is None or isinstance(value, (str, bool, int)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Decimal):
        return json_value(float(value))
    if isinstance(value, (list, tuple)):
        return [json_value(v) for v in value]
    if isinstance(value, dict):
        return {str(k): json_value(v) for k, v in value.items()}
    return json_value(to_json(value))  # vectors and numpy values become lists and numbers, bytea \x text, the rest text
