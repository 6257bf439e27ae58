"""Pictures of results: the query beside its neighbours, each captioned with label and distance.

matplotlib with the Agg backend, saved with fig.savefig and closed: nothing here opens a window.
"""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from PIL import Image, ImageOps  # noqa: E402

from ingest import Hit  # noqa: E402

THUMB = 160


def thumbnail(path: str | Path, size: int = THUMB):
    """An upright RGB thumbnail, or a grey square if the file cannot be opened any more."""
    try:
        with Image.open(path) as img:
            img = ImageOps.exif_transpose(img).convert("RGB")
            img.thumbnail((size, size))
            return img
    except (OSError, ValueError, Image.DecompressionBombError):
        return Image.new("RGB", (size, size), (200, 200, 200))


def draw_row(axes, query_path: str | None, query_label: str | None, hits: list[Hit], title: str | None = None) -> None:
    """Fill one row of axes: the query first, then its neighbours; wrong labels are captioned in red."""
    axes[0].imshow(thumbnail(query_path) if query_path else Image.new("RGB", (THUMB, THUMB), "white"))
    axes[0].set_title(f"query\n{query_label or ''}" if not title else f"{title}\n{query_label or ''}", fontsize=9, fontweight="bold")
    for ax, hit in zip(axes[1:], hits):
        ax.imshow(thumbnail(hit.path))
        wrong = query_label is not None and hit.label != query_label
        ax.set_title(f"#{hit.rank} {hit.label or ''}\nd={hit.distance:.3f}" + (" ✗" if wrong else ""),
                     fontsize=8, color="crimson" if wrong else "black")
    for ax in axes:
        ax.axis("off")


def plot_neighbours(out: Path, query_path: str | None, query_label: str | None, hits: list[Hit], title: str = "") -> Path:
    """Write a PNG of the query and its k neighbours in one row."""
    columns = len(hits) + 1
    fig, axes = plt.subplots(1, columns, figsize=(2.0 * columns, 2.6), squeeze=False)
    draw_row(axes[0], query_path, query_label, hits)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
