"""The multilevel DWT of short rows as one matrix product: the ``dense`` backend of
:mod:`wavesweep.wavelets_torch` on an accelerator.

In the ``filter`` layout every row of the layout array (one filter, ``in*kh*kw`` weights) is
transformed on its own, and in the ``kernel`` layout every ``kh x kw`` kernel; either way the
transform of one row is a fixed linear map of ``N`` samples to ``n`` coefficients. So, with the
rows stacked as a ``(B, N)`` matrix ``X`` and their coefficients as ``(B, n)`` rows ``C``:
``C = X @ A`` and ``X = C @ S``, ``A`` (``N x n``) and ``S`` (``n x N``) the transform of the
identity (every mode, every wavelet: they are whatever the filter bank computes). On a GPU that
is one GEMM per layer where the filter bank runs a few kernels per level and band, which leaves a
GPU waiting on launches (ResNet-18's fine-tuning step: 20 layers x 5 levels). The matrices are
built once per row structure, device and dtype, in float64 on that device by
:func:`wavesweep.wavelets_torch.decompose` / :func:`~wavesweep.wavelets_torch.reconstruct`
(the filter bank, tested against PyWavelets), then cast, and cached up to
``DENSE_CACHE_BYTES`` (least recently used first out).

Used where ``n * N <= DENSE_MAX_ELEMENTS`` (a matrix of at most 128 MiB in float32: ResNet-18's
largest filter, 4608 weights, is 81 MiB); longer rows (``flat``, a large ``matrix``) keep the
filter bank. The products run in full float32 (no TF32: a synthesis must stay equal to
PyWavelets to float tolerance).

Row order: :func:`to_rows` / :func:`from_rows` convert between the flat coefficient order of
:mod:`wavesweep.wavelets` (band after band, each over every row) and rows ``(B, n)`` (each row's
bands side by side). Fine-tuning keeps its coefficients in row order, so a step is a mask
multiply and one GEMM per layer.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import threading
from collections import OrderedDict
from collections.abc import Iterator

import torch

from wavesweep import wavelets as wv

__all__ = ["DENSE_MAX_ELEMENTS", "applies", "rows_of", "row_sizes", "to_rows", "from_rows", "rows_to_stacked",
           "stacked_to_rows", "decompose", "reconstruct"]

DENSE_MAX_ELEMENTS = 1 << 25


def _geometry(structure: wv.CoeffStructure) -> tuple[int, tuple[int, ...], tuple[tuple[int, ...], ...]]:
    """``(B rows, the row's sample shape, each band's per-row shape)``."""
    nd = structure.ndim
    arr = structure.array_shape
    rows = math.prod(arr[: len(arr) - nd])
    return rows, tuple(arr[len(arr) - nd :]), tuple(tuple(s[len(s) - nd :]) for s in structure.shapes)


def rows_of(structure: wv.CoeffStructure) -> int:
    """``B``: the rows (filters, kernels; 1 for ``matrix`` and ``flat``) transformed one by one."""
    return _geometry(structure)[0]


def row_sizes(structure: wv.CoeffStructure) -> list[int]:
    """Each band's coefficients per row, in flat order."""
    return [math.prod(s) for s in _geometry(structure)[2]]


def applies(structure: wv.CoeffStructure) -> bool:
    """True where the dense backend can run ``structure``: a real level and matrices small enough."""
    if structure.level == 0:
        return False
    _, sample, _ = _geometry(structure)
    return math.prod(sample) * sum(row_sizes(structure)) <= DENSE_MAX_ELEMENTS


def _to_rows_by_band(flat: torch.Tensor, structure: wv.CoeffStructure) -> torch.Tensor:
    """:func:`to_rows` as one copy per band (no index vectors: what builds the matrices)."""
    rows = _geometry(structure)[0]
    # explicit row lengths (never -1): a layer without rows (a conv of 0 channels) has 0 of them
    return torch.cat([b.reshape(rows, n) for b, n in zip(torch.split(flat, structure.sizes), row_sizes(structure))], dim=1)


def _from_rows_by_band(rows: torch.Tensor, structure: wv.CoeffStructure) -> torch.Tensor:
    """:func:`from_rows` as one copy per band (no index vectors: what builds the matrices)."""
    return torch.cat([part.reshape(-1) for part in torch.split(rows, row_sizes(structure), dim=1)])


def to_rows(flat: torch.Tensor, structure: wv.CoeffStructure) -> torch.Tensor:
    """Flat coefficients (or a mask over them) in :mod:`wavesweep.wavelets` order -> ``(B, n)``:
    one gather (:func:`_orders`)."""
    return stacked_to_rows(flat.reshape(1, structure.n_coeffs), structure)


def from_rows(rows: torch.Tensor, structure: wv.CoeffStructure) -> torch.Tensor:
    """Inverse of :func:`to_rows`: ``(B, n)`` -> the flat order of :mod:`wavesweep.wavelets`."""
    return rows_to_stacked(rows, structure, 1).reshape(-1)


def rows_to_stacked(rows: torch.Tensor, structure: wv.CoeffStructure, layers: int) -> torch.Tensor:
    """The rows of ``L`` weights of ``structure.shape`` (``(L * B, n)``, weight after weight, as
    one product over all of them gives them) -> ``(L, structure.n_coeffs)``, row ``i`` weight
    ``i``'s coefficients in the flat order of :mod:`wavesweep.wavelets`: one gather for all of
    them, where the band-by-band reorder takes two copies a band and a concatenation."""
    to_flat, _ = _orders(structure, rows.device, _index_dtype(structure))
    return rows.reshape(layers, structure.n_coeffs).index_select(1, to_flat)


def stacked_to_rows(coeffs: torch.Tensor, structure: wv.CoeffStructure) -> torch.Tensor:
    """Inverse of :func:`rows_to_stacked`: ``(L, structure.n_coeffs)`` -> ``(L * B, n)``."""
    _, back = _orders(structure, coeffs.device, _index_dtype(structure))
    layers = coeffs.shape[0]
    return coeffs.index_select(1, back).reshape(layers * rows_of(structure), sum(row_sizes(structure)))


def _row_structure(structure: wv.CoeffStructure, rows: int) -> wv.CoeffStructure:
    """``structure`` with ``rows`` rows of the same sample shape (the identity's structure)."""
    nd = structure.ndim
    _, sample, bands = _geometry(structure)
    shape = (rows,) + sample
    return dataclasses.replace(
        structure, layout="filter" if nd == 1 else "kernel", shape=shape, array_shape=shape,
        shapes=tuple((rows,) + b for b in bands),
    )  # fmt: skip


#: bytes the cached matrices may hold together (per process, all devices). In float32, bior4.4
#: level 5, the filter layout needs 216 MiB for ResNet-18 (7 row shapes), 258 MiB for ResNet-50
#: (11) and 76 MiB for ViT-B/16's Linear layers (2); the least recently used go first
DENSE_CACHE_BYTES = 1 << 30


class _MatrixCache:
    """Least-recently-used ``(A, S)`` pairs (or what ``build`` makes: pairs of tensors), bounded
    by their bytes rather than their number (a pair takes from a few KB to 2 x 128 MiB): a
    process that meets many architectures on a small GPU keeps at most ``max_bytes`` of them,
    and always the pair in use."""

    def __init__(self, max_bytes: int, build=None) -> None:
        self.max_bytes = max_bytes
        self._build = build if build is not None else _build_matrices
        self.nbytes = 0
        self._pairs: OrderedDict = OrderedDict()
        self._lock = threading.Lock()

    def __call__(self, structure: wv.CoeffStructure, device: torch.device, dtype: torch.dtype):
        key = (structure, device, dtype)
        with self._lock:
            if key in self._pairs:
                self._pairs.move_to_end(key)
                return self._pairs[key]
        pair = self._build(structure, device, dtype)
        with self._lock:
            if key not in self._pairs:
                self._pairs[key] = pair
                self.nbytes += sum(t.numel() * t.element_size() for t in pair)
            while self.nbytes > self.max_bytes and len(self._pairs) > 1:
                _, old = self._pairs.popitem(last=False)
                self.nbytes -= sum(t.numel() * t.element_size() for t in old)
            return self._pairs.get(key, pair)

    def __len__(self) -> int:
        return len(self._pairs)


def _build_matrices(structure: wv.CoeffStructure, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """``(A, S)`` for ``structure``'s rows, in ``dtype`` on ``device``: the transform of the
    identity, computed in float64 on that device by the filter bank (its default backend there)."""
    from wavesweep import filterbank
    from wavesweep import wavelets_torch as wt

    n_sample = math.prod(_geometry(structure)[1])
    n = sum(row_sizes(structure))
    # the filter bank itself (never this module again): the device's own level backend
    with filterbank.forced_backend("taps" if device.type == "cpu" else "conv"), torch.no_grad():
        eye = torch.eye(max(n_sample, n), dtype=torch.float64, device=device)
        st_x = _row_structure(structure, n_sample)
        analysis = _to_rows_by_band(wt.decompose(eye[:n_sample, :n_sample].reshape(st_x.shape), st_x), st_x)  # (N, n)
        st_c = _row_structure(structure, n)
        synthesis = wt.reconstruct(_from_rows_by_band(eye[:n, :n], st_c), st_c).reshape(n, n_sample)
    return analysis.to(dtype).contiguous(), synthesis.to(dtype).contiguous()


_matrices = _MatrixCache(DENSE_CACHE_BYTES)


def _index_dtype(structure: wv.CoeffStructure) -> torch.dtype:
    """int32 indices where a weight's coefficients are fewer than 2**31 (half the bytes), else int64."""
    return torch.int32 if structure.n_coeffs < 2**31 else torch.int64


def _build_orders(structure: wv.CoeffStructure, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """``(to_flat, back)`` for one weight of ``structure``: ``flat = rows.reshape(-1)[to_flat]``
    and ``rows.reshape(-1) = flat[back]`` (a permutation and its inverse), in ``dtype`` on
    ``device``: the band-by-band reorder of :func:`_from_rows_by_band` applied to the positions."""
    b, sizes = rows_of(structure), row_sizes(structure)
    positions = torch.arange(b * sum(sizes)).reshape(b, sum(sizes))
    to_flat = _from_rows_by_band(positions, structure)
    back = torch.empty_like(to_flat)
    back[to_flat] = torch.arange(to_flat.numel())
    return to_flat.to(device, dtype), back.to(device, dtype)


#: bytes the cached index vectors may hold together: one pair per weight shape, as many
#: entries as the weight has coefficients each (int32): ResNet-50's 20 conv shapes in the
#: ``filter`` layout (those the dense backend takes) hold 75 MB
ORDER_CACHE_BYTES = 1 << 28
_orders = _MatrixCache(ORDER_CACHE_BYTES, build=_build_orders)


def _key(structure: wv.CoeffStructure) -> wv.CoeffStructure:
    """The cache key: the structure of one row (every layer with rows of that shape shares it)."""
    return _row_structure(structure, 1)


@contextlib.contextmanager
def _full_precision() -> Iterator[None]:
    """cuBLAS products in full float32 (no TF32). Where torch has the per-backend precision
    (``torch.backends.cuda.matmul.fp32_precision``, torch 2.9+) through it, its previous value put
    back as it was: there the legacy ``allow_tf32`` raises a RuntimeError ("mix of the legacy and
    new APIs") once a caller has set the new one (``fp32_precision = "tf32"``), and writing it back
    turned ``torch.set_float32_matmul_precision("medium")`` into a state whose getter raises."""
    matmul = torch.backends.cuda.matmul
    name = "fp32_precision" if hasattr(matmul, "fp32_precision") else "allow_tf32"
    prev = getattr(matmul, name)
    setattr(matmul, name, "ieee" if name == "fp32_precision" else False)
    try:
        yield
    finally:
        setattr(matmul, name, prev)


def decompose(x: torch.Tensor, structure: wv.CoeffStructure, *, rows: bool = False) -> torch.Tensor:
    """The coefficients of ``x`` (the weight, in a float dtype): flat order, or ``(B, n)`` rows."""
    b = _geometry(structure)[0]
    analysis, _ = _matrices(_key(structure), x.device, x.dtype)
    with _full_precision():
        c = x.reshape(b, analysis.shape[0]) @ analysis
    return c if rows else from_rows(c, structure)


def reconstruct(coeffs: torch.Tensor, structure: wv.CoeffStructure, *, keep: torch.Tensor | None = None,
                rows: bool = False) -> torch.Tensor:  # fmt: skip
    """The weight (``structure.shape``) from coefficients in flat order or as rows (``rows=True``,
    any shape holding ``(B, n)`` in order); ``keep`` (same order, 0/1 or bool) multiplies first."""
    b = _geometry(structure)[0]
    n = sum(row_sizes(structure))
    c = coeffs.reshape(b, n) if rows else to_rows(coeffs, structure)
    if keep is not None:
        k = keep.reshape(b, n) if rows else to_rows(keep, structure)
        c = c * k.to(c.dtype)
    _, synthesis = _matrices(_key(structure), c.device, c.dtype)
    with _full_precision():
        return (c @ synthesis).reshape(structure.shape)
