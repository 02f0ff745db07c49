"""Which device the input pipeline runs on: `preprocess.device` resolved against what
DALI sees, read by preprocessing, the training recipe (precision, XLA) and lineage."""

from __future__ import annotations


def resolve_device(requested: str) -> str:
    """Map params.yaml `preprocess.device` to "cpu" or "gpu"; fail early if a GPU is missing."""
    from nvidia.dali import backend

    if requested not in ("auto", "cpu", "gpu"):
        raise ValueError(f"preprocess.device must be auto, cpu or gpu, got {requested!r}")
    if requested == "cpu":
        return "cpu"
    has_gpu = backend.GetCUDADeviceCount() > 0
    if requested == "gpu" and not has_gpu:
        raise RuntimeError(
            "preprocess.device is 'gpu' but no CUDA GPU is visible to DALI; "
            "set preprocess.device: cpu (or auto) in params.yaml"
        )
    return "gpu" if has_gpu else "cpu"
