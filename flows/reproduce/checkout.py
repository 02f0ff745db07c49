"""A registered version's commit and data, restored side by side in a temporary checkout.

git gives back the code (``git worktree add --detach``, in a temp directory outside the
project, removed on every way out); DVC gives back the data version by its hash. The
checkout shares the project's DVC cache and remotes, so a version trained here comes out
of the cache without copying through a remote, and one trained elsewhere is pulled once
into the project's cache. Every command is an argument list: the commit and the hash
were checked against strict patterns before they get here, and nothing reaches a shell.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

import yaml

from flows.common import DATA_OUT, locked_data_version
from flows.reproduce.rules import VersionRecord
from tasks.errors import DataUnavailableError, ReproduceError

GIT_TIMEOUT_S = 120
MISSING_FROM_REMOTE = "Missing cache files"  # dvc pull's warning when no storage has it


def git(project: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["git", *args], cwd=project, capture_output=True, text=True, timeout=GIT_TIMEOUT_S
    )


def check_commit_known(project: Path, commit: str, uri: str) -> None:
    """Refuse a commit this repository does not have, before any checkout starts."""
    if git(project, "rev-parse", "--is-inside-work-tree").returncode != 0:
        raise ReproduceError(f"{project} is not a git checkout: run this in the project's clone")
    if git(project, "cat-file", "-e", f"{commit}^{{commit}}").returncode != 0:
        raise ReproduceError(
            f"{uri} was trained from commit {commit}, which the git repository at {project} "
            "does not have: fetch the branch that holds it (`git fetch --all`) or run this "
            "in the clone it was trained in"
        )


@contextmanager
def temporary_checkout(project: Path, commit: str) -> Iterator[Path]:
    """``commit`` checked out in a fresh temp directory; removed, and unregistered from the
    project's git, however the block ends (an error, Ctrl-C, SIGTERM turned into one)."""
    scratch = Path(tempfile.mkdtemp(prefix="reproduce-")).resolve()
    checkout = scratch / "checkout"
    try:
        added = git(project, "worktree", "add", "--detach", str(checkout), commit)
        if added.returncode != 0:
            reason = (added.stderr.strip().splitlines() or ["no reason given"])[-1]
            raise ReproduceError(f"`git worktree add` of {commit} failed: {reason}")
        yield checkout
    finally:
        with suppress(Exception):
            git(project, "worktree", "remove", "--force", str(checkout))
        shutil.rmtree(scratch, ignore_errors=True)
        with suppress(Exception):
            git(project, "worktree", "prune")


def share_dvc_storage(project: Path, checkout: Path) -> dict[str, Any]:
    """Point the checkout's DVC at the project's cache and remotes (its git-ignored local
    config). The commit's own config may name the remote by a path relative to the
    repository, which from a temp directory would point elsewhere, and the project's local
    config (credentials, a relocated remote) is not in git at all. DVC's per-repository
    scratch index goes inside the checkout too, so nothing of it outlives the run.

    Returns {"cache": dir, "remote": name or None, "url": its URL or None} for messages.
    """
    from dvc.config import Config
    from dvc.repo import Repo

    with Repo(str(project)) as repo:
        cache_dir = repo.cache.local_cache_dir
        remotes = {name: dict(section) for name, section in repo.config["remote"].items()}
        default = repo.config["core"].get("remote")
    with Config(dvc_dir=str(checkout / ".dvc")).edit("local") as local:
        local["cache"]["dir"] = cache_dir
        local["core"]["site_cache_dir"] = str(checkout / ".dvc" / "tmp" / "site")
        local["remote"] = remotes
        if default:
            local["core"]["remote"] = default
    url = remotes.get(default, {}).get("url") if default else None
    return {"cache": cache_dir, "remote": default, "url": url and str(url)}


def with_data_version(lock: dict[str, Any], version: str) -> dict[str, Any]:
    """``lock`` (a parsed dvc.lock, possibly empty) pinning data/prepared at ``version``."""
    stages = dict(lock.get("stages") or {})
    data = dict(stages.get("data") or {"cmd": "python -m flows.stage data"})
    outs = [out for out in data.get("outs", []) if out.get("path") != DATA_OUT]
    data["outs"] = [*outs, {"path": DATA_OUT, "hash": "md5", "md5": version}]
    return {"schema": lock.get("schema", "2.0"), **lock, "stages": stages | {"data": data}}


@contextmanager
def data_version_pinned(checkout: Path, version: str) -> Iterator[bool]:
    """While DVC restores data, the checkout's dvc.lock pins ``version`` for data/prepared.

    Yields whether the commit's own dvc.lock already did. It often does not: dvc.lock is
    usually committed after the `dvc repro` that registered the version. The registry's
    hash is what the model trained on, so it is the one restored. The committed dvc.lock
    comes back afterwards, so the reproduction runs on an unmodified checkout.
    """
    lock = checkout / "dvc.lock"
    committed = lock.read_text() if lock.is_file() else None
    try:
        pinned = locked_data_version(checkout) == version
    except DataUnavailableError:  # no dvc.lock, or none pinning data/prepared
        pinned = False
    if not pinned:
        lock.write_text(
            yaml.safe_dump(with_data_version(yaml.safe_load(committed or "{}") or {}, version))
        )
    try:
        yield pinned
    finally:
        if committed is None:
            lock.unlink(missing_ok=True)
        elif not pinned:
            lock.write_text(committed)


def dvc(checkout: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "dvc", *args], cwd=checkout, capture_output=True, text=True
    )


def restore_data(project: Path, checkout: Path, record: VersionRecord) -> str:
    """Bring data/prepared at the version's hash into the checkout: from the project's DVC
    cache, else pulled from its remote. Returns how, for the user; refuses with the hash,
    where the version's data was kept and the way out when neither has it."""
    from tasks.tracking.lineage import dvc_hash

    version = record.data_version
    storage = share_dvc_storage(project, checkout)
    with data_version_pinned(checkout, version) as pinned:
        source = f"the DVC cache {storage['cache']}"
        if dvc(checkout, "checkout", DATA_OUT).returncode != 0:
            pulled = dvc(checkout, "pull", DATA_OUT)
            if pulled.returncode != 0:
                output = pulled.stdout + pulled.stderr
                if MISSING_FROM_REMOTE in output:
                    why = "nor on the DVC remote"
                else:
                    errors = [line for line in output.splitlines() if line.startswith("ERROR")]
                    why = f"and `dvc pull` failed ({(errors or ['no reason given'])[0]})"
                raise ReproduceError(missing_data_message(record, storage, why))
            source = f"DVC remote {storage['remote']!r} ({storage['url']})"
    restored = dvc_hash(checkout / DATA_OUT)
    if restored != version:
        raise ReproduceError(
            f"{DATA_OUT} restored for {record.uri} hashes to {restored}, not {version}: the "
            f"DVC cache {storage['cache']} is damaged; remove the objects `dvc cache` names "
            "and `dvc pull` again"
        )
    lock = "pinned by the commit's dvc.lock" if pinned else "not in the commit's dvc.lock"
    return f"{DATA_OUT} {version} ({lock}) from {source}"


def check_data_available(project: Path, record: VersionRecord) -> None:
    """Refuse, before any checkout, a data version that is neither in the project's DVC
    cache nor on its default remote (its directory listing, which DVC pushes last)."""
    from dvc.config import NoRemoteError
    from dvc.repo import Repo

    listing = record.data_version  # the object id: <md5>.dir
    with Repo(str(project)) as repo:
        if repo.cache.local.exists(listing):
            return
        storage = {"cache": repo.cache.local.path, "remote": repo.config["core"].get("remote")}
        storage["url"] = repo.config["remote"].get(storage["remote"] or "", {}).get("url")
        try:
            if repo.cloud.get_remote_odb(None, "pull").exists(listing):
                return
            why = "nor on the DVC remote"
        except NoRemoteError:
            why = "and no DVC remote is configured here"
        except Exception as error:  # the remote's own error type varies (S3, SSH, local)
            why = f"and the DVC remote could not be asked ({type(error).__name__}: {error})"
    raise ReproduceError(missing_data_message(record, storage, why))


def missing_data_message(record: VersionRecord, storage: dict[str, Any], why: str) -> str:
    """One line: which hash is missing, where it was looked for, where the version's
    register stage kept it (its data_storage tag), and what would have prevented it."""
    looked = (
        f"data version {record.data_version} of {DATA_OUT} ({record.uri}) is not in the DVC "
        f"cache {storage['cache']} {why}"
    )
    if storage["remote"] is not None and why.startswith("nor"):
        looked += f" {storage['remote']!r} ({storage['url']})"
    kept = record.data_storage
    if kept is None:  # registered before the register stage kept its data in DVC
        return (
            f"{looked}; the version does not say where its data was kept (registered before "
            "the register stage pushed it): run `dvc push` in the clone where it was trained, "
            "if its data is in that clone's DVC cache, or point this clone at the storage "
            "that has it (`dvc remote modify --local <remote> url <url>`)"
        )
    if kept.startswith("DVC remote "):
        return (
            f"{looked}; it was pushed to {kept}: point this clone at that storage "
            f"(`dvc remote add -d <name> <url>`, or `dvc remote modify --local <name> url <url>`)"
        )
    if kept.startswith("none"):
        return (
            f"{looked}; it was never kept in DVC ({kept.partition(': ')[2]}): train with a "
            "run directory inside the project (the default runs/<id>/) so register keeps it"
        )
    return (
        f"{looked}; its register stage kept it in the {kept}: run `dvc push` in the clone "
        "that trained it while that cache still has it; a DVC remote configured before "
        "training (`dvc remote add -d storage <url>`) would have received it at registration"
    )
