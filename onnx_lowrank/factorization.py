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

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import numpy as np
import numpy.typing as npt
import scipy.linalg

__all__ = [
    "Decomposition",
    "Factors",
    "Kind",
    "Method",
    "assemble_factors",
    "decompose_kernel",
    "factorize",
    "full_rank",
    "kernel_matrices",
    "padded",
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


def _matrix_shape(weight_shape: tuple[int, ...], groups: int, kind: Kind) -> tuple[int, int]:
    n, c, *spatial = weight_shape
    lead, kw = math.prod(spatial[:-1]), spatial[-1]
    if kind == "spatial":
        return c * lead, (n // groups) * kw
    return n // groups, c * lead * kw


def singular_values(weight: npt.NDArray[np.generic], groups: int, kind: Kind = "spatial") -> FloatArray:
    """All singular values, shape ``(groups, full_rank)``, each row descending."""
    return decompose_kernel(weight, groups, kind).s


def relative_error(singular_values: FloatArray, rank: int) -> float:
    """``sqrt(Σ_{k>K} s_k² / Σ s_k²)`` over all groups (0 for an all-zero kernel)."""
    sq = np.square(np.asarray(singular_values, dtype=np.float64))
    total = float(sq.sum())
    if total == 0.0:
        return 0.0
    tail = float(sq[:, rank:].sum())
    return float(np.sqrt(max(tail, 0.0) / total))


Method = Literal["auto", "svd", "gram"]
GRAM_ABOVE = 256  # under "auto", the smallest matrix side from which the Gram route is taken


class Decomposition:
    """The spectrum of every group's kernel matrix, and the optimal factors at any rank.

    Two exact routes, chosen by ``method`` (``"auto"``: ``"svd"`` when the
    smaller side of the matrix is at most 256, else ``"gram"``):

    * ``"svd"``: one thin SVD (LAPACK gesdd) per group, kept for every rank asked.
    * ``"gram"``: for ``M`` (``m × n``, ``m ≤ n``; else ``Mᵀ``) the eigenvalues
      of ``G = M·Mᵀ`` give ``s²`` without any vectors; the factors at rank K
      take only the top-K eigenvectors ``U_K`` of ``G`` (LAPACK evr with an
      index range), then ``U_Kᵀ·M = S_K·V_Kᵀ``, whose row norms are the ``s_k``
      used for scaling. ``U_K·U_Kᵀ·M`` is the orthogonal projection of M on its
      top-K left singular space — the Eckart–Young optimum — however
      inaccurate the tiny eigenvalues are. Cost: one ``m²n`` product and an
      ``m × m`` eigenproblem instead of a full SVD, and eigenvectors only for
      the layers and ranks actually written.

    The weight is held by reference and made into float64 matrices one group at
    a time, so memory stays near one float64 copy of a group plus ``G``.
    """

    def __init__(
        self,
        weight: npt.NDArray[np.generic],
        groups: int,
        kind: Kind = "spatial",
        method: Method = "auto",
        matrix_of: Callable[[int], FloatArray] | None = None,
    ) -> None:
        _check_kernel(weight, groups)
        if not np.all(np.isfinite(weight)):
            raise ValueError("kernel has non-finite values")
        self.weight = weight
        self.matrix_of = matrix_of  # another matrix per group, of the kernel matrix's shape (a whitened one, say)
        self.groups = groups
        self.kind: Kind = kind
        self.weight_shape = tuple(int(d) for d in weight.shape)
        self._rows, self._cols = _matrix_shape(self.weight_shape, groups, kind)
        if method == "auto":
            method = "gram" if min(self._rows, self._cols) > GRAM_ABOVE else "svd"
        self.method: Method = method
        self._svd: list[tuple[FloatArray, FloatArray, FloatArray]] = []
        self._grams: list[FloatArray] = []
        self._s: FloatArray | None = None

    def _matrix(self, g: int) -> FloatArray:
        if self.matrix_of is not None:
            return self.matrix_of(g)
        n_g = self.weight_shape[0] // self.groups
        matrix: FloatArray = kernel_matrices(self.weight[g * n_g : (g + 1) * n_g], 1, self.kind)[0]
        return matrix

    @property
    def s(self) -> FloatArray:
        """Singular values, ``(groups, full_rank)``, each row descending."""
        if self._s is None:
            if self.method == "svd":
                self._svd = [_svd(self._matrix(g)) for g in range(self.groups)]
                self._s = np.stack([p[1] for p in self._svd])
            else:
                values = []
                for g in range(self.groups):
                    m = self._matrix(g)
                    gram = m @ m.T if self._rows <= self._cols else m.T @ m
                    self._grams.append(gram)
                    eig = scipy.linalg.eigvalsh(gram, check_finite=False)[::-1]
                    values.append(np.sqrt(np.clip(eig, 0.0, None)))
                self._s = np.stack(values)
        return self._s

    @property
    def full_rank(self) -> int:
        return min(self._rows, self._cols)

    def group_factors(self, g: int, k: int) -> tuple[FloatArray, FloatArray]:
        """``left`` (rows × K) and ``right`` (K × cols), ``left @ right = M_K``, both scaled by √s."""
        if self.method == "svd":
            u, s, vt = self._svd[g]
            root = np.sqrt(s[:k])
            return u[:, :k] * root, root[:, None] * vt[:k]
        m = self._matrix(g)
        gram = self._grams[g]
        size = gram.shape[0]
        _, basis = scipy.linalg.eigh(gram, subset_by_index=[size - k, size - 1], driver="evr", check_finite=False)
        basis = basis[:, ::-1]
        wide = self._rows <= self._cols
        projected = basis.T @ m if wide else (m @ basis).T  # (K, other side): S_K V_Kᵀ, or S_K U_Kᵀ
        norms = np.linalg.norm(projected, axis=1)
        order = np.argsort(-norms, kind="stable")
        basis, projected, norms = basis[:, order], projected[order], norms[order]
        root = np.sqrt(norms)
        scaled = projected / np.where(root > 0, root, 1.0)[:, None]  # an exactly-zero direction contributes 0 either way
        if wide:  # left = U_K √s, right = √s V_Kᵀ
            return basis * root, scaled
        return scaled.T, (basis * root).T  # left = U_K √s, right = √s V_Kᵀ (V from the Gram side)

    def factors(self, rank: int) -> Factors:
        """The optimal rank-``rank`` factors (rank clipped to the full rank)."""
        if rank < 1:
            raise ValueError(f"rank must be >= 1, got {rank}")
        s = self.s
        k = min(rank, self.full_rank)
        pairs = [self.group_factors(i, k) for i in range(self.groups)]
        return assemble_factors(self.kind, self.weight_shape, [p[0] for p in pairs], [p[1] for p in pairs], s)


def assemble_factors(
    kind: Kind, weight_shape: tuple[int, ...], lefts: list[FloatArray], rights: list[FloatArray], singular_values: FloatArray
) -> Factors:
    """The two kernels from each group's ``left @ right`` (the rank-K kernel matrix of :func:`kernel_matrices`).

    ``lefts[g]`` is ``rows × K`` and ``rights[g]`` is ``K × cols`` in the layout of :func:`kernel_matrices`;
    the rank is read from their shapes. Any pair whose product is the rank-K matrix will do (the data-aware
    factorizations of :mod:`onnx_lowrank.calibration.data_aware` give their own).
    """
    n, c, *spatial = weight_shape
    g = len(lefts)
    n_g = n // g
    left = np.stack(lefts)  # (g, rows, K)
    right = np.stack(rights)  # (g, K, cols)
    k = left.shape[2]
    if kind == "spatial":
        first = left.transpose(0, 2, 1).reshape(g * k, c, *spatial[:-1], 1)
        second = right.reshape(g, k, n_g, spatial[-1]).transpose(0, 2, 1, 3)
        second = second.reshape(n, k, *([1] * (len(spatial) - 1)), spatial[-1])
    else:
        first = right.reshape(g * k, c, *spatial)
        second = left.reshape(n, k, *([1] * len(spatial)))
    return Factors(kind, k, np.ascontiguousarray(first), np.ascontiguousarray(second), singular_values)


def padded(factors: Factors, width: int) -> Factors:
    """``factors`` with zero filters added up to ``width`` intermediate channels (one group only).

    The pair computes the same kernel — a zero vertical filter feeds a zero column of every horizontal filter —
    and ``rank`` stays the rank of the approximation; only the stored tensors are wider.
    """
    k = factors.first.shape[0]
    if width <= k:
        return factors
    first = np.zeros((width, *factors.first.shape[1:]), dtype=factors.first.dtype)
    first[:k] = factors.first
    second = np.zeros((factors.second.shape[0], width, *factors.second.shape[2:]), dtype=factors.second.dtype)
    second[:, :k] = factors.second
    return Factors(factors.kind, factors.rank, first, second, factors.singular_values)


def decompose_kernel(weight: npt.NDArray[np.generic], groups: int, kind: Kind = "spatial", method: Method = "auto") -> Decomposition:
    """The :class:`Decomposition` of ``weight`` (``(N, C/groups, *spatial)``) for the given split."""
    return Decomposition(weight, groups, kind, method)


def factorize(weight: npt.NDArray[np.generic], groups: int, rank: int, kind: Kind = "spatial") -> Factors:
    """Factor ``weight`` (``(N, C/groups, *spatial)``) at ``rank`` (clipped to full rank).

    spatial: ``first`` is ``(groups·K, C_g, *S, 1)``, ``second`` is ``(N, K, 1.., kw)``.
    channel: ``first`` is ``(groups·K, C_g, *spatial)``, ``second`` is ``(N, K, 1..)``.
    Both are meant to run as convs with the original ``groups``.
    """
    return decompose_kernel(weight, groups, kind).factors(rank)


def reconstruct(factors: Factors, groups: int) -> FloatArray:
    """``W_K`` rebuilt from the factors (matrix products per group)."""
    k = factors.rank
    first, second = factors.first.astype(np.float64), factors.second.astype(np.float64)
    n_g = second.shape[0] // groups
    parts = []
    for g in range(groups):
        f = first[g * k : (g + 1) * k]  # (K, C, ...)
        h = second[g * n_g : (g + 1) * n_g]  # (n_g, K, ...)
        if factors.kind == "spatial":
            c, lead, kw = f.shape[1], f.shape[2:-1], h.shape[-1]
            horizontal = h.reshape(n_g, k, kw).transpose(1, 0, 2).reshape(k, n_g * kw)
            m = (f.reshape(k, -1).T @ horizontal).reshape(c, *lead, n_g, kw)  # M[(c, s), (n, j)]
            parts.append(np.moveaxis(m, -2, 0))
        else:
            parts.append((h.reshape(n_g, k) @ f.reshape(k, -1)).reshape(n_g, *f.shape[1:]))
    return np.concatenate(parts, axis=0)
