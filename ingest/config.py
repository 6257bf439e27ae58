"""Where things live: the data directory (RIS_HOME) and the database (DATABASE_URL).

Flags win over the environment, the environment over defaults. Read once, in the CLI, and passed down.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import platformdirs

APP_NAME = "reverse-image-search"
DEFAULT_BATCH_SIZE = 32  # pictures per forward pass and per committed transaction
DEFAULT_TREES = 100  # Annoy trees: recall@10 0.97 on Caltech 101 at PCA 128 (bench/search.py); 50 gave 0.95-
DEFAULT_ANNOY_MAX_DELTA = 5_000  # rows an Annoy file may lag behind before a load rebuilds it; RIS_ANNOY_MAX_DELTA overrides
DEFAULT_STATEMENT_TIMEOUT = "30s"  # what a user's SQL (search sql, --where) may cost; RIS_STATEMENT_TIMEOUT overrides
DEFAULT_MAX_FILE_MB = 200  # larger files are refused unread (a load reads each file whole); --max-file-mb / RIS_MAX_FILE_MB override


@dataclass(frozen=True)
class Settings:
    """Everything a command needs to find the data directory and the database."""

    home: Path
    database_url: str | None = None
    statement_timeout: str = DEFAULT_STATEMENT_TIMEOUT  # a PostgreSQL interval; '0' means no limit
    annoy_max_delta: int = DEFAULT_ANNOY_MAX_DELTA
    database_read_url: str | None = None  # a read-only replica that answers queries (search, serve); writes go to database_url
    database_reader_url: str | None = None  # the least-privilege login that runs users' SQL (ingest.reader); None: made by the tool
    # what runs the CNN: auto (OpenVINO on processors, TensorFlow on NVIDIA GPUs), openvino or tensorflow; --runtime wins
    runtime: str = field(default_factory=lambda: os.environ.get("RIS_RUNTIME") or "auto")

    @classmethod
    def load(cls, database_url: str | None = None, home: str | Path | None = None, statement_timeout: str | None = None,
             read_url: str | None = None, reader_url: str | None = None) -> "Settings":
        """Build settings from flags, then `RIS_HOME` / `DATABASE_URL` / `RIS_STATEMENT_TIMEOUT` / `DATABASE_READ_URL` /
        `DATABASE_READER_URL`, then defaults (the platform's user data directory, the embedded server, 30 s, no replica,
        a reader login the tool makes)."""
        home = Path(home or os.environ.get("RIS_HOME") or platformdirs.user_data_path(APP_NAME)).expanduser()
        url = database_url or os.environ.get("DATABASE_URL") or None
        timeout = statement_timeout or os.environ.get("RIS_STATEMENT_TIMEOUT") or DEFAULT_STATEMENT_TIMEOUT
        max_delta = os.environ.get("RIS_ANNOY_MAX_DELTA") or str(DEFAULT_ANNOY_MAX_DELTA)
        if not max_delta.isdigit():
            from ingest.errors import RisError

            raise RisError(f"RIS_ANNOY_MAX_DELTA must be a whole number of rows, got {max_delta!r}")
        read_url = read_url or os.environ.get("DATABASE_READ_URL") or None
        reader_url = reader_url or os.environ.get("DATABASE_READER_URL") or None
        return cls(home=home.resolve(), database_url=url, statement_timeout=timeout, annoy_max_delta=int(max_delta),
                   database_read_url=read_url, database_reader_url=reader_url)

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
