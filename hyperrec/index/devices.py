"""Where an index runs, and what a caller may ask for: shared by every ANN implementation."""

from __future__ import annotations

# Where an index runs (AnnIndex.device; also the `device` label of hyperrec_accelerator_info for the index).
CPU = "cpu"
CUDA = "cuda"
# What callers may ask for: "auto" (GPU when the library has GPU support and sees one), "cpu", or "gpu" (required).
AUTO = "auto"
GPU = "gpu"
DEVICE_CHOICES = (AUTO, CPU, GPU)


def check_device(device: str) -> str:
    """`device` when it is one of DEVICE_CHOICES; ValueError otherwise."""
    if device not in DEVICE_CHOICES:
        raise ValueError(f"index device must be one of {', '.join(DEVICE_CHOICES)}, got {device!r}")
    return device
