"""Where things live: the data directory (RIS_HOME) and the database (DATABASE_URL).

Flags win over the environment, the environment over defaults. Read once, in the CLI, and passed down.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import platformdirs

APP_NAME = "reverse-image-search"
DEFAULT_BATCH_SIZE = 32  # pictures per forward pass and per committed transaction
DEFAULT_TREES = 100  # Annoy trees: recall@10 0.97 on Caltech 101 at PCA 128 (bench/search.py); 50 gave 0.95-


@dataclass(frozen=True)
class Settings:
    """Everything a command needs to find the data directory and the database."""

    home: Path
    database_url: str | None = None

    @classmethod
    def load(cls, database_url: str | None = None, home: str | Path | None = None) -> "Settings":
        """Build settings from flags, then `RIS_HOME` / `DATABASE_URL`, then the platform's user data directory."""
        home = Path(home or os.environ.get("RIS_HOME") or platformdirs.user_data_path(APP_NAME)).expanduser()
        url = database_url or os.environ.get("DATABASE_URL") or None
        return cls(home=home.resolve(), database_url=url)

    @property
    def pgdata(self) -> Path:
        return self.home / "pgdata"

    @property
    def datasets_dir(self) -> Path:
        return self.home / "datasets"

    @property
    def annoy_dir(self) -> Path:
        return self.home / "annoy"

    @property
    def models_dir(self) -> Path:
        return self.home / "models"
