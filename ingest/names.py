"""Collection names: which a new collection may have, and how any name, old ones too, becomes a file name.

A name ends up in file names (the Annoy index and its sidecar under $RIS_HOME/annoy, fine-tuned weights under
$RIS_HOME/models), in the web server's URLs and on the command line, so a new collection's name is 1 to 63 ASCII
letters, digits, '.', '_' or '-', not starting with '.': no path separator, no '..', nothing hidden, no NUL,
no letter from another alphabet that looks like an ASCII one. Collections that earlier versions named otherwise
keep working read-only (searched, shown by `ingest status`, removed); loading into them is refused, with a
valid name to load into instead.
"""
from __future__ import annotations

import hashlib
import os
import re
import unicodedata
from pathlib import Path

from ingest.errors import CollectionError

MAX_NAME_LENGTH = 63
NAME_RULE = f"1 to {MAX_NAME_LENGTH} letters (a-z, A-Z), digits, '.', '_' or '-', not starting with '.'"

_VALID = re.compile(rf"[A-Za-z0-9_-][A-Za-z0-9._-]{{0,{MAX_NAME_LENGTH - 1}}}")
_INVALID_RUN = re.compile(r"[^A-Za-z0-9._-]+")
_SEPARATORS = {"/", os.sep, os.altsep} - {None}
_LONGEST_OLD_STEM = 200  # bytes: with the longest suffix added, still under the usual 255-byte file name limit


def is_valid(name: object) -> bool:
    """Whether a new collection may be called `name`."""
    return isinstance(name, str) and _VALID.fullmatch(name) is not None


def check_name(name: str) -> str:
    """`name` if a new collection may have it (or pictures may be loaded into it), else a one-line CollectionError."""
    if is_valid(name):
        return name
    hint = suggest(name)
    also = (f"; to add pictures to a collection an earlier version named so, load them into a new one "
            f"such as {hint!r} (the old one can still be searched and removed)") if hint else ""
    raise CollectionError(f"invalid collection name {name!r}: use {NAME_RULE}{also}")


def suggest(text: str) -> str | None:
    """A valid name made from any text, such as a folder's name ('My Photos' -> 'My-Photos', 'été' -> 'ete'),
    or None if nothing usable is left."""
    plain = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode()
    name = _INVALID_RUN.sub("-", plain).strip(".-")[:MAX_NAME_LENGTH].rstrip(".-")
    return name if is_valid(name) else None


def folder_collection_name(folder: Path) -> str:
    """The default collection of a folder: its own name made valid ('My Photos' -> 'My-Photos')."""
    name = suggest(Path(folder).resolve().name)
    if name is None:
        raise CollectionError(f"cannot make a collection name from the folder name {Path(folder).resolve().name!r}; give --collection NAME")
    return name


def may_exist(name: str) -> bool:
    """False for a name no collection can have, whatever the version that made it: PostgreSQL text holds no NUL,
    and a name that is not valid UTF-8 (lone surrogates from undecodable bytes) was never stored."""
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return "\x00" not in name


def file_stem(name: str) -> str:
    """How a collection's name starts the names of its files: the name itself when it is valid or, for an older
    name, when it stays a plain file name inside the folder (no separator, not hidden, not too long), so that
    existing index files are found; any other name gets a stem no valid name can have (longer than 63
    characters), derived from it, so no name can reach outside the folder."""
    if is_valid(name) or _plain_file_name(name):
        return name
    digest = hashlib.sha256(name.encode("utf-8", "surrogatepass")).hexdigest()
    return f"collection-with-unusable-name-{digest}"


def _plain_file_name(name: str) -> bool:
    return (bool(name) and may_exist(name) and not name.startswith(".") and not any(s in name for s in _SEPARATORS)
            and len(name.encode("utf-8")) <= _LONGEST_OLD_STEM)
