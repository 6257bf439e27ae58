"""`search sql`: anyone's ad-hoc SQL against the tables, unable to change anything.

Three guards, each enough for the common cases and together for the rest: the statement runs in a
READ ONLY transaction, as the `ris_reader` role (SELECT on our tables only, so no COPY TO PROGRAM or
server file functions even on a superuser connection), and as a single prepared statement (so
`SELECT 1; DROP TABLE images` is refused whole). The transaction is always rolled back.
"""
from __future__ import annotations

from dataclasses import dataclass

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from ingest.db import first_line
from ingest.errors import RisError
from ingest.store import vector_cursor

READER_ROLE = "ris_reader"


@dataclass(frozen=True)
class Table:
    columns: list[str]
    rows: list[tuple]

    def records(self) -> list[dict]:
        return [dict(zip(self.columns, row)) for row in self.rows]


def read_only(conn: sa.Connection) -> None:
    """Make the connection's open transaction read-only, as the reader role where the server has it."""
    conn.execute(sa.text("SET TRANSACTION READ ONLY"))
    if conn.execute(sa.text("SELECT to_regrole(:r) IS NOT NULL AND pg_has_role(:r, 'MEMBER')"), {"r": READER_ROLE}).scalar():
        conn.execute(sa.text(f"SET LOCAL ROLE {READER_ROLE}"))


def run_sql(engine: Engine, query: str) -> Table:
    """Run one read-only statement and return its result table."""
    if not query.strip():
        raise RisError("no SQL given")
    with engine.connect() as conn:
        try:
            with conn.begin() as txn:
                read_only(conn)
                cur = vector_cursor(conn)
                cur.execute(query, prepare=True)
                columns = [c.name for c in cur.description] if cur.description else []
                rows = cur.fetchall() if cur.description else []
                txn.rollback()
        except sa.exc.DBAPIError as e:
            raise RisError(refusal(e.orig)) from None
        except Exception as e:  # psycopg errors raised from the raw cursor are not wrapped by SQLAlchemy
            if type(e).__module__.startswith("psycopg"):
                raise RisError(refusal(e)) from None
            raise
    return Table(columns, rows)


def refusal(error) -> str:
    """One line that says why the SQL did not run, calling a refused write what it is."""
    message = first_line(str(error))
    if "read-only transaction" in message or "permission denied" in message or "multiple commands" in message:
        return f"refused: search sql only reads, one statement at a time ({message})"
    return f"SQL error: {message}"
