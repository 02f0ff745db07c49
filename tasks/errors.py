"""Error types shared by stages and entry points, and the checks several stages raise them
from; a leaf module that imports nothing of ours."""

from __future__ import annotations

import errno
import math
import os
import socket
import urllib.parse


class UserFixableError(Exception):
    """A failure the user fixes (a setting, an input file, a server to start): every entry
    point prints its message as one line, without a traceback, and exits 2. Every error
    type below is one; anything else is a bug and keeps its traceback."""


class ModelFileError(UserFixableError, ValueError):
    """A model file that cannot be loaded safely; the message names the file and the fix."""


class DataFileError(UserFixableError, ValueError):
    """An input data file is missing, truncated, corrupt, or not the expected one.

    Raised where the file is read, the only place that knows its path, so the message can
    name the file and how to replace it; the entry points print it as one line and exit 2
    instead of showing the reader's traceback (zipfile, numpy, TFDS).
    """


class DataUnavailableError(UserFixableError, RuntimeError):
    """The dataset is neither prepared nor downloadable (offline) nor in the manual dir.
    Transient for retries: the network may come back (tasks/tracking/store.py is_transient)."""


class DataStorageError(DataUnavailableError):
    """The data a version trains on could not be put into the project's DVC cache or pushed
    to its DVC remote, so another clone could not rebuild it; the message names the remote
    and the fix. Transient like its parent: a remote over the network may come back."""


class RegistryBindingError(UserFixableError, ValueError):
    """A version for another task (dataset, input signature, classes) than the registered
    model name serves; the message names the model, both values and the fix."""


class ReproduceError(UserFixableError, ValueError):
    """A registered model version cannot be rebuilt: a malformed or unknown URI, missing
    tags, a commit git cannot restore, data DVC cannot restore (all refused before any
    work), or its pipeline failed; the message says why and what to do."""


class ExportError(UserFixableError, ValueError):
    """An export cannot be made or does not answer like the trained model: a converter
    package is missing (the message names it), there is no registered version to export,
    or a float format's probabilities or labels differ beyond the parity bound (the
    message names the format and the numbers)."""


class ModelRequestError(UserFixableError, ValueError):
    """A request to predict or serve cannot start: a bad path, model URI or top-k, a model
    the registry does not have or that this project did not register; the message says
    which and why."""


class TransferWeightsError(UserFixableError, ValueError):
    """The starting weights of a transfer model (``model.weights``) cannot be had: ImageNet
    weights neither cached nor downloadable, a missing or misnamed weights file, or a
    registered model without a matching base; the message names the file, directory or URI
    and the alternatives."""


class DistributeError(UserFixableError, ValueError):
    """Distributed training cannot start as configured (TF_CONFIG, devices, data too small
    for the replicas) or a worker process died; the message names the setting or worker."""


class RegistryLockError(UserFixableError, RuntimeError):
    """The lock that serializes a registered model's alias moves could not be taken: its
    server is unreachable, it stayed held past the timeout, or it was reconfigured; the
    message names the lock and how to inspect it."""


class DivergedError(UserFixableError, ValueError):
    """Training produced a non-finite loss, or a model's test metrics are not finite: the
    model is useless and must never be registered, promoted or exported; the message names
    the epoch (or metric) and the likely cause."""


def refuse_non_finite(headline: dict[str, float], stage: str) -> None:
    """A model whose test loss or accuracy is NaN or infinite diverged: it must go no
    further (the register stage checks again, for metrics written before this check)."""
    bad = {key: value for key, value in headline.items() if not math.isfinite(value)}
    if bad:
        listed = ", ".join(f"{key}={value}" for key, value in bad.items())
        raise DivergedError(
            f"the model's test metrics are not finite ({listed}): it diverged in training "
            f"(lower train.learning_rate); the {stage} stage stops "
            "here, nothing is registered or exported"
        )


# OSErrors that are the machine's state, not a bug: the user frees space, fixes a
# permission or a mount, and reruns. Anything else (a network error) keeps its own path.
USER_FIXABLE_ERRNOS = {
    errno.ENOSPC: "free space there (or point the output elsewhere)",
    errno.EDQUOT: "free space in your quota there",
    errno.EACCES: "fix the permissions of that path",
    errno.EPERM: "fix the permissions of that path",
    errno.EROFS: "remount it writable, or run where outputs can be written",
}


def user_fixable_os_error(error: BaseException | None) -> OSError | None:
    """The disk-full, permission or read-only OSError behind ``error`` (itself or what
    caused it), if that is what went wrong."""
    seen = 0
    while error is not None and seen < 10:  # a cause chain, never a cycle
        if isinstance(error, OSError) and error.errno in USER_FIXABLE_ERRNOS:
            return error
        error, seen = error.__cause__ or error.__context__, seen + 1
    return None


def os_error_line(error: OSError) -> str:
    """``<path>: <what the errno means> (<ENAME>): <what to do>``."""
    path = error.filename or "a file"
    name = errno.errorcode.get(error.errno, str(error.errno))
    return f"{path}: {os.strerror(error.errno)} ({name}): {USER_FIXABLE_ERRNOS[error.errno]}"


def dns_error(url: str) -> OSError | None:
    """The DNS error for ``url``'s host, or None if it resolves: a fast offline probe
    before a download is blamed on anything else."""
    try:
        socket.getaddrinfo(urllib.parse.urlsplit(url).hostname, None)
    except OSError as error:  # socket.gaierror
        return error
    return None
