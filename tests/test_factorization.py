"""Property tests of the pure factorization math (Tai et al. 2016, Theorem 1).

The checks do not trust the package's own reshapes: the kernel matrix is built
entry by entry from its definition, and the factors are composed the way two
convs in sequence compose (group by group), independently of ``reconstruct``.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import numpy.typing as npt
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from onnx_lowrank.factorization import (
    Factors,
    Kind,
    decompose_kernel,
    factorize,
    full_rank,
    reconstruct,
    relative_error,
    singular_values,
)
from onnx_lowrank.ranks import energy_rank, tail_errors

FloatArray = npt.NDArray[np.float64]
KINDS: tuple[Kind, ...] = ("spatial", "channel")
SETTINGS = settings(max_examples=100, deadline=None, derandomize=True)


# --------------------------------------------------------------------------- references


def matrix_of(w: FloatArray, groups: int, kind: Kind) -> list[FloatArray]:
    """Each group's kernel matrix, entry by entry from its definition.

    spatial: ``M[(c, s), (n, j)] = W[n, c, s, j]``; channel: ``M[n, (c, s, j)] = W[n, c, s, j]``.
    """
    n_all, cg = w.shape[:2]
    lead_shape, kw = w.shape[2:-1], w.shape[-1]
    leads = list(itertools.product(*(range(d) for d in lead_shape)))
    ng = n_all // groups
    mats = []
    for g in range(groups):
        if kind == "spatial":
            m = np.empty((cg * len(leads), ng * kw))
            for c, (li, s), n, j in itertools.product(range(cg), enumerate(leads), range(ng), range(kw)):
                m[c * len(leads) + li, n * kw + j] = w[(g * ng + n, c, *s, j)]
        else:
            m = np.empty((ng, cg * len(leads) * kw))
            for n, c, (li, s), j in itertools.product(range(ng), range(cg), enumerate(leads), range(kw)):
                m[n, (c * len(leads) + li) * kw + j] = w[(g * ng + n, c, *s, j)]
        mats.append(m)
    return mats


def compose(first: FloatArray, second: FloatArray, groups: int, kind: Kind) -> FloatArray:
    """The kernel of running conv ``first`` then conv ``second``, both with ``groups`` groups."""
    n = second.shape[0]
    k = second.shape[1]
    ng = n // groups
    parts = []
    for g in range(groups):
        f = first[g * k : (g + 1) * k]  # the K channels group g of the second conv reads
        s = second[g * ng : (g + 1) * ng]
        if kind == "spatial":
            v = f[..., 0]  # (K, C_g, *S)
            h = s.reshape(ng, k, s.shape[-1])  # (ng, K, kw)
            w = np.tensordot(h, v, axes=([1], [0]))  # (ng, kw, C_g, *S)
            parts.append(np.moveaxis(w, 1, -1))
        else:
            parts.append(np.tensordot(s.reshape(ng, k), f, axes=([1], [0])))  # (ng, C_g, *S, kw)
    return np.concatenate(parts, axis=0)


def rel_err(w: FloatArray, approx: FloatArray) -> float:
    return float(np.linalg.norm(w - approx) / np.linalg.norm(w))


def expected_shapes(shape: tuple[int, ...], groups: int, rank: int, kind: Kind) -> tuple[tuple[int, ...], tuple[int, ...]]:
    n, cg, *spatial = shape
    ones = [1] * (len(spatial) - 1)
    if kind == "spatial":
        return (groups * rank, cg, *spatial[:-1], 1), (n, rank, *ones, spatial[-1])
    return (groups * rank, cg, *spatial), (n, rank, *ones, 1)


# --------------------------------------------------------------------------- strategies


@st.composite
def group_layout(draw: st.DrawFn) -> tuple[int, int, int]:
    """``(groups, N, C)`` with ``N, C`` in 1..5 both divisible by ``groups``."""
    g = draw(st.integers(1, 5))
    return g, g * draw(st.integers(1, 5 // g)), g * draw(st.integers(1, 5 // g))


@st.composite
def kernels(draw: st.DrawFn, kind: Kind | None = None) -> tuple[FloatArray, int]:
    """A kernel ``(N, C/g, *spatial)`` (2-D or 3-D) and its groups; Gaussian, scaled, exactly low-rank or with zero filters."""
    g, n, c = draw(group_layout())
    dims = draw(st.sampled_from([2, 3]))
    spatial = tuple(draw(st.integers(1, 5)) for _ in range(dims))
    shape = (n, c // g, *spatial)
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    style = draw(st.sampled_from(["gaussian", "scaled", "low_rank", "zero_filters"]))
    w = rng.standard_normal(shape)
    if style == "scaled":
        w *= 10.0 ** draw(st.integers(-4, 4))
    elif style == "low_rank":
        split: Kind = kind or draw(st.sampled_from(KINDS))
        r = draw(st.integers(1, full_rank(shape, g, split)))
        first_shape, second_shape = expected_shapes(shape, g, r, split)
        w = compose(rng.standard_normal(first_shape), rng.standard_normal(second_shape), g, split)
    elif style == "zero_filters" and n > 1:
        w[rng.random(n) < 0.5] = 0.0
        w[0] = rng.standard_normal(shape[1:])  # keep the kernel nonzero
    return w, g


# --------------------------------------------------------------------------- factorization


@pytest.mark.parametrize("kind", KINDS)
@SETTINGS
@given(data=st.data())
def test_full_rank_factors_are_exact(kind: Kind, data: st.DataObject) -> None:
    """At full rank both factors compose back to ``W`` to float64 precision."""
    w, g = data.draw(kernels(kind))
    mats = matrix_of(w, g, kind)
    full = min(mats[0].shape)
    assert full_rank(w.shape, g, kind) == full
    factors = factorize(w, g, rank=10**6, kind=kind)  # any larger rank is clipped to the full rank
    assert factors.rank == full
    assert (factors.first.shape, factors.second.shape) == expected_shapes(w.shape, g, full, kind)
    tol = 1e-12 * float(np.linalg.norm(w))
    np.testing.assert_allclose(reconstruct(factors, g), w, rtol=0, atol=tol)
    np.testing.assert_allclose(compose(factors.first, factors.second, g, kind), w, rtol=0, atol=tol)
    assert factors.relative_error == 0.0


@pytest.mark.parametrize("kind", KINDS)
@SETTINGS
@given(data=st.data())
def test_every_rank_reaches_the_eckart_young_optimum(kind: Kind, data: st.DataObject) -> None:
    """At each K the measured error is ``sqrt(Σ_{k>K} s_k² / Σ s_k²)``, from the theorem's matrix."""
    w, g = data.draw(kernels(kind))
    s = singular_values(w, g, kind)
    # the singular values are those of the matrix of Theorem 1, built here from its definition
    expected_s = np.stack([np.linalg.svd(m, compute_uv=False) for m in matrix_of(w, g, kind)])
    np.testing.assert_allclose(s, expected_s, rtol=0, atol=1e-12 * float(expected_s.max()))
    decomposition = decompose_kernel(w, g, kind)
    np.testing.assert_allclose(decomposition.s, s, rtol=0, atol=1e-12 * float(s.max()))
    full = s.shape[1]
    for k in range(1, full + 1):
        factors = decomposition.factors(k)
        assert factors.rank == k
        assert (factors.first.shape, factors.second.shape) == expected_shapes(w.shape, g, k, kind)
        approx = reconstruct(factors, g)
        np.testing.assert_allclose(compose(factors.first, factors.second, g, kind), approx, rtol=0, atol=1e-12 * float(np.linalg.norm(w)))
        optimum = relative_error(s, k)
        assert rel_err(w, approx) == pytest.approx(optimum, rel=1e-7, abs=1e-10)
        assert factors.relative_error == pytest.approx(optimum, rel=1e-12, abs=1e-15)
        tail = float(np.sum(expected_s[:, k:] ** 2))
        assert optimum == pytest.approx(math.sqrt(tail / float(np.sum(expected_s**2))), rel=1e-9, abs=1e-12)
    if full > 1:  # factorize is the same cut as decompose_kernel(...).factors
        k = data.draw(st.integers(1, full - 1))
        cut = reconstruct(decomposition.factors(k), g)
        np.testing.assert_allclose(reconstruct(factorize(w, g, k, kind), g), cut, atol=1e-12 * float(np.linalg.norm(w)))


def _fit_second(w: FloatArray, first: FloatArray, groups: int, kind: Kind) -> FloatArray:
    """The least-squares best ``second`` factor for a given ``first`` (a strong rank-K competitor)."""
    n = w.shape[0]
    ng = n // groups
    k = first.shape[0] // groups
    parts = []
    for g in range(groups):
        wg, fg = w[g * ng : (g + 1) * ng], first[g * k : (g + 1) * k]
        if kind == "spatial":
            a = fg[..., 0].reshape(k, -1).T  # ((c, s), K)
            b = np.moveaxis(wg, 0, -2).reshape(a.shape[0], ng * w.shape[-1])  # ((c, s), (n, j))
            x = np.linalg.lstsq(a, b, rcond=None)[0]  # (K, (n, j))
            parts.append(x.reshape(k, ng, w.shape[-1]).transpose(1, 0, 2))
        else:
            x = np.linalg.lstsq(fg.reshape(k, -1).T, wg.reshape(ng, -1).T, rcond=None)[0]  # (K, n)
            parts.append(x.T)
    second = np.concatenate(parts, axis=0)
    ones = [1] * (w.ndim - 3)
    return second.reshape(n, k, *ones, w.shape[-1] if kind == "spatial" else 1)


@pytest.mark.parametrize("kind", KINDS)
@SETTINGS
@given(data=st.data())
def test_no_rank_k_pair_beats_the_svd(kind: Kind, data: st.DataObject) -> None:
    """Random pairs, least-squares fitted pairs and perturbed optimal pairs never have a lower error."""
    w, g = data.draw(kernels(kind))
    full = full_rank(w.shape, g, kind)
    k = data.draw(st.integers(1, full))
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))
    best = factorize(w, g, k, kind)
    optimum = rel_err(w, reconstruct(best, g))
    first_shape, second_shape = expected_shapes(w.shape, g, k, kind)
    slack = 1e-9
    for _ in range(3):
        first = rng.standard_normal(first_shape)
        second = rng.standard_normal(second_shape) * float(np.std(w))
        assert rel_err(w, compose(first, second, g, kind)) >= optimum - slack
        fitted = _fit_second(w, first, g, kind)
        assert rel_err(w, compose(first, fitted, g, kind)) >= optimum - slack
        scale = 1e-3 * float(np.abs(best.first).max() + np.abs(best.second).max())
        nudged = Factors(kind, k, best.first + scale * rng.standard_normal(first_shape), best.second, best.singular_values)
        assert rel_err(w, reconstruct(nudged, g)) >= optimum - slack
        nudged = Factors(kind, k, best.first, best.second + scale * rng.standard_normal(second_shape), best.singular_values)
        assert rel_err(w, reconstruct(nudged, g)) >= optimum - slack


def test_zero_kernel_has_zero_error_and_factors() -> None:
    """An all-zero kernel factors to zeros with error 0 at every rank (no 0/0)."""
    w = np.zeros((4, 2, 3, 3))
    for k in (1, 2, 6):
        factors = factorize(w, 2, k)
        assert factors.relative_error == 0.0
        assert not np.any(reconstruct(factors, 2))
    assert relative_error(singular_values(w, 2), 1) == 0.0


def test_bad_kernels_are_refused() -> None:
    """Groups that do not divide N, non-finite values, rank 0 and kernels without spatial dims raise."""
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="groups"):
        factorize(rng.standard_normal((5, 2, 3, 3)), 2, 1)
    bad = rng.standard_normal((4, 2, 3, 3))
    bad[1, 0, 2, 2] = np.nan
    with pytest.raises(ValueError, match="non-finite"):
        factorize(bad, 1, 1)
    with pytest.raises(ValueError, match="rank"):
        decompose_kernel(rng.standard_normal((4, 2, 3, 3)), 1).factors(0)
    with pytest.raises(ValueError, match="spatial"):
        factorize(rng.standard_normal((4, 2)), 1, 1)


# --------------------------------------------------------------------------- tail errors / energy rank


@st.composite
def spectra(draw: st.DrawFn) -> FloatArray:
    """Singular values ``(groups, R)``, each row descending, zeros and wide dynamic range allowed."""
    groups, r = draw(st.integers(1, 4)), draw(st.integers(1, 12))
    value = st.one_of(st.just(0.0), st.floats(1e-6, 1e3, allow_nan=False, allow_infinity=False))
    rows = [sorted(draw(st.lists(value, min_size=r, max_size=r)), reverse=True) for _ in range(groups)]
    return np.array(rows, dtype=np.float64)


@SETTINGS
@given(s=spectra())
def test_tail_errors_are_the_lost_energy(s: FloatArray) -> None:
    """``e[K] = Σ_{k≥K} s_k² / Σ s²`` over all groups, from 1 at K=0 down to 0 at K=R, non-increasing."""
    e = tail_errors(s)
    sq = (s**2).sum(axis=0)
    total = float(sq.sum())
    assert e.shape == (s.shape[1] + 1,)
    assert e[-1] == 0.0
    assert np.all(np.diff(e) <= 1e-15)
    if total == 0.0:
        assert not np.any(e)
        return
    assert e[0] == pytest.approx(1.0, abs=1e-12)
    for k in range(s.shape[1] + 1):
        assert e[k] == pytest.approx(float(sq[k:].sum()) / total, rel=1e-9, abs=1e-15)
        assert e[k] == pytest.approx(relative_error(s, k) ** 2, rel=1e-9, abs=1e-15)


@SETTINGS
@given(s=spectra(), energy=st.floats(1e-6, 1.0))
def test_energy_rank_is_the_least_rank_keeping_the_energy(s: FloatArray, energy: float) -> None:
    """``energy_rank(s, E)`` is the least K >= 1 with kept energy >= E, and grows with E."""
    k = energy_rank(s, energy)
    sq = (s**2).sum(axis=0)
    total = float(sq.sum())
    assert 1 <= k <= s.shape[1]
    if total == 0.0:
        assert k == 1
        return
    kept = np.concatenate([[0.0], np.cumsum(sq)]) / total  # kept[K]
    assert kept[k] >= energy - 1e-9
    if k > 1:
        assert kept[k - 1] < energy + 1e-9
    assert energy_rank(s, energy / 2) <= k <= energy_rank(s, 1.0)


@pytest.mark.parametrize("kind", KINDS)
@SETTINGS
@given(data=st.data())
def test_full_energy_gives_the_numerical_rank(kind: Kind, data: st.DataObject) -> None:
    """A kernel built at rank r (per group) has ``energy_rank(s, 1) == r``, and rank r reproduces it."""
    g, n, c = data.draw(group_layout())
    spatial = tuple(data.draw(st.integers(1, 5)) for _ in range(data.draw(st.sampled_from([2, 3]))))
    shape = (n, c // g, *spatial)
    r = data.draw(st.integers(1, full_rank(shape, g, kind)))
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))
    first_shape, second_shape = expected_shapes(shape, g, r, kind)
    w = compose(rng.standard_normal(first_shape), rng.standard_normal(second_shape), g, kind)
    s = singular_values(w, g, kind)
    assert energy_rank(s, 1.0) == r
    np.testing.assert_allclose(reconstruct(factorize(w, g, r, kind), g), w, rtol=0, atol=1e-11 * float(np.linalg.norm(w)))
