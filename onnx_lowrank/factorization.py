"""Low-rank factorizations of convolution kernels (pure numpy; knows nothing of ONNX).

Spatial split (Tai et al., "Convolutional neural networks with low-rank
regularization", ICLR 2016, Theorem 1)
---------------------------------------------------------------------------
A kernel ``W`` of shape ``(N, C, *S, kw)`` (``S`` the leading spatial extents:
``(kh,)`` for Conv2d, ``(kd, kh)`` for Conv3d) is approximated by a *vertical*
kernel ``V`` of shape ``(K, C, *S, 1)`` followed by a *horizontal* kernel ``H``
of shape ``(N, K, 1.., kw)``:

    W[n, c, s, j] ≈ Σ_k V[k, c, s] · H[n, k, j]

Reshape ``W`` to ``M[(c, s), (n, j)] = W[n, c, s, j]`` (``C·|S|`` × ``N·kw``).
Every rank-K pair above is exactly a rank-K matrix ``M_K = Σ_k v_k h_kᵀ``, and
every rank-K matrix is such a pair, so by Eckart–Young the truncated SVD
``M ≈ U_K S_K V_Kᵀ`` is the global optimum of ``||W − W_K||_F``, with

    V_k = √s_k · U[:, k]        H_k = √s_k · Vᵀ[k, :]
    ||W − W_K||_F² = Σ_{k>K} s_k²

Channel split
-------------
``W`` reshaped to ``(N, C·|S|·kw)`` and truncated by SVD gives a ``(K, C, *S, kw)``
conv followed by a ``(N, K, 1..)`` pointwise conv; the same optimality holds.

Grouped kernels are factored per group (each group's ``N/g`` filters against its
``C`` input channels) with one common rank ``K``; the singular values of all
groups together define the layer's error. All arithmetic is in float64; callers
cast the factors to the model's dtype.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import numpy.typing as npt
import scipy.linalg

__all__ = [
    "Decomposition",
    "Factors",
    "Kind",
    "decompose_kernel",
    "factorize",
    "full_rank",
    "kernel_matrices",
    "reconstruct",
    "relative_error",
    "singular_values",
]

Kind = Literal["spatial", "channel"]
FloatArray = npt.NDArray[np.float64]


@dataclass(frozen=True)
class Factors:
    """The two kernels of a decomposed layer and the singular values behind them.

    ``first`` runs first (the *vertical* kernel for the spatial split), ``second``
    runs on its output (the *horizontal* kernel). ``singular_values`` has shape
    ``(groups, full_rank)``, all of them, not only the kept ones.
    """

    kind: Kind
    rank: int
    first: FloatArray
    second: FloatArray
    singular_values: FloatArray

    @property
    def relative_error(self) -> float:
        """``||W − W_K||_F / ||W||_F`` implied by the discarded singular values."""
        return relative_error(self.singular_values, self.rank)


def _check_kernel(weight: npt.NDArray[np.generic], groups: int) -> None:
    if weight.ndim < 3:
        raise ValueError(f"kernel must have at least one spatial dim, got shape {weight.shape}")
    if groups < 1 or weight.shape[0] % groups:
        raise ValueError(f"{weight.shape[0]} output channels cannot be split into {groups} groups")


def kernel_matrices(weight: npt.NDArray[np.generic], groups: int, kind: Kind) -> FloatArray:
    """The per-group matrices whose SVD gives the factors, shape ``(groups, rows, cols)``.

    spatial: ``M[(c, s), (n, j)] = W[n, c, s, j]``; channel: ``M[n, (c, s, j)] = W[n, c, s, j]``.
    """
    _check_kernel(weight, groups)
    w = np.asarray(weight, dtype=np.float64)
    n, c = w.shape[:2]
    spatial = w.shape[2:]
    lead, kw = int(np.prod(spatial[:-1], dtype=np.int64)), spatial[-1]
    w = w.reshape(groups, n // groups, c, lead, kw)
    if kind == "spatial":
        # (g, n, c, s, j) -> (g, c, s, n, j) -> (g, c·s, n·j)
        return w.transpose(0, 2, 3, 1, 4).reshape(groups, c * lead, (n // groups) * kw)
    return w.reshape(groups, n // groups, c * lead * kw)


def full_rank(weight_shape: tuple[int, ...], groups: int, kind: Kind) -> int:
    """The rank at which the factorization is exact: ``min`` of the matrix dims."""
    n, c, *spatial = weight_shape
    lead, kw = int(np.prod(spatial[:-1], dtype=np.int64)), spatial[-1]
    if kind == "spatial":
        return min(c * lead, (n // groups) * kw)
    return min(n // groups, c * lead * kw)


def _svd(matrix: FloatArray) -> tuple[FloatArray, FloatArray, FloatArray]:
    try:
        u, s, vt = scipy.linalg.svd(matrix, full_matrices=False, lapack_driver="gesdd", check_finite=False)
    except np.linalg.LinAlgError:  # gesdd can fail to converge where the slower gesvd does not
        u, s, vt = scipy.linalg.svd(matrix, full_matrices=False, lapack_driver="gesvd", check_finite=False)
    return u, s, vt


def singular_values(weight: npt.NDArray[np.generic], groups: int, kind: Kind = "spatial") -> FloatArray:
    """All singular values, shape ``(groups, full_rank)``, each row descending."""
    if not np.all(np.isfinite(weight)):
        raise ValueError("kernel has non-finite values")
    mats = kernel_matrices(weight, groups, kind)
    return np.stack([scipy.linalg.svdvals(m, check_finite=False) for m in mats])


def relative_error(singular_values: FloatArray, rank: int) -> float:
    """``sqrt(Σ_{k>K} s_k² / Σ s_k²)`` over all groups (0 for an all-zero kernel)."""
    sq = np.square(np.asarray(singular_values, dtype=np.float64))
    total = float(sq.sum())
    if total == 0.0:
        return 0.0
    tail = float(sq[:, rank:].sum())
    return float(np.sqrt(max(tail, 0.0) / total))


@dataclass(frozen=True)
class Decomposition:
    """The thin SVD of every group's kernel matrix, from which factors at any rank are cut."""

    kind: Kind
    weight_shape: tuple[int, ...]
    groups: int
    u: FloatArray  # (groups, rows, R)
    s: FloatArray  # (groups, R)
    vt: FloatArray  # (groups, R, cols)

    @property
    def full_rank(self) -> int:
        return int(self.s.shape[1])

    def factors(self, rank: int) -> Factors:
        """The optimal rank-``rank`` factors (rank clipped to the full rank)."""
        if rank < 1:
            raise ValueError(f"rank must be >= 1, got {rank}")
        n, c, *spatial = self.weight_shape
        n_g = n // self.groups
        k = min(rank, self.full_rank)
        root = np.sqrt(self.s[:, :k])  # (g, K)
        left = self.u[:, :, :k] * root[:, None, :]  # (g, rows, K)
        right = root[:, :, None] * self.vt[:, :k, :]  # (g, K, cols)
        g = self.groups
        if self.kind == "spatial":
            first = left.transpose(0, 2, 1).reshape(g * k, c, *spatial[:-1], 1)
            second = right.reshape(g, k, n_g, spatial[-1]).transpose(0, 2, 1, 3)
            second = second.reshape(n, k, *([1] * (len(spatial) - 1)), spatial[-1])
        else:
            first = right.reshape(g * k, c, *spatial)
            second = left.reshape(n, k, *([1] * len(spatial)))
        return Factors(self.kind, k, np.ascontiguousarray(first), np.ascontiguousarray(second), self.s)


def decompose_kernel(weight: npt.NDArray[np.generic], groups: int, kind: Kind = "spatial") -> Decomposition:
    """SVD of ``weight`` (``(N, C/groups, *spatial)``) for the given split, in float64."""
    if not np.all(np.isfinite(weight)):
        raise ValueError("kernel has non-finite values")
    mats = kernel_matrices(weight, groups, kind)
    parts = [_svd(m) for m in mats]
    return Decomposition(
        kind=kind,
        weight_shape=tuple(int(d) for d in weight.shape),
        groups=groups,
        u=np.stack([p[0] for p in parts]),
        s=np.stack([p[1] for p in parts]),
        vt=np.stack([p[2] for p in parts]),
    )


def factorize(weight: npt.NDArray[np.generic], groups: int, rank: int, kind: Kind = "spatial") -> Factors:
    """Factor ``weight`` (``(N, C/groups, *spatial)``) at ``rank`` (clipped to full rank).

    spatial: ``first`` is ``(groups·K, C_g, *S, 1)``, ``second`` is ``(N, K, 1.., kw)``.
    channel: ``first`` is ``(groups·K, C_g, *spatial)``, ``second`` is ``(N, K, 1..)``.
    Both are meant to run as convs with the original ``groups``.
    """
    return decompose_kernel(weight, groups, kind).factors(rank)


def reconstruct(factors: Factors, groups: int) -> FloatArray:
    """``W_K`` rebuilt from the factors (used by tests and error checks)."""
    k = factors.rank
    first, second = factors.first, factors.second
    n = second.shape[0]
    n_g = n // groups
    parts = []
    for g in range(groups):
        f = first[g * k : (g + 1) * k]  # (K, C, ...)
        s = second[g * n_g : (g + 1) * n_g]  # (n_g, K, ...)
        if factors.kind == "spatial":
            v = f[..., 0]  # (K, C, *S)
            h = s.reshape(n_g, k, s.shape[-1])  # (n_g, K, kw)
            parts.append(np.einsum("kc...,nkj->nc...j", v, h))
        else:
            parts.append(np.einsum("nk,kc...->nc...", s.reshape(n_g, k), f))
    return np.concatenate(parts, axis=0)
