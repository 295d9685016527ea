"""Linear-algebra kernels: exact singular bases in float64 on the chosen device."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ftaudit import blockwise
from ftaudit.errors import UsageError


def resolve_device(name: str) -> torch.device:
    """`auto` is cuda when available, else cpu; anything else must be usable here."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UsageError(f"unknown device {name!r} (use auto, cpu, cuda or cuda:N)") from None
    if device.type == "cuda" and torch.version.cuda is None and getattr(torch.version, "hip", None) is None:
        raise UsageError(
            f"device {name!r} asked for, but this torch ({torch.__version__}) is a build without CUDA: "
            "install a CUDA build of torch, or use --device cpu"
        )
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"device {name!r} asked for, but torch sees no CUDA GPU")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise UsageError(f"device {name!r} asked for, but torch sees {torch.cuda.device_count()} CUDA GPU(s)")
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


EPS64 = torch.finfo(torch.float64).eps


def rank_tolerance(shape: tuple[int, ...] | torch.Size) -> float:
    """max(m, n)·ε64: singular values at most this times σ1 are zero to float64 (its numerical rank, as LAPACK and
    numpy take it), and their singular vectors are any basis of the null space, so no measurement."""
    return max(shape) * EPS64


def gram_resolution(shape: tuple[int, ...] | torch.Size) -> float:
    """√(max(m, n)·ε64): relative to σ1, how far from its true value a singular value computed from a float64 Gram
    matrix may be (the Gram's entries and eigenvalues are exact to about max(m, n)·ε64·σ1²); a zero comes out at
    about 1e-8·σ1. A computed value above this is certainly no zero; one at or below it may be."""
    return math.sqrt(max(shape) * EPS64)


GRAM_MAX_CONDITION = 1e4
"""A tall matrix's vectors come from its column Gram WᵀW while σ1/σn is at most this; above it, from a QR."""


def left_spectrum(w: torch.Tensor, dtype: torch.dtype = torch.float64, count: int | None = None) -> Spectrum:
    """The first `count` (default: all min(m, n)) left singular vectors and values of a matrix,
    exactly, computed in float64.

    `w` may be stored in any float dtype; it is upcast a block at a time (`blockwise`), and U is
    returned in `dtype`. Wide or square: eigh of W·Wᵀ. Tall: eigh of WᵀW = V·Σ²·Vᵀ and U = W·V·Σ⁻¹,
    which loses about κ = σ1/σn digits' worth of relative accuracy in the small values' vectors; so
    only while κ is at most GRAM_MAX_CONDITION (float64 then keeps ~1e-8), else W = QR first, eigh of
    R·Rᵀ and U = Q·U_R, which never divides by a singular value. All are cheaper than a full SVD and,
    in float64, agree with it to far below the precision of the stored weights.
    """
    eigenvalues, vectors = torch.linalg.eigh(blockwise.gram(w))
    return _left_from_gram(w, eigenvalues, vectors, dtype, min(w.shape) if count is None else count)


def _within_condition(eigenvalues: torch.Tensor, limit: float) -> bool:
    """Whether the Gram eigenvalues (ascending) give a nonsingular matrix with σ1/σn ≤ limit."""
    return bool(eigenvalues[-1] > 0) and bool(eigenvalues[0] * limit**2 >= eigenvalues[-1])


def _left_from_gram(
    w: torch.Tensor, eigenvalues: torch.Tensor, vectors: torch.Tensor, dtype: torch.dtype, count: int
) -> Spectrum:
    """`left_spectrum` from the eigendecomposition of W's smaller Gram matrix (ascending)."""
    rows, cols = w.shape
    values = eigenvalues.flip(-1).clamp(min=0).sqrt()[:count]
    top = vectors[:, vectors.shape[1] - count :].flip(-1)  # the eigenvectors of the `count` largest values
    if rows <= cols:
        return Spectrum(top.to(dtype), values)
    if _within_condition(eigenvalues, GRAM_MAX_CONDITION):
        return Spectrum(blockwise.times(w, top.div_(values), dtype), values)
    Q, R = torch.linalg.qr(w.to(torch.float64))
    eigenvalues, U_R = torch.linalg.eigh(R @ R.mT)
    return Spectrum((Q @ U_R[:, U_R.shape[1] - count :]).flip(-1).to(dtype), eigenvalues.flip(-1).clamp(min=0).sqrt()[:count])


RIGHT_MAX_CONDITION = 1e3
"""A tall base matrix is kept as its right vectors V while σ1/σn is at most this (see `Basis`)."""
BASIS_BLOCK = 1024
"""Basis vectors applied at a time, so that no float64 copy of a whole basis is made."""


@dataclass(frozen=True)
class Basis:
    """A base matrix's left singular vectors of nonzero singular value, a basis U (m × r) of its column space, r its
    numerical rank (`rank_tolerance`; min(m, n) but for a rank-deficient matrix), and those singular values.

    Held as U itself, or, for a tall matrix (m > n) with σ1/σn ≤ RIGHT_MAX_CONDITION, as its right
    vectors V (n × n, smaller than U), U = W·V·Σ⁻¹ being applied through W whenever it is used, so
    the methods take the base matrix W. Vectors are kept in float32: rounding moves a cosine by under
    1e-6 for U and under κ·6e-8 ≤ 6e-5 for V; it halves what the cache stores and holds, and makes
    cached and freshly computed audits give identical numbers. Products are computed in float64.
    """

    vectors: torch.Tensor
    S: torch.Tensor
    right: bool = False

    @property
    def rank(self) -> int:
        return self.S.numel()

    @property
    def sigma1(self) -> float:
        """The largest singular value; 0 for an all-zero matrix (which has no vector)."""
        return self.S[0].item() if self.rank else 0.0

    def to(self, device: torch.device) -> Basis:
        return Basis(self.vectors.to(device), self.S.to(device), self.right)

    def transposed_times(self, w: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Uᵀ·x (x float64, m × c): the cosines of x's columns with every basis vector, r × c."""
        if self.right:
            x = blockwise.transposed_times(w, x)
        out = torch.cat([block.to(torch.float64).mT @ x for block in self.vectors.split(BASIS_BLOCK, dim=1)])
        return out / self.S[:, None] if self.right else out

    def times(self, w: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """U·y (y float64, r × c), m × c."""
        y = y / self.S[:, None] if self.right else y
        out = y.new_zeros(self.vectors.shape[0], y.shape[1])
        for start in range(0, self.rank, BASIS_BLOCK):
            out.addmm_(self.vectors[:, start : start + BASIS_BLOCK].to(torch.float64), y[start : start + BASIS_BLOCK])
        return blockwise.times(w, out) if self.right else out

    def top(self, w: torch.Tensor, k: int) -> torch.Tensor:
        """The first k vectors of U, in float64 (m × k)."""
        k = min(k, self.rank)
        if self.right:
            return blockwise.times(w, self.vectors[:, :k].to(torch.float64) / self.S[:k])
        return self.vectors[:, :k].to(torch.float64)


def base_basis(w: torch.Tensor) -> Basis:
    """The base side of the comparison: a basis of its column space (`Basis`), computed exactly in float64.

    From the Gram matrix's eigendecomposition when all its values are certainly nonzero (`gram_resolution`), as
    for every full-rank weight matrix; otherwise (a rank-deficient matrix, zero-initialised or pruned, or one with
    σ1/σn beyond about 1e6) from a full float64 SVD (`nonzero_left`), which tells zeros from small values.
    """
    eigenvalues, vectors = torch.linalg.eigh(blockwise.gram(w))
    if w.shape[0] > w.shape[1] and _within_condition(eigenvalues, RIGHT_MAX_CONDITION):
        return Basis(vectors.to(torch.float32).flip(-1).contiguous(), eigenvalues.flip(-1).sqrt(), right=True)
    if _within_condition(eigenvalues, 1 / gram_resolution(w.shape)):
        full = _left_from_gram(w, eigenvalues, vectors, torch.float32, min(w.shape))
    else:  # values at zero's level, which the SVD tells apart; an all-zero matrix (its Gram exactly 0) has no vector
        full = nonzero_left(w) if bool(eigenvalues[-1] > 0) else _none(w)
    return Basis(full.U.to(torch.float32).contiguous(), full.S.contiguous())


def nonzero_left(w: torch.Tensor, count: int | None = None) -> Spectrum:
    """The first `count` (default all) left singular pairs of w whose singular value is nonzero (above
    σ1·`rank_tolerance`), from a full SVD in float64: exact to about ε64·σ1, where a Gram matrix's eigenvalues
    cannot tell a value under `gram_resolution`·σ1 from zero. For rank-deficient matrices only: it holds W whole
    in float64 twice over. A matrix that is not square is first reduced to the triangle R of its smaller side, whose
    SVD is all that is taken: a wide W's left singular pairs are Rᵀ's (Wᵀ = Q·R, W = Rᵀ·Qᵀ); a tall W's values are
    R's and its vectors Q·U_R (W = Q·R), so no float64 Vᵀ or U as large as W is made beside a copy of W."""
    w64 = w.to(torch.float64)
    rows, cols = w.shape
    Q = None
    if rows < cols:
        w64 = torch.linalg.qr(w64.mT, mode="r").R.mT
    elif rows > cols:
        Q, w64 = torch.linalg.qr(w64)
    U, S, _ = torch.linalg.svd(w64, full_matrices=False)
    kept = int((S > S[0] * rank_tolerance(w.shape)).sum().item())
    kept = kept if count is None else min(kept, count)
    return Spectrum(U[:, :kept] if Q is None else Q @ U[:, :kept], S[:kept])


def _none(w: torch.Tensor) -> Spectrum:
    """No singular pair (an all-zero matrix), in float64 on w's device."""
    return Spectrum(w.new_zeros(w.shape[0], 0, dtype=torch.float64), w.new_zeros(0, dtype=torch.float64))


def nonzero(w: torch.Tensor, top: Spectrum) -> Spectrum:
    """`top`, w's leading singular pairs as computed from its Gram matrix, less those of a zero singular value.

    All of them, as they are, when the smallest is certainly nonzero (above `gram_resolution`·σ1: a matrix of rank
    at least k, every real weight matrix); none for an all-zero matrix; else, where zeros and small values cannot
    be told apart from the Gram, those of `nonzero_left`.
    """
    if not top.S.numel():
        return top
    first, last = top.S[[0, -1]].tolist()
    if last > gram_resolution(w.shape) * first:
        return top
    return nonzero_left(w, top.S.numel()) if first > 0 else _none(w)


CERTIFIED_SIN = 5e-4
"""Largest accepted bound on the sine of the angle between a computed and an exact singular vector.

A cosine then moves by at most this much: half the 1e-3 agreement with the float64 reference that
ftaudit promises, the other half covering the float32 rounding of the base's basis (under 1e-6).
"""

START_FACTOR = 4
"""The float32 start holds START_FACTOR·k + 1 vectors: close neighbours of the top k sit inside it."""
START_MAX_SHARE = 1 / 8
"""Largest start, as a share of the smaller side: its products, and the refinement's, cost more with every vector,
and a start of more than about an eighth of the vectors takes longer than the full decomposition (k = 10 has one of 41
vectors, within the share from REFINE_MIN on)."""
KRYLOV_STEPS = 2
"""Block Krylov steps from the start: the Rayleigh–Ritz space is span(S, G·S, G²·S)."""


REFINE_MIN = 512
"""Below this many rows or columns the full float64 decomposition costs no more than a float32 start
and its refinement, so `top_left` takes it directly."""

START_SIN = 5e-3
"""Davis–Kahan bound at which an iterated start is good enough for `refine_top_left` to certify."""
FILTER_DEGREE = 4
"""Degree of the Chebyshev filter between two Rayleigh–Ritz checks of the iterated start."""
PRODUCTS_PER_ROW = 1 / 32
"""Most Gram products of the iterated start, per row of the n × n Gram matrix (at least MIN_PRODUCTS).
One costs 2·n²·(4k + 1) flops; a float32 eigh, measured on CPUs, about n/13 of them, so a start that
does not converge costs at most about half the eigh that then answers."""
MIN_PRODUCTS = 32


def top_left(w: torch.Tensor, k: int) -> Spectrum:
    """The top-k left singular vectors and values of a matrix, certified exact, computed in float64; only those of
    nonzero singular value (`nonzero`), so fewer than k for a matrix of lower rank, none for an all-zero one.

    `w` may be stored in any float dtype; it is read a block at a time and not upcast whole (but by `nonzero`'s
    SVD, for a matrix of numerical rank about k or under). A
    start from the float32 Gram matrix, which `refine_top_left` polishes in float64 and certifies:
    the iterated start (matrix products only) first, else, where the top values are too close for
    it to converge within its budget, the Gram's float32 eigendecomposition. Where neither can be
    certified (tied or clustered values, k close to the rank), for matrices under REFINE_MIN, and for
    a k whose start would exceed START_MAX_SHARE of the vectors, the full float64 decomposition answers
    instead.
    """
    k = min(k, *w.shape)
    count = min(START_FACTOR * k + 1, min(w.shape))
    if REFINE_MIN <= min(w.shape) and k < min(w.shape) and count <= START_MAX_SHARE * min(w.shape):
        gram = blockwise.gram(w, dtype=torch.float32)
        for start in (lambda: iterated_start(gram, count, k), lambda: _eigh_start(gram, count)):
            found = start()
            refined = None if found is None else refine_top_left(w, _lifted(w, found), k)
            if refined is not None:
                return nonzero(w, refined)
    return nonzero(w, left_spectrum(w, count=k))


def iterated_start(gram: torch.Tensor, count: int, k: int) -> torch.Tensor | None:
    """The top `count` eigenvectors of a Gram matrix (float32) by Chebyshev-filtered subspace
    iteration from a seeded random block, once the top k's Davis–Kahan bounds are at most START_SIN;
    None when the bounds' rate of decrease shows they would not get there within the budget
    (PRODUCTS_PER_ROW).

    Each cycle checks the block by Rayleigh–Ritz, then applies the Chebyshev polynomial of degree
    FILTER_DEGREE that stays small on [0, θ_min] (θ_min the block's smallest Ritz value, an estimate
    of the largest unwanted eigenvalue) and grows fastest above it: on clustered top values it
    converges in about 2.5 times fewer products than plain powers of the Gram matrix.
    """
    size = gram.shape[0]
    budget = max(MIN_PRODUCTS, int(size * PRODUCTS_PER_ROW))
    generator = torch.Generator(device=gram.device).manual_seed(0)
    x = torch.linalg.qr(torch.randn(size, count, generator=generator, device=gram.device, dtype=gram.dtype)).Q
    bounds: list[float] = []
    for products in range(FILTER_DEGREE, budget + 1, FILTER_DEGREE):
        y = gram @ x
        theta, z = torch.linalg.eigh(x.mT @ y)
        theta, z = theta.flip(-1), z.flip(-1)
        x, y = x @ z, y @ z
        bounds.append(_sine_bounds(theta, y - x * theta, k).max().item())
        if bounds[-1] <= START_SIN:
            return x
        if math.isnan(bounds[-1]) or not _on_course(bounds, products, budget):  # NaN: tied values, no residual
            return None
        upper = theta[-1].item()  # 0 when the Gram's rank is under `count`: plain powers then
        x = torch.linalg.qr(_chebyshev(gram, x, y, upper) if upper > 0 else y).Q
    return None


def _chebyshev(gram: torch.Tensor, x: torch.Tensor, gram_x: torch.Tensor, upper: float) -> torch.Tensor:
    """T_d(2·G/upper − I)·x, d = FILTER_DEGREE, up to a scale: the three-term recurrence, its first
    product `gram_x` = G·x given, each step rescaled (the values above `upper` grow like e^d)."""
    half = upper / 2
    previous, current = x, gram_x.sub(x, alpha=half).div_(half)
    for _ in range(FILTER_DEGREE - 1):
        following = (gram @ current).sub_(current, alpha=half).div_(half / 2).sub_(previous)
        scale = torch.linalg.vector_norm(following, dim=0).max()
        previous, current = current / scale, following / scale
    return current


def _on_course(bounds: list[float], products: int, budget: int) -> bool:
    """Whether the bounds, checked every FILTER_DEGREE products and by now after `products`, reach
    START_SIN within `budget` products at their rate over the last three checks (judged from the
    sixth check on)."""
    if len(bounds) < 6:
        return True
    rate = bounds[-1] / bounds[-4]
    if not math.isfinite(rate) or rate >= 1.0:
        return False
    checks = math.log(START_SIN / bounds[-1]) / (math.log(rate) / 3)
    return products + FILTER_DEGREE * checks <= budget


def _eigh_start(gram: torch.Tensor, count: int) -> torch.Tensor:
    """The top `count` eigenvectors of a Gram matrix from its full eigendecomposition."""
    return torch.linalg.eigh(gram).eigenvectors[:, -count:]


def _lifted(w: torch.Tensor, vectors: torch.Tensor) -> torch.Tensor:
    """Approximate left vectors of W, in float64, from approximate eigenvectors of its smaller Gram matrix."""
    vectors = vectors.to(torch.float64)
    return vectors if w.shape[0] <= w.shape[1] else blockwise.times(w, vectors)


def _sine_bounds(theta: torch.Tensor, residuals: torch.Tensor, k: int) -> torch.Tensor:
    """Davis–Kahan bounds on the sines of the first k Ritz vectors' angles to the exact ones:
    ‖G·u_j − θ_j·u_j‖ / gap_j, gap_j the distance from θ_j (descending) to its neighbouring Ritz values."""
    neighbours = torch.cat([theta.new_tensor([math.inf]), theta])
    gap = torch.minimum(neighbours[:k] - theta[:k], theta[:k] - theta[1 : k + 1])
    return torch.linalg.vector_norm(residuals[:, :k], dim=0) / gap


def refine_top_left(w: torch.Tensor, start: torch.Tensor, k: int) -> Spectrum | None:
    """The top k left singular pairs of W (any stored dtype) from approximate vectors `start` (k + 1 or more columns).

    Rayleigh–Ritz for G = W·Wᵀ in float64 on the block Krylov space of `start` (KRYLOV_STEPS). Each
    Ritz vector u_j is certified by the Davis–Kahan bound (`_sine_bounds`); None unless every bound
    is at most CERTIFIED_SIN.
    """
    krylov = [torch.linalg.qr(start).Q]
    for _ in range(KRYLOV_STEPS):
        krylov.append(blockwise.gram_times(w, krylov[-1]))
    basis = torch.linalg.qr(torch.cat(krylov, 1)).Q
    g_basis = blockwise.gram_times(w, basis)
    theta, y = torch.linalg.eigh(basis.mT @ g_basis)
    theta, y = theta.flip(-1)[: k + 1], y.flip(-1)[:, : k + 1]
    vectors = basis @ y
    bound = _sine_bounds(theta, g_basis @ y - vectors * theta, k)
    if not bool((bound <= CERTIFIED_SIN).all()):
        return None
    return Spectrum(vectors[:, :k], theta[:k].clamp(min=0).sqrt())
