"""Errors a user can cause or fix. The CLI prints them as one line and exits non-zero."""


class RisError(Exception):
    """Base class: anything raised as a RisError is shown to the user as its message, no traceback."""


class SourceError(RisError):
    """A dataset source (archive, folder, download) cannot be used."""


class ImageError(RisError):
    """One file cannot be used as an image; the message is the reason recorded in ingest_failures."""


class DatabaseError(RisError):
    """The database cannot be reached or is not usable (no pgvector, wrong password, ...)."""


class WeightsError(RisError):
    """Model weights cannot be loaded, or differ from the ones a collection was built with."""


class CollectionError(RisError):
    """A collection is missing, empty or not in a state the command needs."""


class FilterError(RisError):
    """A search filter (--where) that is not one self-contained condition."""


class IndexFileError(RisError):
    """An Annoy index file is missing, stale or damaged."""


def first_line(message: str) -> str:
    """psycopg messages carry DETAIL/HINT lines and SQLAlchemy appends a link; keep the first real line."""
    for line in message.strip().splitlines():
        line = line.strip()
        if line:
            return line.removeprefix("connection failed: ")
    return message
