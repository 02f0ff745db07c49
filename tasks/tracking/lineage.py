"""What a version stands on, recorded so it can be rebuilt: the git commit (``-dirty`` with
the diff of tracked files), the DVC hash of its data, the device it trained on."""

from __future__ import annotations

import os
import platform
import subprocess
import tempfile
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
