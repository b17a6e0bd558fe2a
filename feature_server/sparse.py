"""Activations as compressed sparse rows (``ExtractOptions.sparse``), on the wire and in results.

After a ReLU most of an activation is zero (VGG-19 conv5_4 on photos: ~7% non-zeros), and the
concept engine keeps the rows of V sparse anyway. So a feature source can hand each image's
(C, h, w) activation over as CSR rows - one row per position (y, x), row-major, holding that
position's non-zero channels (ascending) - which is what the engine's V is made of:

* on the wire 10x fewer bytes than a float32 Tensor (int32 row pointers, uint16 channels,
  values in the wire dtype; 15x with float16 values), so a served image costs the server and
  the client a fraction of the copying and serialisation;
* in the engine no dense copy and no dense -> sparse conversion (SciPy's took 0.37 ms per image).

Lossless: :meth:`SparseActivation.toarray` gives the dense activation back exactly.
:func:`from_dense` runs a compiled kernel (:mod:`feature_server.kernels`, Numba, no GIL: ~0.06 ms
per conv5_4 image) where Numba is available and not switched off (``DFF_KERNELS=0``), else NumPy
(same result, ~0.3 ms).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from dff_protos.errors import InvalidInput

from feature_server import kernels

#: channel numbers travel as uint16
MAX_CHANNELS = 65535
#: the largest dense size (C * h * w) a sparse activation may claim: 4 GiB of float32, 4x the
#: largest a served VGG-19 answer has (conv1_x: 64 channels at the 2048 x 2048 input limit).
#: A sparse message is small whatever shape it claims, so the claim is what is bounded
MAX_DENSE_ELEMENTS = 2**30



@dataclass(frozen=True, eq=False)
class SparseActivation:
    """One image's (C, h, w) activation as CSR rows over its h*w positions (see module doc).

    ``indptr`` int32 (h*w + 1,), ``indices`` uint16 (nnz,) channel numbers ascending within a
    row, ``values`` float32 or float16 (nnz,). Duck-types the dense array where results are
    read (``shape``, ``ndim``, ``np.asarray``)."""

    shape: tuple[int, int, int]
    indptr: np.ndarray
    indices: np.ndarray
    values: np.ndarray

    @property
    def ndim(self) -> int:
        return 3

    @property
    def dtype(self) -> np.dtype:
        return self.values.dtype

    @property
    def nnz(self) -> int:
        return int(self.indices.shape[0])

    @property
    def nbytes(self) -> int:
        return int(self.indptr.nbytes + self.indices.nbytes + self.values.nbytes)

    def toarray(self, dtype: Any = np.float32) -> np.ndarray:
        """The dense (C, h, w) activation."""
        c, h, w = self.shape
        out = np.zeros((h * w, c), dtype=dtype)
        rows = np.repeat(np.arange(h * w), np.diff(self.indptr))
        out[rows, self.indices] = self.values
        return np.ascontiguousarray(out.T).reshape(c, h, w)

    def __array__(self, dtype: Any = None, copy: bool | None = None) -> np.ndarray:
        return self.toarray(dtype or np.float32)

    def to_csr(self, relu: bool = False) -> Any:
        """The (h*w, C) rows as a SciPy CSR float32 matrix (sorted indices, no stored zeros);
        ``relu`` drops negative values (a layer without a ReLU)."""
        import scipy.sparse as sparse

        c, h, w = self.shape
        values = np.asarray(self.values, np.float32)
        m = sparse.csr_matrix((values, self.indices.astype(np.int32), self.indptr),
                              shape=(h * w, c), copy=False)
        m.has_sorted_indices = True
        if relu and self.nnz and float(values.min()) < 0:
            m = m.copy()
            np.maximum(m.data, 0, out=m.data)
            m.eliminate_zeros()
        return m

    def with_values(self, values: np.ndarray) -> SparseActivation:
        """The same pattern with other values (e.g. rounded to the wire dtype); entries whose
        new value is zero (a value below float16's range) are dropped, so the result is what
        :func:`from_dense` makes of the rounded dense array."""
        zero = values == 0
        if not zero.any():
            return SparseActivation(self.shape, self.indptr, self.indices, values)
        keep = ~zero
        kept_before = np.concatenate(([0], np.cumsum(keep, dtype=np.int64)))
        indptr = kept_before[self.indptr].astype(np.int32)
        return SparseActivation(self.shape, indptr, self.indices[keep], values[keep])

    def check(self) -> SparseActivation:
        """InvalidInput unless the parts form a valid activation of ``shape`` (what a client
        checks of a server's answer before using it); returns self."""
        if len(self.shape) != 3 or min(self.shape) < 1:
            raise InvalidInput(f"sparse activation: shape {tuple(self.shape)} is not (C, h, w)")
        c, h, w = self.shape
        if c > MAX_CHANNELS:
            raise InvalidInput(f"sparse activation: {c} channels, at most {MAX_CHANNELS}")
        if c * h * w > MAX_DENSE_ELEMENTS:
            raise InvalidInput(f"sparse activation: shape {tuple(self.shape)} is {c * h * w} "
                               f"values dense, more than {MAX_DENSE_ELEMENTS}")
        nnz = self.indices.shape[0]
        if self.indptr.shape != (h * w + 1,):
            raise InvalidInput(f"sparse activation: {self.indptr.shape[0]} row pointers for "
                               f"{h * w} positions (need {h * w + 1})")
        if self.values.shape != (nnz,):
            raise InvalidInput(f"sparse activation: {self.values.shape[0]} values for {nnz} "
                               "channel numbers")
        if self.indptr[0] != 0 or self.indptr[-1] != nnz or bool(
                np.any(self.indptr[1:] < self.indptr[:-1])):
            raise InvalidInput("sparse activation: row pointers must rise from 0 to the number "
                               f"of non-zeros ({nnz})")
        if nnz and int(self.indices.max()) >= c:
            raise InvalidInput(f"sparse activation: channel {int(self.indices.max())} of {c}")
        return self


def from_dense(activation: np.ndarray) -> SparseActivation:
    """A dense (C, h, w) activation as :class:`SparseActivation`: exactly its non-zero entries,
    with float16 values for a float16 activation (a half-IO session's), else float32."""
    act = np.asarray(activation)
    if act.ndim != 3:
        raise InvalidInput(f"activation of shape {act.shape} is not (C, h, w)")
    c, h, w = (int(v) for v in act.shape)
    if c > MAX_CHANNELS:
        raise InvalidInput(f"sparse activations need at most {MAX_CHANNELS} channels, got {c}")
    plane = act.reshape(c, h * w)
    if plane.dtype not in (np.float32, np.float16):
        plane = plane.astype(np.float32)
    if kernels.AVAILABLE:
        # on the values' bits: two passes (count, then fill) so that the outputs are allocated
        # at their final size; the plane (0.4 MB for conv5_4) is still in cache for the second
        half = plane.dtype == np.float16
        bits_type = np.uint16 if half else np.uint32
        bits = np.ascontiguousarray(plane).view(bits_type)
        mask = bits_type(0x7FFF if half else 0x7FFFFFFF)  # all but the sign bit
        indptr = np.empty(h * w + 1, np.int32)
        nnz = kernels.count_rows(bits, mask, indptr)
        indices = np.empty(nnz, np.uint16)
        values = np.empty(nnz, bits_type)
        kernels.fill_rows(bits, mask, indptr, indices, values)
        values = values.view(plane.dtype)
    else:
        rows = np.ascontiguousarray(plane.T)
        flat = np.flatnonzero(rows)
        values = rows.ravel()[flat]
        position, channel = np.divmod(flat, c)
        indices = channel.astype(np.uint16)
        indptr = np.zeros(h * w + 1, np.int32)
        np.cumsum(np.bincount(position, minlength=h * w), out=indptr[1:])
    return SparseActivation((c, h, w), indptr, indices, values)
