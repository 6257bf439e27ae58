"""`--split-by REGEX`: which split (train, val, test, ...) each file sits in, read from its path, and its label
without that split's folder, so `shop/train/apple` and `shop/test/apple` are one label, `apple`.

The first group of the pattern names the split; the pattern is searched in the whole stored path. A load labels a
picture by its folder relative to the folder loaded (ingest/sources.py), so a label is always the tail of its
file's folder; the label's folders that the first group's match touches are dropped from it. `search audit`
and `search report` both count labels through `SplitRule.label`, so their per-label numbers agree.
"""
from __future__ import annotations

import posixpath
import re
from dataclasses import dataclass

from ingest.errors import RisError


@dataclass(frozen=True)
class SplitRule:
    pattern: re.Pattern

    @classmethod
    def parse(cls, text: str) -> "SplitRule":
        """The rule of a --split-by value; a user's bad pattern is one line, never a traceback."""
        try:
            pattern = re.compile(text)
        except re.error as e:
            raise RisError(f"--split-by {text!r} is not a regular expression: {e}") from None
        if pattern.groups < 1:
            raise RisError(f"--split-by {text!r} has no group to name the split; put it in parentheses, e.g. '/(train|val|test)/'")
        return cls(pattern)

    def split(self, path: str) -> str | None:
        """The split a file sits in: the first group's text, or None when the pattern does not match (or the group is empty)."""
        match = self.pattern.search(path)
        return (match.group(1) or None) if match else None

    def label(self, path: str, label: str | None) -> str | None:
        """The file's label without the folder(s) the split's match touches; None if nothing is left."""
        match = self.pattern.search(path)
        if label is None or match is None or match.start(1) < 0:
            return label
        folder = posixpath.dirname(path)
        if not folder.endswith("/" + label):  # a label not taken from this path (rows written by hand): keep it
            return label
        start, end = match.span(1)
        offset, kept = len(folder) - len(label), []
        for part in label.split("/"):
            if not (offset < end and start < offset + len(part)) or start == end:
                kept.append(part)
            offset += len(part) + 1
        return "/".join(kept) or None
