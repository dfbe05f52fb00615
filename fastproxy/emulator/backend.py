"""A throwaway PostgreSQL server: initdb in a temp dir, start on loopback, stop and remove.

The emulator (``--backend postgres``) and the test suite both use it. PostgreSQL refuses to run as
root, so when we are root the server runs as the ``postgres`` user.

Authentication design (how AUTO_IAM logins work without a password on the client side):

* every IAM principal known to the emulator gets a database role, member of ``alloydb_iam_user``;
* ``pg_hba.conf`` lets members of that group log in only with a *password* (cleartext method, on
  loopback) and the password of every IAM role is a random secret that only the emulator holds;
* after a successful AUTO_IAM metadata exchange, the emulator's server side answers the backend's
  password request itself with that secret and hides it from the client, which therefore logs in
  "with no password", as on AlloyDB. A client that bypasses the emulator does not know the secret
  and is refused;
* every other role uses SCRAM as usual (DB_NATIVE passes through untouched).

The superuser is set up in single-user mode before the server starts, so no administrative
password ever needs to be sent over a socket and nothing secret is written to disk except the
SCRAM verifiers PostgreSQL itself stores.
"""

from __future__ import annotations

import logging
import os
import pwd
import secrets
import shutil
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger("fastproxy.emulator.backend")

IAM_GROUP = "alloydb_iam_user"
DEFAULT_SUPERUSER_PASSWORD = "postgres"
_PG_BIN_CANDIDATES = [
    "/usr/lib/postgresql/17/bin",
    "/usr/lib/postgresql/16/bin",
    "/usr/lib/postgresql/15/bin",
]
_START_TIMEOUT_S = 60.0


class BackendError(RuntimeError):
    """PostgreSQL could not be set up or started; the message names the step that failed."""


def find_pg_bin() -> Path:
    """Where initdb and postgres live (PG_BIN overrides; Debian's versioned dirs otherwise)."""
    env = os.environ.get("PG_BIN")
    candidates = [env] if env else []
    candidates += _PG_BIN_CANDIDATES
    found = shutil.which("initdb")
    if found:
        candidates.append(str(Path(found).parent))
    for c in candidates:
        if c and (Path(c) / "initdb").exists() and (Path(c) / "postgres").exists():
            return Path(c)
    raise BackendError(
        "PostgreSQL server binaries (initdb, postgres) not found: install postgresql "
        "(apt-get install postgresql) or set PG_BIN"
    )


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _quote_ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _quote_literal(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


@dataclass
class ThrowawayPostgres:
    """One PostgreSQL server living in a temporary directory for the lifetime of this object."""

    host: str = "127.0.0.1"
    port: int = 0
    superuser_password: str = DEFAULT_SUPERUSER_PASSWORD
    iam_roles: list[str] = field(default_factory=list)
    iam_password: str = field(default_factory=lambda: secrets.token_urlsafe(24))
    max_connections: int = 200
    workdir: Path | None = None
    _proc: subprocess.Popen[bytes] | None = None

    # ------------------------------------------------------------------------------------------
    def start(self) -> None:
        pg_bin = find_pg_bin()
        self.workdir = Path(tempfile.mkdtemp(prefix="fastproxy-pg-"))
        data = self.workdir / "data"
        sockdir = self.workdir / "sock"
        sockdir.mkdir()
        run_as = self._run_as_user()
        if run_as is not None:
            uid, gid = run_as
            os.chown(self.workdir, uid, gid)
            os.chown(sockdir, uid, gid)
        if not self.port:
            self.port = free_port(self.host)
        try:
            self._initdb(pg_bin, data)
            self._configure(data)
            self._bootstrap_roles(pg_bin, data)
            self._launch(pg_bin, data, sockdir)
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.terminate()  # SIGTERM = smart shutdown; fast enough for a throwaway server
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if self.workdir is not None:
            shutil.rmtree(self.workdir, ignore_errors=True)
            self.workdir = None

    def __enter__(self) -> ThrowawayPostgres:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ------------------------------------------------------------------------------------------
    @staticmethod
    def _run_as_user() -> tuple[int, int] | None:
        if os.geteuid() != 0:
            return None
        try:
            pw = pwd.getpwnam("postgres")
        except KeyError as exc:
            raise BackendError(
                "running as root but there is no 'postgres' user to run PostgreSQL as"
            ) from exc
        return pw.pw_uid, pw.pw_gid

    def _preexec(self) -> None:
        run_as = self._run_as_user()
        if run_as is not None:
            os.setgid(run_as[1])
            os.setuid(run_as[0])

    def _run(self, argv: list[str], what: str, stdin: bytes | None = None) -> str:
        proc = subprocess.run(
            argv,
            input=stdin,
            capture_output=True,
            preexec_fn=self._preexec,
            cwd=str(self.workdir),
            timeout=120,
            check=False,
        )
        if proc.returncode != 0:
            out = (proc.stdout + proc.stderr).decode(errors="replace").strip()
            raise BackendError(f"{what} failed (exit {proc.returncode}): {out[-2000:]}")
        return proc.stdout.decode(errors="replace")

    def _initdb(self, pg_bin: Path, data: Path) -> None:
        # initdb reads the superuser password from a file; it lives (mode 0600, owned by the
        # server's user) only for the duration of initdb. /dev/stdin does not work once we have
        # dropped to the postgres user: the pipe belongs to root.
        assert self.workdir is not None
        pwfile = self.workdir / "pwfile"
        fd = os.open(pwfile, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(self.superuser_password + "\n")
        run_as = self._run_as_user()
        if run_as is not None:
            os.chown(pwfile, *run_as)
        try:
            self._run(
                [
                    str(pg_bin / "initdb"),
                    "-D",
                    str(data),
                    "-U",
                    "postgres",
                    "--auth=scram-sha-256",
                    f"--pwfile={pwfile}",
                    "--no-sync",
                    "-E",
                    "UTF8",
                    "--locale=C",
                ],
                "initdb",
            )
        finally:
            pwfile.unlink(missing_ok=True)

    def _configure(self, data: Path) -> None:
        hba = (
            "# Written by fastproxy's emulator. IAM roles log in only with the emulator's secret,\n"
            "# which it sends on the client's behalf after an AUTO_IAM metadata exchange.\n"
            f"host all +{IAM_GROUP} 127.0.0.1/32 password\n"
            f"host all +{IAM_GROUP} ::1/128 password\n"
            f"local all +{IAM_GROUP} reject\n"
            "local all all scram-sha-256\n"
            "host all all 127.0.0.1/32 scram-sha-256\n"
            "host all all ::1/128 scram-sha-256\n"
        )
        (data / "pg_hba.conf").write_text(hba)
        with open(data / "postgresql.conf", "a") as conf:
            conf.write(
                "\n# fastproxy emulator throwaway settings\n"
                f"listen_addresses = '{self.host}'\n"
                f"port = {self.port}\n"
                f"max_connections = {self.max_connections}\n"
                "fsync = off\nsynchronous_commit = off\nfull_page_writes = off\n"
                "shared_buffers = 128MB\n"
                "password_encryption = 'scram-sha-256'\n"
                "logging_collector = off\n"
                "log_min_messages = warning\n"
            )

    def _bootstrap_sql(self) -> str:
        stmts = [f"CREATE ROLE {IAM_GROUP} NOLOGIN;"]
        for role in dict.fromkeys(self.iam_roles):
            ident = _quote_ident(role)
            if role != "postgres":
                stmts.append(f"CREATE ROLE {ident} LOGIN;")
            stmts.append(f"ALTER ROLE {ident} PASSWORD {_quote_literal(self.iam_password)};")
            stmts.append(f"GRANT {IAM_GROUP} TO {ident};")
            stmts.append(f"GRANT ALL ON SCHEMA public TO {ident};")
            stmts.append(f"GRANT pg_read_all_data, pg_write_all_data TO {ident};")
        return "\n".join(stmts) + "\n"

    def _bootstrap_roles(self, pg_bin: Path, data: Path) -> None:
        # Single-user mode: one statement per line; no server is listening yet.
        self._run(
            [str(pg_bin / "postgres"), "--single", "-D", str(data), "-j", "postgres"],
            "role bootstrap",
            stdin=self._bootstrap_sql().replace(";\n", ";\n\n").encode(),
        )

    def _launch(self, pg_bin: Path, data: Path, sockdir: Path) -> None:
        assert self.workdir is not None
        with open(self.workdir / "postgres.log", "wb") as logfile:
            self._proc = subprocess.Popen(
                [str(pg_bin / "postgres"), "-D", str(data), "-k", str(sockdir)],
                stdout=logfile,
                stderr=subprocess.STDOUT,
                preexec_fn=self._preexec,
                cwd=str(self.workdir),
                start_new_session=True,
            )
        deadline = time.monotonic() + _START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise BackendError(f"postgres exited at start: {self.log_tail()}")
            if self._accepts_connections():
                log.info("PostgreSQL listening on %s:%d", self.host, self.port)
                return
            time.sleep(0.05)
        raise BackendError(f"postgres did not accept connections in time: {self.log_tail()}")

    def _accepts_connections(self) -> bool:
        """True once the server answers a protocol-level SSLRequest (not just a TCP accept)."""
        try:
            with socket.create_connection((self.host, self.port), timeout=1) as s:
                s.sendall(b"\x00\x00\x00\x08\x04\xd2\x16\x2f")
                return s.recv(1) in (b"N", b"S")
        except OSError:
            return False

    def log_tail(self, n: int = 2000) -> str:
        if self.workdir is None:
            return ""
        try:
            return (self.workdir / "postgres.log").read_text(errors="replace")[-n:]
        except OSError:
            return ""
