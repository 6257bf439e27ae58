"""The shape of the code: `search` uses only the surface `ingest` declares, `ingest` never imports `search`,
and no module grows past what a reader takes in at once."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

import ingest

ROOT = Path(__file__).resolve().parent.parent
MAX_LINES = 400


def imports(path: Path) -> list[tuple[str, list[str]]]:
    """(module, names) of every import statement in a file, at any depth (lazy imports inside functions too)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.module, [a.name for a in node.names]))
        elif isinstance(node, ast.Import):
            found.extend((a.name, []) for a in node.names)
    return found


def modules(package: str) -> list[Path]:
    return sorted((ROOT / package).glob("*.py"))


@pytest.mark.parametrize("path", modules("search"), ids=lambda p: p.name)
def test_search_imports_only_the_declared_surface_of_ingest(path):
    for module, names in imports(path):
        if module == "ingest":
            assert set(names) <= set(ingest.__all__), f"{path.name} imports {sorted(set(names) - set(ingest.__all__))} from ingest"
        else:
            assert not module.startswith("ingest.") or module == "ingest.errors", f"{path.name} imports {module}"


def test_every_declared_name_exists():
    for name in ingest.__all__:
        assert getattr(ingest, name) is not None
    with pytest.raises(AttributeError):
        getattr(ingest, "no_such_name")


@pytest.mark.parametrize("path", modules("ingest"), ids=lambda p: p.name)
def test_ingest_never_imports_search(path):
    assert not [m for m, _ in imports(path) if m == "search" or m.startswith("search.")]


@pytest.mark.parametrize("path", modules("ingest") + modules("search") + modules("bench"), ids=lambda p: f"{p.parent.name}/{p.name}")
def test_no_module_is_longer_than_a_reader_takes_in(path):
    assert len(path.read_text().splitlines()) <= MAX_LINES
