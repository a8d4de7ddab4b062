"""Second moments of what each layer reads, accumulated batch by batch (pure numpy; knows nothing of ONNX).

Patches
-------
A convolution with kernel ``(*S, kw)`` (``S`` the leading spatial extents, ``kw`` the width) and ``g`` groups
computes each output pixel ``o`` of channel ``n`` in group ``gᵢ`` as ``Σ_{c,s,j} W[n, c, s, j] · x_o[gᵢ, c, s, j]``:
the *patch* ``x_o`` is the part of the (padded) input under the kernel at ``o``: an ``R × kw`` matrix with
``R = C_g·|S|`` rows (``(c, s)``, ``c`` major, as in :func:`onnx_lowrank.factorization.kernel_matrices`) and
``kw`` taps. :func:`gather_patches` cuts the patches of a grid of output positions into an array
``(g, P, kw, R)`` — group first and taps before rows, so that every product below is a plain matrix product
on contiguous memory — by one strided gather per tap (``np.take`` along each spatial axis).
The geometry follows the ONNX operators:

* ``Conv``: input axis ``a`` padded by ``pads``, tap ``t`` of output ``o`` reads ``o·stride + t·dilation``;
  ``auto_pad`` SAME_UPPER/LOWER pads ``max(0, (⌈n/s⌉ − 1)·s + (k − 1)·d + 1 − n)`` in total per axis, the
  larger half at the end (UPPER) or the start (LOWER).
* ``ConvTranspose`` (weight ``(C, N_g, *S, kw)``, seen in conv layout ``W[n, c]``): output ``o`` receives
  input ``i`` through tap ``t`` when ``i·stride + t·dilation − pad_begin = o``; on the input upsampled by
  ``stride`` (zeros between samples) this is a convolution whose tap ``t`` reads ``o + pad_begin − t·dilation``
  — the same patches with the taps reversed. The output length is
  ``stride·(n − 1) + output_padding + (k − 1)·dilation + 1 − pad_begin − pad_end`` (or ``output_shape``).
* a fully connected layer (``Gemm``, ``MatMul``) is a ``1 × 1`` convolution of its rows: ``R`` features, one tap.

Moments
-------
:class:`MomentAccumulator` sums, per group, over every patch ``x`` (an ``R × kw`` matrix) it is given:

* ``Σ x`` (the mean patch μ);
* ``A = Σ_j x_{·j} x_{·j}ᵀ`` (``R × R``), the partial trace over the taps — or only its diagonal when
  ``R`` exceeds :data:`FULL_ROWS_MAX` (what a full matrix would cost: ``R²`` floats per group);
* ``B = Σ_r x_{r·}ᵀ x_{r·}`` (``kw × kw``), the partial trace over the rows;
* optionally the full Gram ``Σ vec(x) vec(x)ᵀ`` (``R·kw`` square), for small layers.

The sums are taken about a fixed shift (the mean patch of the first batch) in float64, which keeps the
centred moments exact to rounding however large the mean; each batch's products are formed in float32
(BLAS), whose relative rounding, about ``1e-7·√rows``, is far below the sampling error of any statistic.
:meth:`MomentAccumulator.result` gives :class:`PatchMoments`, centred or not.

Why the two partial traces: when the patch covariance is a Kronecker product ``Σ = A₀ ⊗ B₀`` (rows ⊗ taps),
``tr_taps Σ = A₀·tr B₀`` and ``tr_rows Σ = tr A₀·B₀``, so ``Σ = A ⊗ B / tr Σ`` exactly; in general this
is the Kronecker model of the covariance that :mod:`onnx_lowrank.calibration.data_aware` whitens with, at
``R² + kw²`` numbers instead of ``(R·kw)²``.

Cost per patch: ``kw·R²`` multiply-adds for ``A`` (``R`` for its diagonal), ``R·kw²`` for ``B``,
``(R·kw)²`` for the full Gram. :func:`sample_grid` keeps about a given number of output positions
per sample (a random grid: the same share of each axis, seeded), which bounds the cost on large inputs.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

__all__ = [
    "FULL_ROWS_MAX",
    "MomentAccumulator",
    "PatchGeometry",
    "PatchMoments",
    "gather_patches",
    "output_size",
    "sample_grid",
    "sample_rows",
]

Array = npt.NDArray[np.floating]
FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.intp]

# rows per group beyond which only the diagonal of A is kept: a full A costs 8·R² bytes per group
# (4096: 128 MiB); VGG-16's fc6 (25088 inputs) would need 4.7 GiB
FULL_ROWS_MAX = 4096
# elements of one block of patches (float32, every group): 64 MiB
_BLOCK_ELEMENTS = 16_000_000
# patches of at most this many numbers (kw·R) are accumulated through their whole Gram (see MomentAccumulator._add_small)
_SMALL_PATCH = 64


@dataclass(frozen=True)
class PatchGeometry:
    """How a layer reads its input: the kernel's spatial extent and the operator's striding and padding.

    ``kernel == ()`` is a fully connected layer: its input is ``(rows, features)``. Otherwise the input
    is ``(batch, channels, *spatial)`` and ``kernel`` has one extent per spatial axis, the width last.
    ``pads`` are begins then ends; ``None`` derives them from ``auto_pad`` and the input size.
    """

    kernel: tuple[int, ...] = ()
    strides: tuple[int, ...] = ()
    dilations: tuple[int, ...] = ()
    pads: tuple[int, ...] | None = None
    auto_pad: str = "NOTSET"
    groups: int = 1
    transposed: bool = False
    output_padding: tuple[int, ...] = ()
    output_shape: tuple[int, ...] | None = None

    @property
    def fully_connected(self) -> bool:
        return not self.kernel

    @property
    def taps(self) -> int:
        """``kw``: the kernel's width (1 for a fully connected layer)."""
        return self.kernel[-1] if self.kernel else 1

    @property
    def lead(self) -> int:
        """``|S|``: the product of the kernel's leading spatial extents."""
        return math.prod(self.kernel[:-1]) if self.kernel else 1

    def rows(self, in_channels: int) -> int:
        """``R``: rows of a patch per group."""
        if self.fully_connected:
            return in_channels
        return (in_channels // self.groups) * self.lead

    def _pads(self, spatial: Sequence[int]) -> tuple[list[int], list[int]]:
        r = len(self.kernel)
        if self.transposed and self.output_shape is not None and self.auto_pad in ("NOTSET", ""):
            # the pads output_shape implies (the odd pixel at the start), as onnxruntime computes them
            begins, ends = [], []
            for axis, (n, k, s, d) in enumerate(zip(spatial, self.kernel, self.strides, self.dilations, strict=True)):
                op = self.output_padding[axis] if self.output_padding else 0
                total = s * (n - 1) + op + (k - 1) * d + 1 - self.output_shape[axis]
                begins.append(total - total // 2)
                ends.append(total // 2)
            return begins, ends
        if self.pads is not None and self.auto_pad in ("NOTSET", ""):
            return list(self.pads[:r]), list(self.pads[r:])
        if self.auto_pad == "VALID":
            return [0] * r, [0] * r
        if self.auto_pad not in ("SAME_UPPER", "SAME_LOWER"):
            return [0] * r, [0] * r
        begins, ends = [], []
        for axis, (n, k, s, d) in enumerate(zip(spatial, self.kernel, self.strides, self.dilations, strict=True)):
            if self.transposed:
                out = self.output_shape[axis] if self.output_shape is not None else n * s
                op = self.output_padding[axis] if self.output_padding else 0
                total = max(0, s * (n - 1) + op + (k - 1) * d + 1 - out)
                small, large = total // 2, total - total // 2
                # the ONNX ConvTranspose spec: SAME_UPPER puts the smaller half first
                begins.append(small if self.auto_pad == "SAME_UPPER" else large)
                ends.append(large if self.auto_pad == "SAME_UPPER" else small)
            else:
                out = -(-n // s)
                total = max(0, (out - 1) * s + (k - 1) * d + 1 - n)
                small, large = total // 2, total - total // 2
                begins.append(small if self.auto_pad == "SAME_UPPER" else large)
                ends.append(large if self.auto_pad == "SAME_UPPER" else small)
        return begins, ends


def output_size(geometry: PatchGeometry, spatial: Sequence[int]) -> tuple[int, ...]:
    """The output's spatial size for an input of spatial size ``spatial`` (``(rows,)`` for fully connected)."""
    if geometry.fully_connected:
        return tuple(spatial)
    begins, ends = geometry._pads(spatial)
    out = []
    for axis, (n, k, s, d) in enumerate(zip(spatial, geometry.kernel, geometry.strides, geometry.dilations, strict=True)):
        if geometry.transposed:
            if geometry.output_shape is not None:
                out.append(int(geometry.output_shape[axis]))
                continue
            op = geometry.output_padding[axis] if geometry.output_padding else 0
            out.append(s * (n - 1) + op + (k - 1) * d + 1 - begins[axis] - ends[axis])
        else:
            out.append((n + begins[axis] + ends[axis] - ((k - 1) * d + 1)) // s + 1)
    if any(o < 1 for o in out):
        raise ValueError(f"input of spatial size {tuple(spatial)} gives no output pixel for kernel {geometry.kernel}")
    return tuple(out)


def sample_grid(out: Sequence[int], limit: int | None, rng: np.random.Generator) -> tuple[IntArray, ...]:
    """Output positions used, as one sorted index array per axis (their product is the grid of positions):
    all of them, or per axis the same share drawn at random so that the grid holds about ``limit``."""
    total = math.prod(out)
    if limit is None or total <= limit:
        return tuple(np.arange(n, dtype=np.intp) for n in out)
    share = (limit / total) ** (1.0 / len(out))
    return tuple(np.sort(rng.choice(n, size=max(1, min(n, round(n * share))), replace=False)).astype(np.intp) for n in out)


def sample_rows(total: int, limit: int | None, rng: np.random.Generator) -> IntArray:
    """Row indices used (sorted): all, or ``limit`` drawn at random."""
    if limit is None or total <= limit:
        return np.arange(total, dtype=np.intp)
    return np.sort(rng.choice(total, size=limit, replace=False)).astype(np.intp)


def _extended(x: Array, geometry: PatchGeometry, out: tuple[int, ...]) -> tuple[Array, list[tuple[int, int, int]]]:
    """The input padded (and, transposed, upsampled) so every tap index is in range, and per axis
    ``(a, b, c)`` with tap ``t`` of output ``o`` at index ``a·o + b·t + c``."""
    spatial = x.shape[2:]
    begins, ends = geometry._pads(spatial)
    widths: list[tuple[int, int]] = [(0, 0), (0, 0)]
    maps: list[tuple[int, int, int]] = []
    if geometry.transposed:
        upsampled_shape = [x.shape[0], x.shape[1]] + [s * (n - 1) + 1 for n, s in zip(spatial, geometry.strides, strict=True)]
        upsampled = np.zeros(upsampled_shape, dtype=x.dtype)
        upsampled[(slice(None), slice(None), *(slice(None, None, s) for s in geometry.strides))] = x
        for axis, (n, k, s, d) in enumerate(zip(spatial, geometry.kernel, geometry.strides, geometry.dilations, strict=True)):
            front = max(0, (k - 1) * d - begins[axis])
            back = max(0, out[axis] - 1 + begins[axis] - s * (n - 1))
            widths.append((front, back))
            maps.append((1, -d, begins[axis] + front))
        return np.pad(upsampled, widths), maps
    for axis in range(len(geometry.kernel)):
        widths.append((begins[axis], ends[axis]))
        maps.append((geometry.strides[axis], geometry.dilations[axis], 0))
    padded = np.pad(x, widths) if any(w != (0, 0) for w in widths) else x
    return padded, maps


def gather_patches(x: Array, geometry: PatchGeometry, grid: Sequence[IntArray] | None = None) -> Array:
    """The patches of ``x`` at the output positions of ``grid`` (all when None), float32, laid out
    ``(g, P, kw, R)``: per group, per position (row-major over the grid, sample-major), per tap, per row —
    the rows ordered ``(s, c)`` here (leading kernel index major; :class:`MomentAccumulator` reorders its
    sums to the ``(c, s)`` of the kernel matrices).

    Conv-like layers: ``x`` is ``(batch, C, *spatial)``; the patches are a strided view of the padded input
    (channels last), copied once. Fully connected layers: ``x`` is ``(rows, features)`` and ``grid`` is one
    array of row indices.
    """
    if geometry.fully_connected:
        rows = x if grid is None else x[grid[0]]
        return np.asarray(rows, dtype=np.float32)[None, :, None, :]
    batch, channels = x.shape[:2]
    r = len(geometry.kernel)
    if grid is not None and not geometry.transposed:
        return _arrange(_gathered(x, geometry, grid), geometry, batch, channels)
    out = output_size(geometry, x.shape[2:])
    extended, maps = _extended(x, geometry, out)
    last = np.moveaxis(extended, 1, -1)  # (B, *ext, C)
    spans = [(k - 1) * d + 1 for k, d in zip(geometry.kernel, geometry.dilations, strict=True)]
    view = np.lib.stride_tricks.sliding_window_view(last, spans, axis=tuple(range(1, r + 1)))  # (B, *starts, C, *spans)
    picks: list[slice] = []
    for (a, b, c), span, n in zip(maps, spans, out, strict=True):
        # tap t of output o is at a·o + b·t + c: the window starting at a·o + c (+ b·(k−1) when b < 0)
        offset = c + (b * ((span - 1) // abs(b)) if b < 0 else 0)
        picks.append(slice(offset, offset + a * (n - 1) + 1, a))
    taps = [slice(None, None, d) for d in geometry.dilations]
    index: tuple[Any, ...] = (slice(None), *picks, slice(None), *taps)
    view = view[index]  # (B, *out, C, *kernel)
    if geometry.transposed:  # the window runs against the taps
        index = (Ellipsis, *([slice(None, None, -1)] * r))
        view = view[index]
    if grid is not None:
        index = (slice(None), *np.ix_(*grid))
        view = view[index]
    return _arrange(view, geometry, batch, channels)


def _gathered(x: Array, geometry: PatchGeometry, grid: Sequence[IntArray]) -> Array:
    """The patches of a convolution at the output positions of ``grid``, ``(B, *grid, C, *kernel)``: along each
    spatial axis only the input indices the grid's taps read are gathered (``np.take``), zero where they fall
    in the padding — the input is never padded or copied whole, which on a large input costs more than the
    few patches kept."""
    r = len(geometry.kernel)
    begins, _ = geometry._pads(x.shape[2:])
    picked: Array = x
    valid: npt.NDArray[np.bool_] | None = None
    for axis, (positions, k, s, d) in enumerate(zip(grid, geometry.kernel, geometry.strides, geometry.dilations, strict=True)):
        n = x.shape[2 + axis]
        index = positions[:, None] * s + np.arange(k) * d - begins[axis]  # (grid_a, k): input index of each tap
        inside = (index >= 0) & (index < n)
        picked = np.take(picked, np.clip(index, 0, n - 1), axis=2 + 2 * axis)  # (B, C, …, grid_a, k, …)
        shape = [1] * (2 * r)
        shape[2 * axis], shape[2 * axis + 1] = inside.shape
        mask = inside.reshape(shape)
        valid = mask if valid is None else valid & mask
    if valid is not None and not valid.all():
        picked = picked * valid.astype(picked.dtype)
    # (B, C, g1, k1, g2, k2, …) → (B, g1, g2, …, C, k1, k2, …)
    order = (0, *range(2, 2 + 2 * r, 2), 1, *range(3, 3 + 2 * r, 2))
    return picked.transpose(order)


def _arrange(view: Array, geometry: PatchGeometry, batch: int, channels: int) -> Array:
    """Patches ``(B, *grid, C, *kernel)`` laid out ``(g, P, kw, R)`` in float32 (see :func:`gather_patches`)."""
    r = len(geometry.kernel)
    sizes = view.shape[1 : r + 1]
    g, c_g = geometry.groups, channels // geometry.groups
    view = view.reshape(batch, *sizes, g, c_g, *geometry.kernel)
    # (B, *grid, g, C_g, *lead, kw) → (g, B, *grid, kw, *lead, C_g)
    order = (1 + r, 0, *range(1, r + 1), 2 + 2 * r, *range(3 + r, 2 + 2 * r), 2 + r)
    block = np.ascontiguousarray(view.transpose(order), dtype=np.float32)
    return block.reshape(g, batch * math.prod(sizes), geometry.taps, geometry.lead * c_g)


@dataclass(frozen=True)
class PatchMoments:
    """Per-group second moments of a layer's patches (see the module docstring); ``rows_diagonal`` when
    only the diagonal of the row moment was kept (``rows`` is then ``(g, R)``)."""

    count: int
    mean: FloatArray  # (g, R, kw)
    rows: FloatArray  # (g, R, R), or (g, R) when rows_diagonal
    taps: FloatArray  # (g, kw, kw)
    full: FloatArray | None  # (g, R·kw, R·kw)
    rows_diagonal: bool
    centered: bool

    @property
    def groups(self) -> int:
        return int(self.mean.shape[0])


class MomentAccumulator:
    """Sums of a layer's patches and their products, per group, fed one batch of patches at a time."""

    def __init__(self, groups: int, rows: int, taps: int, *, lead: int = 1, full: bool = False, rows_max: int = FULL_ROWS_MAX) -> None:
        self.groups, self.n_rows, self.n_taps, self.lead = groups, rows, taps, lead
        self.diagonal = rows > rows_max
        self.count = 0
        self.shift: npt.NDArray[np.float32] | None = None
        self.sum = np.zeros((groups, taps, rows))
        self.rows = np.zeros((groups, rows) if self.diagonal else (groups, rows, rows))
        self.taps = np.zeros((groups, taps, taps))
        self.full = np.zeros((groups, taps * rows, taps * rows)) if full else None

    def add(self, patches: Array) -> None:
        """Accumulate ``patches`` laid out ``(g, P, kw, R)`` (as :func:`gather_patches` gives them); they
        may be changed in place."""
        g, p, kw, r = patches.shape
        if (g, kw, r) != (self.groups, self.n_taps, self.n_rows):
            raise ValueError(f"patches of shape {(g, kw, r)} given to moments of shape {(self.groups, self.n_taps, self.n_rows)}")
        if p == 0:
            return
        if patches.dtype != np.float32 or not patches.flags.writeable:
            patches = patches.astype(np.float32)
        if self.shift is None:
            self.shift = patches.mean(axis=1, dtype=np.float64).astype(np.float32)[:, None]
        step = max(1, _BLOCK_ELEMENTS // max(1, g * kw * r))
        small = kw * r <= _SMALL_PATCH and not self.diagonal
        for start in range(0, p, step):
            block = patches[:, start : start + step]
            block -= self.shift
            n = block.shape[1]
            if small:
                self._add_small(block)
                continue
            self.sum += block.sum(axis=1, dtype=np.float64)
            # every group at once (batched products): a depthwise conv has as many groups as channels
            columns = block.reshape(g, n * kw, r)  # one row per (patch, tap)
            if self.diagonal:
                self.rows += np.einsum("gij,gij->gj", columns, columns, dtype=np.float64)
            else:
                self.rows += np.matmul(columns.transpose(0, 2, 1), columns)
            if kw > 1:
                by_tap = np.ascontiguousarray(block.transpose(0, 2, 1, 3)).reshape(g, kw, n * r)
                self.taps += np.matmul(by_tap, by_tap.transpose(0, 2, 1))
            else:
                self.taps[:, 0, 0] += np.einsum("gij,gij->g", columns, columns)
            if self.full is not None:
                flat = block.reshape(g, n, kw * r)
                self.full += np.matmul(flat.transpose(0, 2, 1), flat)
            self.count += n

    def _add_small(self, block: Array) -> None:
        """:meth:`add` of one block of small patches (``kw·R`` at most ``_SMALL_PATCH``: a depthwise conv's are
        ``kw²``): each group's whole Gram in one batched product, and both partial traces read off it — per-group
        products of a few rows cost more in calls than in arithmetic."""
        g, n, kw, r = block.shape
        flat = block.reshape(g, n, kw * r)  # per patch: taps major, rows minor
        self.sum += np.matmul(np.ones((1, n), dtype=np.float32), flat).reshape(g, kw, r)
        gram = np.matmul(flat.transpose(0, 2, 1), flat)  # (g, kw·R, kw·R)
        blocks = gram.reshape(g, kw, r, kw, r)
        self.rows += np.einsum("gtrts->grs", blocks)
        self.taps += np.einsum("gtrur->gtu", blocks)
        if self.full is not None:
            self.full += gram
        self.count += n

    def result(self, centered: bool = True) -> PatchMoments:
        """The moments divided by the count: covariances when ``centered``, else raw second moments."""
        if self.count == 0 or self.shift is None:
            raise ValueError("no patches were accumulated")
        n = float(self.count)
        delta = self.sum / n  # mean − shift, (g, kw, R)
        mean = self.shift.astype(np.float64)[:, 0] + delta
        # E[(x − m)(x − m)ᵀ] − δδᵀ is the covariance; adding μμᵀ back gives the raw second moment
        terms = [(-1.0, delta)] + ([] if centered else [(1.0, mean)])
        rows = self.rows / n
        taps = self.taps / n
        full = self.full / n if self.full is not None else None
        for sign, v in terms:
            if self.diagonal:
                rows = rows + sign * np.einsum("gjr,gjr->gr", v, v)
            else:
                rows = rows + sign * (v.transpose(0, 2, 1) @ v)
            taps = taps + sign * (v @ v.transpose(0, 2, 1))
            if full is not None:
                flat = v.reshape(self.groups, -1)
                full = full + sign * np.einsum("gi,gj->gij", flat, flat)
        # accumulated with rows (s, c) and (tap, row) flattened; the kernel matrices index rows (c, s) and
        # patches (row, tap)
        order = np.arange(self.n_rows).reshape(self.lead, -1).T.reshape(-1)  # (c, s) position → (s, c) index
        g, r, kw = self.groups, self.n_rows, self.n_taps
        mean = mean[:, :, order]
        rows = rows[:, order] if self.diagonal else rows[:, order][:, :, order]
        if full is not None:
            full = full.reshape(g, kw, r, kw, r)[:, :, order][:, :, :, :, order]
            full = full.transpose(0, 2, 1, 4, 3).reshape(g, r * kw, r * kw)
        return PatchMoments(self.count, mean.transpose(0, 2, 1).copy(), rows, taps, full, self.diagonal, centered)
