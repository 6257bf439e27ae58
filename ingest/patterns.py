"""`--include` / `--exclude` for folder loads: gitignore-like patterns on paths relative to the folder.

The rules (README, "Keeping a collection in step with its folder"):
- `*` matches within one path component, `**` across any number of them, `?` one character, `[abc]` a set;
  case matters, as in git.
- A pattern without a `/` (a trailing one aside) matches a file or folder name at any depth (`*.png`, `raw`);
  with one it is matched against the whole relative path (`2024/*/IMG_*`, a leading `/` is allowed).
- A trailing `/` matches folders only (`tmp/`).
- `--exclude`: a matching file is left out; a matching folder is left out with everything under it.
- `--include`: when given, a file is kept only if it, or a folder it sits in, matches one. Exclude wins.
Hidden files and folders are always left out, whatever the patterns say.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from ingest.errors import SourceError


@dataclass(frozen=True)
class Pattern:
    regex: re.Pattern
    folders_only: bool

    @classmethod
    def parse(cls, text: str) -> "Pattern":
        body = text.strip()
        folders_only = body.endswith("/")
        body = body.rstrip("/")
        if not body or body in ("/", "."):
            raise SourceError(f"empty pattern {text!r} in --include/--exclude")
        anchored = "/" in body
        regex = translate(body.lstrip("/"))
        return cls(re.compile(regex if anchored else f"(?:.*/)?{regex}", re.DOTALL), folders_only)

    def matches(self, relative: str, is_folder: bool) -> bool:
        return (is_folder or not self.folders_only) and self.regex.fullmatch(relative) is not None


def translate(glob: str) -> str:
    """A glob as a regex over '/'-separated relative paths."""
    out, i = [], 0
    while i < len(glob):
        if glob.startswith("**/", i):
            out.append("(?:.*/)?")
            i += 3
        elif glob.startswith("**", i):
            out.append(".*")
            i += 2
        elif glob[i] == "*":
            out.append("[^/]*")
            i += 1
        elif glob[i] == "?":
            out.append("[^/]")
            i += 1
        elif glob[i] == "[" and (end := glob.find("]", i + 2)) != -1:
            inner = glob[i + 1:end]
            out.append("[" + ("^" + inner[1:] if inner[0] == "!" else inner).replace("\\", "\\\\") + "]")
            i = end + 1
        else:
            out.append(re.escape(glob[i]))
            i += 1
    return "".join(out)


@dataclass(frozen=True)
class PathFilter:
    """Which files under a folder a load considers; built once from the command's options."""

    include: tuple[Pattern, ...] = ()
    exclude: tuple[Pattern, ...] = ()

    @classmethod
    def of(cls, include: tuple[str, ...] | list[str] = (), exclude: tuple[str, ...] | list[str] = ()) -> "PathFilter":
        return cls(tuple(map(Pattern.parse, include)), tuple(map(Pattern.parse, exclude)))

    def __bool__(self) -> bool:
        return bool(self.include or self.exclude)

    def skips_folder(self, relative: str) -> bool:
        """A folder an --exclude names is not walked at all."""
        return any(p.matches(relative, True) for p in self.exclude)

    def keeps_file(self, relative: str) -> bool:
        """Whether a file (posix path relative to the folder) is loaded; its folders were not excluded."""
        if any(p.matches(relative, False) for p in self.exclude):
            return False
        if not self.include:
            return True
        parts = relative.split("/")
        folders = ["/".join(parts[:n]) for n in range(1, len(parts))]
        return any(p.matches(relative, False) for p in self.include) or any(
            p.matches(folder, True) for p in self.include for folder in folders
        )
