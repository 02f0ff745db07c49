"""What a version stands on, recorded so it can be rebuilt: the git commit (``-dirty`` with
the diff of tracked files), the DVC hash of its data, the device it trained on."""

from __future__ import annotations

import os
import platform
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path


def dvc_hash(path: Path) -> str:
    """The md5 DVC records for this output in dvc.lock (``<md5>.dir`` for a directory)."""
    from dvc_data.hashfile.build import build
    from dvc_data.hashfile.db import HashFileDB
    from dvc_objects.fs.local import LocalFileSystem

    fs = LocalFileSystem()
    with tempfile.TemporaryDirectory() as scratch:
        _, _, obj = build(HashFileDB(fs, scratch), str(path), fs, "md5")
    return obj.hash_info.value


@dataclass(frozen=True)
class KeptData:
    """Where a version's data went: its DVC hashes, the project's cache, the remote."""

    hashes: dict[str, str]  # name -> DVC md5, as dvc_hash gives it
    cache: str | None  # the DVC cache directory; None outside a DVC project
    remote: str | None  # "<name> (<url>)" of the default DVC remote it was pushed to

    @property
    def storage(self) -> str:
        """The version's ``data_storage`` tag: what a clone needs to restore the data."""
        if self.cache is None:
            return "none: trained outside a DVC project"
        if self.remote is None:
            return f"DVC cache only ({self.cache}): no DVC remote was configured"
        return f"DVC remote {self.remote}"


def keep_in_dvc(root: Path, outputs: dict[str, Path]) -> KeptData:
    """Put ``outputs`` (directories a version depends on: the prepared data, preprocess's
    stats) into the DVC cache of the project ``root`` lies in, and push them to its default
    DVC remote when one is configured, so any clone can rebuild the version.

    DVC's own machinery, as `dvc commit` and `dvc push` run it: dvc-data builds each
    directory's content-addressed object and transfers it into the repository's cache
    (copied, never linked: a run directory may be deleted or rewritten), then the
    repository's DataCloud pushes those objects. Neither adds a .dvc file nor touches
    dvc.lock: a flow run's outputs (runs/<id>/) stay out of git and of `dvc status`.
    Objects already cached or on the remote are skipped, so under `dvc repro` (whose data
    stage cached them already) this costs one hash and the push.
    """
    from dvc.exceptions import NotDvcRepoError
    from dvc.repo import Repo
    from dvc_data.hashfile.build import build
    from dvc_data.hashfile.transfer import transfer
    from dvc_objects.fs.local import LocalFileSystem

    from tasks.errors import DataStorageError

    try:
        project = owning_project(Path(Repo.find_root(str(root))))
    except NotDvcRepoError:
        return KeptData({name: dvc_hash(path) for name, path in outputs.items()}, None, None)
    fs = LocalFileSystem()
    with Repo(str(project)) as repo:
        cache = repo.cache.local
        hashes, objects = {}, set()
        for name, path in outputs.items():
            staging, _, obj = build(cache, str(path), fs, "md5")
            transfer(staging, cache, {obj.hash_info}, shallow=False, hardlink=False)
            hashes[name] = obj.hash_info.value
            # DataCloud.push moves exactly the objects it is given: the listing and its files.
            objects |= {obj.hash_info, *(oid for _, _, oid in obj)}
        remote = repo.config["core"].get("remote")
        if not remote:
            return KeptData(hashes, cache.path, None)
        url = repo.config["remote"].get(remote, {}).get("url")
        where = f"{remote!r} ({url})"
        try:
            pushed = repo.cloud.push(objects, remote=remote)
        except Exception as error:  # the remote's own error type varies (S3, SSH, local)
            why = f"{type(error).__name__}: {error}"
            raise DataStorageError(push_failed(hashes, where, why)) from error
        if pushed.failed:
            raise DataStorageError(push_failed(hashes, where, f"{len(pushed.failed)} objects"))
    return KeptData(hashes, cache.path, where)


EXPERIMENT_WORKSPACES = (".dvc", "tmp", "exps")  # where `dvc exp run --temp/--queue` runs


def owning_project(root: Path) -> Path:
    """The project whose cache and remote a DVC repository at ``root`` uses: itself, or for
    the temporary workspace of `dvc exp run --temp` or `--queue`
    (``<project>/.dvc/tmp/exps/<name>/``) the project around it. DVC copies only the
    project's local config there, so a remote given relative to the project (this one's
    default, ``../../gpu-train-pipeline-dvc-storage``) would point inside .dvc/tmp/."""
    parts = root.resolve().parts
    size = len(EXPERIMENT_WORKSPACES)
    for start in range(len(parts) - size, 0, -1):
        if parts[start : start + size] == EXPERIMENT_WORKSPACES:
            return Path(*parts[:start])
    return root


def push_failed(hashes: dict[str, str], where: str, why: str) -> str:
    listed = ", ".join(f"{name} {value}" for name, value in hashes.items())
    return (
        f"pushing {listed} to DVC remote {where} failed ({why}); nothing was registered, since "
        "no other clone could rebuild the version: fix the remote (`dvc remote list`, "
        "`dvc push` to try it) and rerun, or unset it (`dvc remote default --unset`) to keep "
        "the data in this clone's DVC cache only"
    )


# `dvc repro` rewrites dvc.lock after every stage, before register: its changes are the
# run's own outputs (data_version and params tags), not a difference in the code.
NOT_LOCK = ("--", ".", ":(exclude)dvc.lock")


CHANGES_ARTIFACT = "lineage/tracked_changes.diff"  # a -dirty run's diff against its commit


def _git(root: Path, *args: str) -> str:
    """``git args`` in the nearest existing directory at or above ``root`` (a run directory
    may not exist yet when its run starts)."""
    cwd = next(path for path in (root, *root.resolve().parents) if path.is_dir())
    return subprocess.run(
        ["git", *args], cwd=cwd, capture_output=True, text=True, check=True
    ).stdout


def git_commit(root: Path) -> str:
    """HEAD's commit, with ``-dirty`` when tracked files differ from it; "unknown" outside git."""
    try:
        head = _git(root, "rev-parse", "HEAD").strip()
        dirty = _git(root, "status", "--porcelain", "--untracked-files=no", *NOT_LOCK).strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return f"{head}-dirty" if dirty else head


def tracked_changes(root: Path) -> str:
    """The diff of tracked files against HEAD: what a ``-dirty`` commit tag leaves out."""
    try:
        return _git(root, "diff", "HEAD", *NOT_LOCK)
    except (OSError, subprocess.CalledProcessError):
        return ""


def device_description(device: str) -> str:
    """What trained: the GPU's name, or the CPU model (for a version's lineage)."""
    if device == "gpu":
        import tensorflow as tf

        gpus = tf.config.list_physical_devices("GPU")
        names = [
            tf.config.experimental.get_device_details(g).get("device_name", "GPU") for g in gpus
        ]
        return ", ".join(names) or "GPU"
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return f"CPU: {line.partition(':')[2].strip()} ({os.cpu_count()} cores)"
    return f"CPU: {platform.processor() or platform.machine()} ({os.cpu_count()} cores)"


def onednn_enabled() -> bool:
    """Whether this process's TensorFlow runs its oneDNN CPU kernels: they round differently
    from the Eigen ones, so a bit-exact rebuild needs the same setting (flows/reproduce/).
    TensorFlow decides once, from TF_ENABLE_ONEDNN_OPTS or else the CPU's features."""
    from tensorflow.python.util import _pywrap_util_port

    return bool(_pywrap_util_port.IsMklEnabled())
