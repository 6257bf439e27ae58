"""How an audit (search.audit.Audit) is shown: tables for the terminal, ids or CSV to act on, and an HTML page.

The page is laid out like the report's (search.page: its template, tables and notes): each case's thumbnail
beside its k nearest other pictures, so a reader sees at a glance why a picture was listed. Thumbnails are
small JPEGs in a `thumbs/` folder beside index.html, named by sha256, so the folder can be moved as it is.
A report folder holding the audit in `audit/` links to it, and the audit page links back.
"""
from __future__ import annotations

import csv
import html
import io
from pathlib import Path
from typing import TYPE_CHECKING

from ingest import MAX_PIXELS
from ingest.errors import ImageError
from search.files import FileChanged, FileGone, read_verified
from search.page import PAGE, fmt, para, table
from search.thumbnails import QUALITY, shrink

if TYPE_CHECKING:
    from search.audit import Audit

AUDIT_FOLDER = "audit"  # `search report --out R` links R/audit/index.html, the page `search audit --out R/audit` writes
THUMB_PX = 112  # shown width of each thumbnail on the page
CSV_COLUMNS = ["kind", "id", "path", "label", "suggested", "agreement", "split", "other_id", "other_path", "other_split", "distance"]
STYLE = ("<style>.case { display: flex; gap: 6px; margin: 0.8em 0; align-items: flex-start; } .case figure { margin: 0; width: 118px; "
         "font-size: 0.75em; word-break: break-all; } .case figure.query { border-right: 3px solid #888; padding-right: 6px; } "
         ".wrong { color: crimson; }</style>")


# --- terminal ------------------------------------------------------------------------------------------


def engine_text(a: Audit) -> str:
    """How the neighbours were found: 'exact (numpy)', or 'annoy, trees 100, search_k 2200, ...'."""
    engine = a.neighbours.engine
    return engine["engine"] + "".join(f", {key} {value}" for key, value in engine.items() if key not in ("engine", "rows"))


def summary_line(a: Audit) -> str:
    return (f"{a.collection}: {len(a.images.ids)} images, {len(a.labels)} labels, k={a.k}, neighbours {engine_text(a)}; "
            f"splits: {a.splits}; {a.seconds:.1f} s")


def text_sections(full: Audit, shown: Audit) -> list[tuple[str, list[str], list[tuple]]]:
    """(heading, columns, rows) of each section, worst first; the heading says how many of how many are shown."""
    count = lambda what, whole, part: f"{what}: {len(whole)}" + (f" (first {len(part)} shown)" if len(part) < len(whole) else "")  # noqa: E731
    k = shown.k
    return [
        (count("Leaks across splits", full.leaks, shown.leaks), ["distance", "id", "split", "path", "id", "split", "path"],
         [(f"{x.distance:.4f}", x.a.id, x.a.split, x.a.path, x.b.id, x.b.split, x.b.path) for x in shown.leaks]),
        (count("Label suspects", full.suspects, shown.suspects), ["id", "label", "suggested", "agreement", "why", "path"],
         [(s.id, s.label, s.suggested, f"{s.agreement:.2f}", "conflict" if s.conflict else "neighbours", s.path) for s in shown.suspects]),
        (count("Outliers", full.outliers, shown.outliers), ["id", "label", "score", "path"],
         [(o.id, o.label, f"{o.score:.2f}", o.path) for o in shown.outliers]),
        (count(f"Labels, worst precision@{k} first", full.labels, shown.labels), ["label", "images", f"precision@{k}"],
         [(q.label, q.images, f"{q.precision_at_k:.3f}") for q in shown.labels]),
        (count("Most confused labels", full.confused, shown.confused), ["label", "neighbours' label", "count"],
         [(c.a, c.b, c.count) for c in shown.confused]),
    ]


# --- exports ---------------------------------------------------------------------------------------------


def export_ids(a: Audit) -> list[int]:
    """Ids to act on, each once: every suspect, and the side of each leak in the smaller split (the one to drop or move)."""
    return list(dict.fromkeys([s.id for s in a.suspects] + [x.b.id for x in a.leaks]))


def export_csv(a: Audit) -> str:
    """Suspects and leaks, one row each, with what a script needs to relabel, drop or re-split a file."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    for s in a.suspects:
        writer.writerow(["conflict" if s.conflict else "suspect", s.id, s.path, s.label, s.suggested, f"{s.agreement:.4f}", "", "", "", "", ""])
    for x in a.leaks:
        writer.writerow(["leak", x.b.id, x.b.path, "", "", "", x.b.split, x.a.id, x.a.path, x.a.split, f"{x.distance:.6f}"])
    return out.getvalue()


# --- the page --------------------------------------------------------------------------------------------


def write_page(out: Path, full: Audit, shown: Audit) -> Path:
    """out/index.html with the cases of `shown` (an audit cut by --limit) and their thumbnails in out/thumbs."""
    out.mkdir(parents=True, exist_ok=True)
    thumbs = Thumbnails(out)
    k = shown.k
    parts = [STYLE, "<h2>What this is</h2>", table(None, [
        ["collection", shown.collection], ["images", len(shown.images.ids)], ["labels", len(full.labels)], ["k", k],
        ["neighbours", engine_text(shown)], ["splits", shown.splits],
        ["seconds", f"{shown.seconds:.1f}"]])]
    if (out.parent / "index.html").is_file() and out.name == AUDIT_FOLDER:
        parts.append('<p><a href="../index.html">Back to the report</a></p>')
    parts += [para(note, "note") for note in shown.notes]
    parts += [f"<h2>Leaks across splits ({len(full.leaks)})</h2>",
              para("The same picture (distance 0) or a near-identical one in two splits: a model trained on one side has seen "
                   "the other. Side b is in the smaller split."),
              *[case([(x.a.id, x.a.path, f"a: {x.a.split}", ""), (x.b.id, x.b.path, f"b: {x.b.split}", f"d={x.distance:.4f}")], thumbs, full)
                for x in shown.leaks]]
    parts += [f"<h2>Label suspects ({len(full.suspects)})</h2>",
              para(f"Each picture, then its {k} nearest other pictures (red: another label than the picture's). A conflict is one "
                   "picture stored under folders of different labels."),
              *[case(neighbour_cells(full, s.id, s.path, f"{s.label} → {s.suggested} ({'conflict, ' if s.conflict else ''}"
                                                         f"{s.agreement:.0%})"), thumbs, full) for s in shown.suspects]]
    parts += [f"<h2>Outliers ({len(full.outliers)})</h2>",
              para("Pictures far from every picture of their own label: the mean distance to its 3 nearest other members over "
                   "the label's median of that distance (1 is typical). Each picture, then its nearest other pictures."),
              *[case(neighbour_cells(full, o.id, o.path, f"{o.label or 'no label'}: score {o.score:.2f}"), thumbs, full)
                for o in shown.outliers]]
    if full.labels:
        parts += [f"<h2>Per-label precision@{k} ({len(full.labels)} labels, worst first)</h2>",
                  table(["label", "images", f"precision@{k}"], [[q.label, q.images, fmt(q.precision_at_k)] for q in shown.labels]),
                  "<h2>Most confused labels</h2>",
                  table(["label", "neighbours' label", "count"], [[c.a, c.b, c.count] for c in shown.confused])]
    path = out / "index.html"
    path.write_text(PAGE.format(title=html.escape(f"Audit: {shown.collection}"), body="\n".join(parts)), encoding="utf-8")
    return path


def neighbour_cells(a: Audit, image_id: int, path: str, caption: str) -> list[tuple]:
    """(id, path, caption, detail) of a picture and of each of its neighbours; neighbours of another label marked."""
    row = int(a.images.ids.searchsorted(image_id))
    label = a.images.labels[row]
    cells = [(image_id, path, caption, "")]
    for r, d in zip(a.neighbours.rows[row].tolist(), a.neighbours.distances[row].tolist()):
        if r >= 0:
            other = a.images.labels[r]
            cells.append((int(a.images.ids[r]), a.images.paths[r], other or "no label", f"d={d:.4f}" + (" ✗" if other != label else "")))
    return cells


def case(cells: list[tuple], thumbs: "Thumbnails", a: Audit) -> str:
    """One row: the first cell is the case, the others its neighbours (or the other side of a leak)."""
    figures = []
    for n, (image_id, path, caption, detail) in enumerate(cells):
        src = thumbs.of(a, image_id, path)
        img = f'<img src="{html.escape(src)}" width="{THUMB_PX}" alt="">' if src else "<div>(unreadable)</div>"
        wrong = ' class="wrong"' if "✗" in detail else ""
        figures.append(f'<figure{" class=query" if n == 0 else ""} title="{html.escape(path)}">{img}<figcaption>#{image_id} '
                       f"{html.escape(caption)}<br><span{wrong}>{html.escape(detail)}</span></figcaption></figure>")
    return f'<div class="case">{"".join(figures)}</div>'


class Thumbnails:
    """Small JPEGs of the pictures shown, made once each (by sha256) into out/thumbs from the file's bytes if they are
    still the picture that was stored (as the web page's thumbnails are); None for one that cannot be read."""

    def __init__(self, out: Path):
        self.folder = out / "thumbs"
        self.folder.mkdir(exist_ok=True)
        self.made: dict[str, str | None] = {}

    def of(self, a: Audit, image_id: int, path: str) -> str | None:
        sha = a.images.sha256[int(a.images.ids.searchsorted(image_id))]
        if sha not in self.made:
            target = self.folder / f"{sha}.jpg"
            try:
                if not target.exists():
                    shrink(read_verified([path], sha), MAX_PIXELS).save(target, "JPEG", quality=QUALITY)
                self.made[sha] = f"thumbs/{target.name}"
            except (ImageError, FileGone, FileChanged):
                self.made[sha] = None
        return self.made[sha]
