"""`search sql`: anyone's ad-hoc SQL against the tables, unable to change anything or run forever.

Three guards, each enough for the common cases and together for the rest: the statement runs in a
READ ONLY transaction, as the `ris_reader` role (SELECT on our tables only, so no COPY TO PROGRAM or
server file functions even on a superuser connection), and as a single prepared statement (so
`SELECT 1; DROP TABLE images` is refused whole). The transaction is always rolled back, and the
statement timeout (--statement-timeout, RIS_STATEMENT_TIMEOUT, 30 s by default) bounds what it costs.
"""
from __future__ import annotations

from dataclasses import dataclass

import psycopg
import sqlalchemy as sa

from ingest import Database, raw_cursor, read_only
from ingest.errors import RisError, first_line


@dataclass(frozen=True)
class Table:
    columns: list[str]
    rows: list[tuple]

    def records(self) -> list[dict]:
        return [dict(zip(self.columns, row)) for row in self.rows]


def run_sql(db: Database, query: str, *, timeout: str | None = None) -> Table:
    """Run one read-only statement and return its result table."""
    if not query.strip():
        raise RisError("no SQL given")
    with db.connect() as conn:
        try:
            with conn.begin() as txn:
                read_only(conn, timeout=timeout)
                cur = raw_cursor(conn)
                cur.execute(query, prepare=True)
                columns = [c.name for c in cur.description] if cur.description else []
                rows = cur.fetchall() if cur.description else []
                txn.rollback()
        except sa.exc.DBAPIError as e:
            raise RisError(refusal(e.orig)) from None
        except psycopg.Error as e:  # raised from the raw cursor, which SQLAlchemy does not wrap
            raise RisError(refusal(e)) from None
    return Table(columns, rows)


def refusal(error) -> str:
    """One line that says why the SQL did not run, calling a refused write what it is."""
    message = first_line(str(error))
    if "read-only transaction" in message or "permission denied" in message or "multiple commands" in message:
        return f"refused: search sql only reads, one statement at a time ({message})"
    return f"SQL error: {message}"
