"""Data-aware low-rank factors: the rank-K pair that changes a layer's *output* least on the data (pure numpy).

The data-free factorization (:mod:`onnx_lowrank.factorization`) minimises ``||W − W_K||_F``. What matters is
the layer's output error on real inputs, ``E||(W − W_K) x||²`` over the patches ``x`` the layer reads. With
the patch second moment ``Σ = E[x xᵀ]`` (centred, i.e. the covariance, when the bias is refit afterwards:
a constant output shift ``ΔW μ`` is then absorbed by the bias exactly) this is the quadratic form

    E||ΔW x||² = Σ_n vec(ΔW_n)ᵀ Σ vec(ΔW_n) = ||ΔW L||_F²      for any L with Σ = L Lᵀ,

and because rank is invariant under invertible right-multiplication, the rank-K optimum is closed form
(Eckart–Young in the whitened space; SVD-LLM, Wang et al. 2024, arXiv 2403.07378; Zhang et al. 2015,
arXiv 1505.06798, for the linear response):

    W L = U S Vᵀ,    W_K = U_K S_K V_Kᵀ L⁻¹,    E||(W − W_K) x||² = Σ_{k>K} s_k².

So the whitened singular values give every rank's output error at once (:attr:`WhitenedDecomposition.s`).

Channel split and fully connected layers (``M[n, (c, s, j)] = W[n, c, s, j]``): ``L`` is the Cholesky factor
of the full patch covariance when it was accumulated (small layers), else of its Kronecker model
``A ⊗ B / tr Σ`` (rows ⊗ taps, :mod:`onnx_lowrank.calibration.statistics`), whose Cholesky factor is
``L_A ⊗ L_B``; with one tap (1×1 convs, fully connected layers) ``A`` is the full covariance. When the rows'
moment is only a diagonal (more than :data:`~onnx_lowrank.calibration.statistics.FULL_ROWS_MAX` rows),
``L`` is diagonal: ASVD's scaling (Yuan et al. 2023, arXiv 2312.05821), the cheap special case.

Spatial split (Tai et al., Theorem 1, made data-aware): ``M[(c, s), (n, j)] = W[n, c, s, j]``. With the
Kronecker model ``Σ ≈ A ⊗ B`` the output error of ``ΔM`` is

    Σ_n tr(ΔW_nᵀ A ΔW_n B) = ||L_Aᵀ ΔM (I_N ⊗ L_B)||_F²,

so, rank being invariant under invertible left and right factors, ``M̃ = L_Aᵀ M (I ⊗ L_B)`` truncated by SVD
and mapped back gives the optimum ``M_K = L_A⁻ᵀ M̃_K (I ⊗ L_B⁻¹)``: vertical filters ``L_A⁻ᵀ U_K √S_K``,
horizontal filters ``√S_K V_Kᵀ (I ⊗ L_B⁻¹)``. It is exact when ``Σ`` is a Kronecker product; how close the
Kronecker model comes on trained networks is measured by ``benchmarks/calibration.py``, and the refit of
:mod:`onnx_lowrank.calibration.refit` re-solves the horizontal factor and bias on the exact data anyway.

Damping: ``A + λ I`` with ``λ = damping · tr(A)/R`` (likewise ``B``, and the full covariance), so a
direction the calibration data never excites still counts a little and the factors stay finite; the
relative scale makes it independent of the activations' magnitude. ``damping → ∞`` gives back the
data-free factors. A layer whose inputs were all zero gets the data-free factors.

Preconditions: ``weight`` in conv layout ``(N, C_g, *S, kw)`` (a fully connected ``out × in`` weight as
``(out, in, 1)``) with finite values; moments of matching shape (``R = C_g·|S|`` rows, ``kw`` taps, the
weight's groups).
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
import scipy.linalg

from ..factorization import Decomposition, Factors, Kind, assemble_factors, full_rank, kernel_matrices
from .statistics import PatchMoments

__all__ = ["DEFAULT_DAMPING", "WhitenedDecomposition", "output_error"]

FloatArray = npt.NDArray[np.float64]

DEFAULT_DAMPING = 1e-2


def _damped(matrix: FloatArray, damping: float, unit_trace: bool) -> FloatArray | None:
    """``matrix + λ I`` (``λ = damping · tr/size``), scaled to trace 1 when ``unit_trace``; None when it is all zero."""
    size = matrix.shape[0]
    trace = float(np.trace(matrix))
    if not np.isfinite(trace) or trace <= 0.0:
        return None
    damped: FloatArray = matrix + np.eye(size) * (damping * trace / size)
    return damped / trace if unit_trace else damped


def _cholesky(matrix: FloatArray, damping: float, unit_trace: bool = False) -> FloatArray:
    """Lower ``L`` with ``L Lᵀ`` = the damped ``matrix``; more damping if it is not positive definite.

    An all-zero matrix (inputs never seen) gives the identity: the layer keeps its data-free factors.
    """
    for attempt in range(6):
        damped = _damped(matrix, damping * 10.0**attempt, unit_trace)
        if damped is None:
            break
        try:
            lower: FloatArray = scipy.linalg.cholesky(damped, lower=True, check_finite=False)
            if np.all(np.isfinite(lower)):
                return lower
        except (np.linalg.LinAlgError, ValueError):
            pass
    return np.eye(matrix.shape[0])


def _diagonal_root(diagonal: FloatArray, damping: float) -> FloatArray:
    mean = float(np.mean(diagonal))
    if not np.isfinite(mean) or mean <= 0.0:
        return np.ones_like(diagonal)
    root: FloatArray = np.sqrt(np.clip(diagonal, 0.0, None) + damping * mean)
    return root


class _Whitening:
    """``x ↦ x L`` and ``x ↦ x L⁻¹`` on the flattened ``(rows, taps)`` index, for one group."""

    def __init__(self, moments: PatchMoments, group: int, damping: float, use_full: bool) -> None:
        self.rows, self.taps = moments.mean.shape[1], moments.mean.shape[2]
        self.full: FloatArray | None = None
        self.row_diag: FloatArray | None = None
        self.row: FloatArray | None = None
        if use_full and moments.full is not None:
            self.full = _cholesky(moments.full[group], damping)
        if moments.rows_diagonal:
            self.row_diag = _diagonal_root(moments.rows[group], damping)
        else:
            self.row = _cholesky(moments.rows[group], damping)
        # B / tr B: the Kronecker model A ⊗ B / tr Σ keeps tr Σ = tr A, one scale for every group
        self.tap = _cholesky(moments.taps[group], damping, unit_trace=True) if self.taps > 1 else np.ones((1, 1))

    # ----- row side (A) alone, for the spatial split's left factor

    def rows_t_times(self, m: FloatArray) -> FloatArray:
        """``L_Aᵀ m`` for ``m`` with ``R`` rows."""
        if self.row_diag is not None:
            return self.row_diag[:, None] * m
        assert self.row is not None
        return self.row.T @ m

    def rows_t_solve(self, m: FloatArray) -> FloatArray:
        """``L_A⁻ᵀ m``."""
        if self.row_diag is not None:
            return m / self.row_diag[:, None]
        assert self.row is not None
        solved: FloatArray = scipy.linalg.solve_triangular(self.row, m, trans="T", lower=True, check_finite=False)
        return solved

    # ----- tap side (B), acting on the last axis of length kw

    def taps_times(self, m: FloatArray) -> FloatArray:
        """``m L_B`` along the last axis."""
        return m @ self.tap

    def taps_solve(self, m: FloatArray) -> FloatArray:
        """``m L_B⁻¹`` along the last axis."""
        shape = m.shape
        flat = m.reshape(-1, self.taps)
        solved = scipy.linalg.solve_triangular(self.tap, flat.T, trans="T", lower=True, check_finite=False).T
        return np.asarray(solved).reshape(shape)

    # ----- both, on rows of (R·kw) flattened patches (channel split)

    def times(self, m: FloatArray) -> FloatArray:
        """``m L`` for ``m`` of shape ``(k, R·kw)``."""
        if self.full is not None:
            return m @ self.full
        cube = m.reshape(m.shape[0], self.rows, self.taps)
        if self.row is not None:
            # (X (L_A ⊗ L_B))[k] = L_Aᵀ X_k L_B, as one product per side over all k
            cube = (self.row.T @ cube.transpose(1, 0, 2).reshape(self.rows, -1)).reshape(self.rows, m.shape[0], self.taps)
            cube = cube.transpose(1, 0, 2)
        else:
            cube = cube * self.row_diag[None, :, None]  # type: ignore[index]
        return self.taps_times(cube).reshape(m.shape)

    def solve(self, m: FloatArray) -> FloatArray:
        """``m L⁻¹`` for ``m`` of shape ``(k, R·kw)``."""
        if self.full is not None:
            solved: FloatArray = scipy.linalg.solve_triangular(self.full, m.T, trans="T", lower=True, check_finite=False).T
            return solved
        cube = m.reshape(m.shape[0], self.rows, self.taps)
        if self.row is not None:
            # (X L_A⁻¹)[k] = L_A⁻ᵀ X_k, row side of each (R, kw) slice
            cube = scipy.linalg.solve_triangular(
                self.row, cube.transpose(1, 0, 2).reshape(self.rows, -1), trans="T", lower=True, check_finite=False
            )
            cube = cube.reshape(self.rows, m.shape[0], self.taps).transpose(1, 0, 2)
        else:
            cube = cube / self.row_diag[None, :, None]  # type: ignore[index]
        return self.taps_solve(cube).reshape(m.shape)


class WhitenedDecomposition:
    """The data-aware counterpart of :class:`onnx_lowrank.factorization.Decomposition`: same ``s``,
    ``full_rank`` and ``factors(rank)``, with ``s`` the whitened singular values, so that
    ``tail_errors(s)[K]`` is the relative output error ``E||(W − W_K) x||² / E||W x||²`` predicted from the
    moments (see the module docstring).

    The whitened matrices are decomposed by :class:`~onnx_lowrank.factorization.Decomposition` (thin SVD, or
    the Gram route for large ones), which recomputes them from the kernel and the whitening factors when
    factors are asked for: memory stays near the kernel plus the whitening factors and one Gram per group.
    ``use_full`` whitens the channel split with the full patch covariance when the moments hold it.
    """

    def __init__(
        self,
        weight: npt.NDArray[np.generic],
        groups: int,
        kind: Kind,
        moments: PatchMoments,
        *,
        damping: float = DEFAULT_DAMPING,
        use_full: bool = True,
    ) -> None:
        self.weight_shape = tuple(int(d) for d in weight.shape)
        self.groups = groups
        self.kind: Kind = kind
        self.damping = damping
        spatial = self.weight_shape[2:]
        rows = self.weight_shape[1] * int(np.prod(spatial[:-1], dtype=np.int64))
        if moments.groups != groups or moments.mean.shape[1:] != (rows, spatial[-1]):
            raise ValueError(f"moments of shape {moments.mean.shape} do not fit a kernel {self.weight_shape} with {groups} groups")
        self.full_rank = full_rank(self.weight_shape, groups, kind)
        self._weight = weight
        self._whitening = [_Whitening(moments, g, damping, use_full and kind == "channel") for g in range(groups)]
        self._inner = Decomposition(weight, groups, kind, matrix_of=self._whitened)

    def _whitened(self, g: int) -> FloatArray:
        n_g = self.weight_shape[0] // self.groups
        m = kernel_matrices(self._weight[g * n_g : (g + 1) * n_g], 1, self.kind)[0]
        w = self._whitening[g]
        if self.kind == "spatial":
            left = w.rows_t_times(m)  # (R, N_g·kw)
            return w.taps_times(left.reshape(m.shape[0], n_g, w.taps)).reshape(m.shape)
        return w.times(m)

    @property
    def s(self) -> FloatArray:
        """Whitened singular values, ``(groups, full_rank)``, each row descending."""
        return self._inner.s

    def factors(self, rank: int) -> Factors:
        """The rank-``rank`` factors minimising the modelled output error (rank clipped to the full rank)."""
        if rank < 1:
            raise ValueError(f"rank must be >= 1, got {rank}")
        s = self.s
        k = min(rank, self.full_rank)
        lefts, rights = [], []
        for g in range(self.groups):
            left, right = self._inner.group_factors(g, k)  # of the whitened matrix, √s on both
            w = self._whitening[g]
            if self.kind == "spatial":
                left = w.rows_t_solve(left)
                n_g = right.shape[1] // w.taps
                right = w.taps_solve(right.reshape(k, n_g, w.taps)).reshape(right.shape)
            else:
                right = w.solve(right)
            lefts.append(left)
            rights.append(right)
        return assemble_factors(self.kind, self.weight_shape, lefts, rights, s)


def output_error(delta: npt.NDArray[np.generic], groups: int, moments: PatchMoments) -> float:
    """``Σ_g tr(ΔW_g Σ_g ΔW_gᵀ)``: the mean squared output change per output pixel of a kernel change
    ``delta`` (conv layout), from the full patch moments (which must have been accumulated)."""
    if moments.full is None:
        raise ValueError("output_error needs the full patch moments")
    d = np.asarray(delta, dtype=np.float64)
    n_g = d.shape[0] // groups
    total = 0.0
    for g in range(groups):
        flat = d[g * n_g : (g + 1) * n_g].reshape(n_g, -1)
        total += float(np.einsum("ni,ij,nj->", flat, moments.full[g], flat))
    return total
