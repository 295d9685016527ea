"""Linear-algebra kernels: exact singular bases in float64 on the chosen device."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ftaudit.errors import UsageError


def resolve_device(name: str) -> torch.device:
    """`auto` is cuda when available, else cpu; anything else must be usable here."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UsageError(f"unknown device {name!r} (use auto, cpu, cuda or cuda:N)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"device {name!r} asked for, but torch sees no CUDA GPU")
    if device.type not in ("cpu", "cuda"):
        raise UsageError(f"device {name!r} is not supported (use auto, cpu, cuda or cuda:N)")
    return device


def upcast(w: torch.Tensor, device: torch.device) -> torch.Tensor:
    """The matrix in float64 on the device (the stored F16/BF16/F32 values are exact in float64)."""
    return w.to(device=device, dtype=torch.float64, non_blocking=True)


@dataclass(frozen=True)
class Spectrum:
    """Left singular vectors (columns, by decreasing singular value) and the singular values."""

    U: torch.Tensor
    S: torch.Tensor


def left_spectrum(w: torch.Tensor) -> Spectrum:
    """All min(m, n) left singular vectors and values of a float64 matrix, exactly.

    Wide or square: eigh of W·Wᵀ. Tall: W = QR first, then eigh of R·Rᵀ and U = Q·U_R, so the
    vectors stay orthonormal without dividing by small singular values. Both are cheaper than a
    full SVD and, in float64, agree with it to far below the precision of the stored weights.
    """
    rows, cols = w.shape
    if rows <= cols:
        eigenvalues, U = torch.linalg.eigh(w @ w.T)
    else:
        Q, R = torch.linalg.qr(w)
        eigenvalues, U_R = torch.linalg.eigh(R @ R.T)
        U = Q @ U_R
    return Spectrum(U.flip(-1), eigenvalues.flip(-1).clamp(min=0).sqrt())


def base_basis(w: torch.Tensor) -> Spectrum:
    """The base side of the comparison: all left singular vectors, kept in float32.

    Rounding the basis to float32 moves a cosine by under 1e-6; it halves what the cache stores and
    holds, and makes cached and freshly computed audits give identical numbers.
    """
    full = left_spectrum(w)
    return Spectrum(full.U.to(torch.float32).contiguous(), full.S.contiguous())


def top_left(w: torch.Tensor, k: int) -> Spectrum:
    """The top-k left singular vectors and values of a float64 matrix."""
    full = left_spectrum(w)
    return Spectrum(full.U[:, :k], full.S[:k])
