"""A throwaway PostgreSQL server for the `postgres`-marked tests: initdb into a temporary folder, started on a
unix socket only (no TCP port), stopped and deleted at the end. Debian's `postgresql` package provides the
binaries (`make postgres` installs it); as root the server runs as `nobody`, since PostgreSQL refuses root."""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path


def pg_bindir() -> Path | None:
    """$TUNELOOP_PG_BIN, else the newest /usr/lib/postgresql/N/bin, else wherever `pg_ctl` is on PATH."""
    if os.environ.get("TUNELOOP_PG_BIN"):
        return Path(os.environ["TUNELOOP_PG_BIN"])
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"), key=lambda p: int(Path(p).parent.parent.name)
                   if Path(p).parent.parent.name.isdigit() else 0)
    if found:
        return Path(found[-1]).parent
    on_path = shutil.which("pg_ctl")
    return Path(on_path).parent if on_path else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PostgresServer:
    """`start()` raises RuntimeError with the reason when the server cannot start here."""

    def __init__(self):
        self.dir = Path(tempfile.mkdtemp(prefix="tuneloop-pg-"))
        self.data, self.sock = self.dir / "data", self.dir / "sock"
        self.port = _free_port()  # names the socket file; nothing listens on TCP
        self.started = False

    def _run(self, *cmd: str) -> subprocess.CompletedProcess:
        if os.geteuid() == 0:
            cmd = ("runuser", "-u", "nobody", "--", *cmd)
        return subprocess.run(cmd, capture_output=True, text=True, timeout=120)

    def start(self) -> str:
        """Start it; returns the SQLAlchemy URL of its `postgres` database."""
        try:
            import psycopg  # noqa: F401
        except ImportError:
            raise RuntimeError("the psycopg driver is not installed (pip install 'psycopg[binary]')") from None
        bindir = pg_bindir()
        if bindir is None or not (bindir / "initdb").exists():
            raise RuntimeError("PostgreSQL's binaries are not installed (`make postgres`: apt-get install postgresql)")
        self.sock.mkdir()
        if os.geteuid() == 0:
            if shutil.which("runuser") is None:
                raise RuntimeError("running as root and there is no runuser to start PostgreSQL as another user")
            nobody = pwd.getpwnam("nobody")
            self.dir.chmod(0o755)
            for p in (self.dir, self.sock):
                os.chown(p, nobody.pw_uid, nobody.pw_gid)
        r = self._run(str(bindir / "initdb"), "-D", str(self.data), "-U", "postgres", "-A", "trust", "--no-sync",
                      "-E", "UTF8", "--locale=C")
        if r.returncode != 0:
            raise RuntimeError(f"initdb failed: {(r.stderr or r.stdout).strip()[-400:]}")
        # fsync off: a test server's data is thrown away; durability of commits is PostgreSQL's own, not ours
        opts = f"-k {self.sock} -c listen_addresses='' -p {self.port} -c fsync=off"
        r = self._run(str(bindir / "pg_ctl"), "-D", str(self.data), "-o", opts, "-l", str(self.dir / "log"),
                      "-w", "-t", "60", "start")
        if r.returncode != 0:
            log = (self.dir / "log").read_text(errors="replace") if (self.dir / "log").exists() else ""
            raise RuntimeError(f"pg_ctl start failed: {(r.stderr or r.stdout).strip()[-300:]} {log[-300:]}")
        self.started = True
        return self.url("postgres")

    def url(self, database: str) -> str:
        return f"postgresql+psycopg://postgres@/{database}?host={self.sock}&port={self.port}"

    def create_database(self, name: str) -> str:
        import psycopg

        with psycopg.connect(host=str(self.sock), port=self.port, user="postgres", dbname="postgres",
                             autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def stop(self) -> None:
        if self.started:
            self._run(str(pg_bindir() / "pg_ctl"), "-D", str(self.data), "-m", "immediate", "-w", "stop")
            self.started = False
        shutil.rmtree(self.dir, ignore_errors=True)
