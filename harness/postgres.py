"""A private PostgreSQL server a test owns: started on an address it names, stopped, killed and restarted at will.

The fault tests (issue #38) restart the database under load and run it inside a network namespace that stands
for a database host, so they cannot use the machine's own server (CI's, shared by every test) or ``pgserver``'s
helper (which listens on a Unix socket and starts once per data directory).  This drives the same PostgreSQL
binaries ``pgserver`` ships in the test extra: ``initdb`` once, then ``pg_ctl`` as often as a test asks.

PostgreSQL refuses to run as root, so under root every command runs as the ``pgserver`` system user (the one
``pgserver`` itself creates), through ``runuser``, after an optional ``prefix`` such as
``["ip", "netns", "exec", "db"]`` that places the server in a namespace.
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

from harness.processes import pid_alive

SYSTEM_USER = "pgserver"


def binaries() -> Path:
    """The directory of ``pgserver``'s PostgreSQL programs (ImportError when the test extra is missing)."""
    from pgserver._commands import POSTGRES_BIN_PATH

    return Path(POSTGRES_BIN_PATH)


class PostgresServer:
    """One PostgreSQL cluster in ``data_dir``, listening on ``host:port`` (trust auth, superuser ``postgres``)."""

    def __init__(self, data_dir: Path, host: str, port: int, *, prefix: list[str] | None = None) -> None:
        if os.geteuid() == 0:
            # The server runs as another user, who must reach its directory for as long as it runs; pytest makes
            # its temporary root 0700 again whenever a pytest process starts (another xdist worker, a test run
            # beside the suite), which crashed a server kept under it ("could not stat data directory").  So,
            # under root, the data lives in a directory of its own under the system's temporary directory.
            own = Path(tempfile.mkdtemp(prefix=f"corral-pg-{data_dir.name}-"))
            own.chmod(0o755)
            data_dir = own / "data"
        self.data_dir = data_dir
        self.host = host
        self.port = port
        self.prefix = list(prefix or [])
        self.log = data_dir.parent / f"{data_dir.name}.log"
        self.bin = binaries()

    # -- commands --------------------------------------------------------------------------------------------

    def _as_owner(self, program: str, *args: str) -> list[str]:
        command = [str(self.bin / program), *args]
        if os.geteuid() == 0:
            command = ["runuser", "-u", SYSTEM_USER, "--", *command]
        return [*self.prefix, *command]

    def _run(self, program: str, *args: str, timeout: float = 60) -> None:
        subprocess.run(self._as_owner(program, *args), check=True, capture_output=True, timeout=timeout)

    # -- life ------------------------------------------------------------------------------------------------

    def init(self) -> PostgresServer:
        """Create the cluster (once; a second call keeps the data)."""
        if (self.data_dir / "PG_VERSION").exists():
            return self
        self.data_dir.mkdir(parents=True, exist_ok=True)
        if os.geteuid() == 0:
            _ensure_system_user()
            _open_path_to(self.bin, self.data_dir)
            entry = pwd.getpwnam(SYSTEM_USER)
            os.chown(self.data_dir, entry.pw_uid, entry.pw_gid)
            self.log.touch()
            os.chown(self.log, entry.pw_uid, entry.pw_gid)
        self._run("initdb", "--auth=trust", "--encoding=utf8", "-U", "postgres", "-D", str(self.data_dir))
        with open(self.data_dir / "postgresql.conf", "a") as conf:
            # Quick to stop and to recover: the tests restart it under load.  Without fsync a commit still reaches
            # the kernel before it is acknowledged, so a stop or a kill of the server (not of the machine) loses
            # nothing; synchronous_commit stays on: off, an immediate stop (a crash, to PostgreSQL) loses the commits
            # acknowledged in the last three wal_writer_delays, which no production server does and no client repairs.
            conf.write("fsync = off\nfull_page_writes = off\nmax_connections = 200\n")
        return self

    def start(self, timeout: float = 60) -> None:
        """Start the server and wait until it accepts connections."""
        options = f"-h {self.host} -p {self.port} -k {self.data_dir}"
        self._run("pg_ctl", "-D", str(self.data_dir), "-l", str(self.log), "-o", options, "-w",
                  "-t", str(int(timeout)), "start", timeout=timeout + 10)

    def stop(self, mode: str = "fast") -> None:
        """Stop the server: ``fast`` ends sessions cleanly, ``immediate`` drops them as a crash would."""
        if self.pid() is not None:
            self._run("pg_ctl", "-D", str(self.data_dir), "-m", mode, "-w", "stop")

    def kill(self) -> None:
        """SIGKILL the postmaster, as a lost host would leave it (its backends follow it out)."""
        pid = self.pid()
        if pid is not None:
            os.kill(pid, signal.SIGKILL)
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline and pid_alive(pid):
                time.sleep(0.05)

    def restart(self, down_for: float = 0.0) -> None:
        """An immediate stop, ``down_for`` seconds of no server, then a start (crash recovery included)."""
        self.stop("immediate")
        time.sleep(down_for)
        self.start()

    def pid(self) -> int | None:
        """The running postmaster's pid, if any."""
        try:
            pid = int((self.data_dir / "postmaster.pid").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None
        return pid if pid_alive(pid) else None

    def create_database(self, name: str) -> None:
        self._run("psql", "-h", self.host, "-p", str(self.port), "-U", "postgres", "-d", "postgres",
                  "-c", f'CREATE DATABASE "{name}"')

    def url(self, database: str = "postgres") -> str:
        """The SQLAlchemy URL corral takes as ``DATABASE_URL``."""
        return f"postgresql+psycopg://postgres@{self.host}:{self.port}/{database}"

    def remove(self) -> None:
        """Stop (immediately) and delete the data."""
        try:
            self.stop("immediate")
        except subprocess.CalledProcessError:
            self.kill()
        shutil.rmtree(self.data_dir, ignore_errors=True)
        if self.data_dir.parent.name.startswith("corral-pg-"):  # the directory of its own (see __init__)
            shutil.rmtree(self.data_dir.parent, ignore_errors=True)

    def __enter__(self) -> PostgresServer:
        self.init().start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()


def _ensure_system_user() -> None:
    try:
        pwd.getpwnam(SYSTEM_USER)
    except KeyError:
        subprocess.run(["useradd", "-s", "/bin/bash", SYSTEM_USER], check=True, capture_output=True)


def _open_path_to(*paths: Path) -> None:
    """Let the system user walk to each path (a test's temporary directory is often 0700 under root)."""
    for path in paths:
        for parent in [path, *path.parents]:
            if parent == Path("/"):
                break
            mode = parent.stat().st_mode
            if mode & 0o005 != 0o005:
                parent.chmod(mode | 0o005)
