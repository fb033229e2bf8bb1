"""What is released of the schema, and how a test reaches an older version.

Released schema versions are installed in the wild, so the files that made them are frozen:
``pgdurable/sql/baseline/v1.sql`` (the oldest released schema, the start of every upgrade
test) and each ``pgdurable/sql/migrations/<n>-<n+1>.sql`` up to the last released version.
``pgdurable/sql/released.sha256`` lists their sha256 in ``sha256sum`` format (paths relative
to ``pgdurable/sql``; ``cd pgdurable/sql && sha256sum -c released.sha256`` checks it by hand).

- :func:`problems` says what is wrong with the released files (test_migrations runs it);
- :func:`freeze` is the release step (``make schema-freeze`` runs ``python -m
  tests.migration.released freeze``): it records the current version's migration and refuses
  to change a version already recorded;
- :func:`install_at` makes a database at an older version: v1 + the migrations up to it;
- :func:`released_schema` reads from git history the schema a released package installed,
  for the few tests that need it exactly (the migrations re-make the current functions, so
  v1 + migrations up to N has version N's tables but today's functions);
- :func:`package_commit` and :func:`export_package` find and unpack from git history the
  whole *package* of a released version, for tests that run an older ``pgdurable serve``
  beside this one (tests/acceptance/test_rolling_upgrade.py).

Baselines are test material: they do not ship in the wheel and nothing in ``pgdurable/``
reads them.
"""

from __future__ import annotations

import hashlib
import re
import subprocess
import sys
from pathlib import Path

import psycopg
from psycopg import sql

from pgdurable import schema
from pgdurable.roles import ensure_launcher, ensure_roles

SQL_DIR = Path(schema.__file__).parent / "sql"
BASELINE = SQL_DIR / "baseline" / "v1.sql"
OLDEST = 1
SUMS = SQL_DIR / "released.sha256"
REPO = SQL_DIR.parent.parent

# The frozen schema of versions 2-4 as their packages installed it: baseline/v<n>.sql, in the
# tree until the baselines were reduced to v1 (git blob ids: `git cat-file blob <id>` prints
# one in any clone with full history; a shallow clone needs `git fetch --unshallow`).
GIT_BLOBS = {
    2: "b4a48da7244b2fc1e8d8b5330255b9dda03274d0",
    3: "3aee8e6c8bfae39ea13b653efd800d60221a483c",
    4: "a8c169fa169a61bec036394e3b363ad49ef7af64",
}

RELEASE_HELP = (
    "released schema files are frozen (databases in the wild were made by them): restore it "
    "with `git checkout -- pgdurable/sql/{f}` and put the change in a new migration "
    "migrations/<n>-<n+1>.sql of the next version (docs/schema-changes.md)"
)


def released_file(version: int) -> str:
    """The file (relative to pgdurable/sql) whose release made ``version``."""
    if version < OLDEST:
        raise ValueError(f"no schema version {version}")
    return "baseline/v1.sql" if version == OLDEST else f"migrations/{version - 1}-{version}.sql"


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def recorded(sums: Path = SUMS) -> dict[str, str]:
    """The recorded checksums: file (relative to pgdurable/sql) -> sha256."""
    out: dict[str, str] = {}
    for n, line in enumerate(sums.read_text().splitlines(), 1):
        if not line.strip():
            continue
        digest, sep, name = line.partition("  ")
        if not sep or len(digest) != 64 or name in out:
            raise ValueError(
                f"{sums.name} line {n}: not '<sha256>  <file>' once per file: {line!r}"
            )
        out[name] = digest
    return out


def released_versions(sums: Path = SUMS) -> list[int]:
    """The released versions, in order (a version is released when its file is recorded)."""
    files = recorded(sums)
    out, v = [], OLDEST
    while released_file(v) in files:
        out.append(v)
        v += 1
    return out


def problems(sql_dir: Path = SQL_DIR, sums: Path | None = None) -> list[str]:
    """Everything wrong with the released files, one sentence each (empty: all is well)."""
    sums = sums or sql_dir / SUMS.name
    files = recorded(sums)
    versions = released_versions(sums)
    out: list[str] = []
    expected = {released_file(v) for v in versions}
    for name in sorted(set(files) - expected):
        out.append(
            f"{sums.name} records {name}, which is not the file of a released version after "
            f"{versions[-1] if versions else 'none'} (each version N is recorded once, in order: "
            "baseline/v1.sql, migrations/1-2.sql, ...)"
        )
    for name, digest in files.items():
        path = sql_dir / name
        if not path.exists():
            out.append(f"released {name} is gone: {RELEASE_HELP.format(f=name)}")
        elif sha256(path) != digest:
            out.append(
                f"released {name} changed (sha256 {sha256(path)}, released as {digest}), a "
                f"comment or whitespace counts too: {RELEASE_HELP.format(f=name)}"
            )
    return out


def freeze(version: int, sql_dir: Path = SQL_DIR, sums: Path | None = None) -> str:
    """Record the file that makes ``version`` as released; what was done, as a sentence.
    Raises ValueError when it cannot: the file is missing, the version before it is not
    released, or the version is already recorded with other content."""
    sums = sums or sql_dir / SUMS.name
    name = released_file(version)
    path = sql_dir / name
    if not path.exists():
        raise ValueError(f"schema version {version} has no {name} to release")
    files = recorded(sums) if sums.exists() else {}
    if name in files:
        if files[name] == sha256(path):
            return f"schema version {version} is already released ({name}); nothing to do"
        raise ValueError(
            f"refusing to freeze: schema version {version} was released with another "
            f"{name} (sha256 {files[name]}; now {sha256(path)}). A released file never "
            "changes: restore it with `git checkout -- pgdurable/sql/"
            f"{name}`, bump SCHEMA_VERSION and put the change in the next migration"
        )
    if version > OLDEST and released_file(version - 1) not in files:
        raise ValueError(
            f"refusing to freeze: schema version {version - 1} is not released "
            f"({released_file(version - 1)} is not in {sums.name}); versions are released in order"
        )
    with sums.open("a") as f:
        f.write(f"{sha256(path)}  {name}\n")
    return f"released schema version {version}: {name} recorded in {sums.name}"


def _apply_baseline(conn: psycopg.Connection[object]) -> None:
    """Version 1 as pgdurable 0.1 installed it: the whole file as the installer (no owner
    role then), the version recorded."""
    text = BASELINE.read_text()
    conn.execute(schema.render(text, engine="pgdurable", op_schema="pg_catalog").encode())
    conn.execute("insert into pgdurable.migrations (version, package) values (1, 'baseline')")
    conn.execute("insert into pgdurable._worker_ready (schema_version) values (1)")


def install_at(dsn: str, version: int) -> None:
    """Make the empty database at ``dsn`` schema version ``version``: baseline/v1.sql, then
    the migrations up to it (as ``pgdurable install`` of that version's package upgrades)."""
    if not OLDEST <= version <= schema.SCHEMA_VERSION:
        raise ValueError(f"no schema version {version} (1..{schema.SCHEMA_VERSION})")
    with psycopg.connect(dsn) as conn:
        _apply_baseline(conn)
    if version > OLDEST:
        got = schema.install(dsn, target_version=version)
        assert got.to_version == version, got


def released_schema(version: int) -> str | None:
    """The schema text the package of released ``version`` installed, from git history; None
    where this checkout has no such history (a shallow clone, an unpacked sdist)."""
    if version == OLDEST:
        return BASELINE.read_text()
    blob = GIT_BLOBS[version]
    try:
        res = subprocess.run(
            ["git", "-C", str(REPO), "cat-file", "blob", blob],
            capture_output=True,
            check=False,
            timeout=30,
        )
    except FileNotFoundError:
        return None
    return res.stdout.decode() if res.returncode == 0 else None


def install_released(dsn: str, version: int) -> bool:
    """Make the empty database at ``dsn`` schema version ``version`` exactly as that version's
    package installed it (:func:`released_schema`); False where git history is missing.
    Before version 3 the installer owned everything; from 3 on every object is
    pgdurable_owner's but the operators (part 20), which are the installer's."""
    text = released_schema(version)
    if text is None:
        return False
    with psycopg.connect(dsn) as conn:
        if version < 3:
            conn.execute(schema.render(text, engine="pgdurable", op_schema="pg_catalog").encode())
        else:
            ensure_roles(conn)
            for s in ("df", "pgdurable", "pgdurable_exec"):
                conn.execute(
                    sql.SQL("create schema {} authorization pgdurable_owner").format(
                        sql.Identifier(s)
                    )
                )
            for part in re.split(r"(?m)^(?=-- pgdurable schema, part \d\d)", text):
                if not part.strip():
                    continue
                as_owner = not part.startswith("-- pgdurable schema, part 20")
                if as_owner:
                    conn.execute("set role pgdurable_owner")
                conn.execute(
                    schema.render(part, engine="pgdurable", op_schema="pg_catalog").encode()
                )
                conn.execute("reset role")
        conn.execute(
            "insert into pgdurable.migrations (version, package) values (%s, 'released')",
            (version,),
        )
        conn.execute("insert into pgdurable._worker_ready (schema_version) values (%s)", (version,))
        assert schema.installed_version(conn) == version
        if version >= schema.LAUNCHER_SINCE:
            ensure_launcher(conn, "pgdurable")  # every install of those packages made it
    return True


# -- older packages from git history -----------------------------------------------------------


class NoHistory(RuntimeError):
    """This checkout cannot give an older package: the message says why and what to run."""


def _git(*args: str) -> str:
    try:
        res = subprocess.run(
            ["git", "-C", str(REPO), *args], capture_output=True, check=False, timeout=60
        )
    except FileNotFoundError:
        raise NoHistory("git is not installed: older packages come from git history") from None
    if res.returncode != 0:
        raise NoHistory(
            f"`git {' '.join(args)}` failed in {REPO}: {res.stderr.decode(errors='replace')}"
        )
    return res.stdout.decode()


def _schema_version_at(commit: str) -> int:
    text = _git("show", f"{commit}:pgdurable/schema.py")
    m = re.search(r"(?m)^SCHEMA_VERSION = (\d+)$", text)
    if not m:
        raise NoHistory(f"commit {commit} has no SCHEMA_VERSION in pgdurable/schema.py")
    return int(m.group(1))


def _need_full_history() -> None:
    if not (REPO / ".git").exists():
        raise NoHistory(f"{REPO} is not a git checkout (an unpacked sdist?): no older packages")
    if _git("rev-parse", "--is-shallow-repository").strip() == "true":
        raise NoHistory("a shallow clone has no older packages: `git fetch --unshallow` gives them")


def package_commit(version: int) -> str:
    """The commit whose package a user of released schema ``version`` runs: on the main
    line (first parents from HEAD), the last commit whose package had ``SCHEMA_VERSION =
    version`` (the first parent of the commit that opened the next version). For the version
    this checkout itself has (released, not bumped since) that would be HEAD: then the commit
    that released it (``make schema-freeze`` recording its file in released.sha256).
    :class:`NoHistory` in a shallow clone or without git."""
    if version not in released_versions():
        raise ValueError(f"schema version {version} is not released ({released_versions()})")
    _need_full_history()
    changes = _git(
        "rev-list", "--first-parent", "HEAD", "--", "pgdurable/schema.py"
    ).split()  # newest first: the commits that changed the file on the main line
    newer: str | None = None
    for commit in changes:
        if _schema_version_at(commit) == version:
            if newer is not None:  # `newer` opened version+1: its first parent is the last
                return _git("rev-parse", f"{newer}^1").strip()
            break
        newer = commit
    else:
        raise NoHistory(f"no commit on the main line has SCHEMA_VERSION = {version}")
    # the version HEAD has: the commit that released it
    name = released_file(version)
    for commit in _git(
        "rev-list", "--first-parent", "HEAD", "--", "pgdurable/sql/released.sha256"
    ).split()[::-1]:  # oldest first
        if f"  {name}\n" in _git("show", f"{commit}:pgdurable/sql/released.sha256"):
            return commit
    raise NoHistory(f"no commit records the release of {name} in released.sha256")


def export_package(commit: str, dest: Path) -> Path:
    """The tree of ``commit`` unpacked into ``dest`` (``git archive``); returns ``dest``. Run
    its package with ``PYTHONPATH=dest`` and ``cwd=dest``: it has no compiled scheduler, so
    its pure-Python twin runs (``PGDURABLE_IMPL=python`` says so explicitly)."""
    dest.mkdir(parents=True, exist_ok=True)
    archive = subprocess.run(
        ["git", "-C", str(REPO), "archive", commit],
        capture_output=True,
        check=False,
        timeout=120,
    )
    if archive.returncode != 0:
        raise NoHistory(f"`git archive {commit}` failed: {archive.stderr.decode(errors='replace')}")
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive.stdout, check=True, timeout=120)
    return dest


def main(argv: list[str]) -> int:
    if argv != ["freeze"]:
        print("usage: python -m tests.migration.released freeze", file=sys.stderr)
        return 2
    try:
        print(freeze(schema.SCHEMA_VERSION))
    except ValueError as exc:
        print(f"schema-freeze: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
