"""Filters on a search: a label (a bound parameter) and `--where` (a user's SQL condition), kept inside one collection.

`--where` is SQL text, so it cannot be bound. Two things keep it from reaching beyond its collection:
1. it must be one self-contained expression: outside quotes it may not close a parenthesis it did not
   open, leave one open, or hold a comment, a `;` or a `$` (dollar quotes, parameters). Strings and quoted
   identifiers are skipped exactly as PostgreSQL lexes them with standard_conforming_strings on, which the
   read-only transaction sets. So the text stays inside the parentheses it is put in;
2. those parentheses are the WHERE clause of a query whose FROM is a subquery already restricted to the
   collection, so even a condition that is true everywhere only sees the collection's rows.
It then runs in a read-only transaction, as the reader role, under a statement timeout (ingest.db.read_only).
"""
from __future__ import annotations

from dataclasses import dataclass

from ingest.errors import FilterError

IDENTIFIER_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_$")


@dataclass(frozen=True)
class Filter:
    """Which rows of a collection may be neighbours: a label, a checked --where, and an image to leave out."""

    label: str | None = None
    where: str | None = None
    exclude: int | None = None

    @classmethod
    def of(cls, label: str | None = None, where: str | None = None, exclude: int | None = None) -> "Filter":
        return cls(label, check_where(where) if where is not None else None, exclude)

    @property
    def narrows(self) -> bool:
        """True if the filter may leave fewer rows than the collection has (not counting the excluded query)."""
        return self.label is not None or self.where is not None

    def scoped(self, columns: str, scope: str) -> str:
        """SELECT `columns` FROM the collection's rows (`scope`: conditions on images with bound parameters)
        WHERE this filter holds. Parameters: %(c)s the collection id, %(label)s, %(exclude)s, and scope's own.

        The user's text is psycopg-escaped (% doubled) so it can add no parameters of its own.
        """
        conditions = []
        if self.label is not None:
            conditions.append("images.label = %(label)s")
        if self.exclude is not None:
            conditions.append("images.id <> %(exclude)s")
        if self.where is not None:
            conditions.append("(" + self.where.replace("%", "%%") + ")")
        where = " AND ".join(conditions) or "true"
        return f"SELECT {columns} FROM (SELECT * FROM images WHERE collection_id = %(c)s AND {scope}) AS images WHERE {where}"

    def params(self, collection_id: int) -> dict:
        return {"c": collection_id, "label": self.label, "exclude": self.exclude}


def check_where(text: str) -> str:
    """The condition unchanged if it is one self-contained SQL expression, else a FilterError saying why not."""
    if not text.strip():
        raise FilterError("--where is empty")
    depth, i = 0, 0
    while i < len(text):
        c = text[i]
        if c in "'\"":
            i = end_of_quoted(text, i, backslash_escapes=c == "'" and is_escape_string(text, i))
            continue
        if text.startswith(("--", "/*"), i):
            raise FilterError("--where may not contain a comment")
        if c in ";$":
            raise FilterError(f"--where is one condition: {c!r} is only allowed inside quotes")
        depth += {"(": 1, ")": -1}.get(c, 0)
        if depth < 0:
            raise FilterError("--where closes a parenthesis it did not open")
        i += 1
    if depth:
        raise FilterError("--where leaves a parenthesis open")
    return text


def is_escape_string(text: str, quote: int) -> bool:
    """True if the quote at `quote` opens an E'...' string: an E that starts a token just before it."""
    return quote >= 1 and text[quote - 1] in "eE" and (quote == 1 or text[quote - 2] not in IDENTIFIER_CHARS)


def end_of_quoted(text: str, start: int, backslash_escapes: bool) -> int:
    """Index just past the quoted string or identifier opening at `start`: a doubled quote stays inside, and in
    E'...' strings so does any character after a backslash. An unterminated one is refused: it would swallow
    the text after it."""
    quote, i = text[start], start + 1
    while i < len(text):
        if backslash_escapes and text[i] == "\\":
            i += 2
            continue
        if text[i] == quote:
            if text.startswith(quote * 2, i):
                i += 2
                continue
            return i + 1
        i += 1
    raise FilterError(f"--where has an unterminated {'string' if quote == chr(39) else 'quoted name'}")
