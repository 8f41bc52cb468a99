"""What the paused walk read, as arrays (:class:`Raw`), and the helpers
that turn kernel values into table columns. Shared by the walk
(:mod:`ksmlens.lens.snapshot`), the tables (:mod:`ksmlens.lens.tables`) and
the replay (:mod:`ksmlens.lens.replay`)."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import pyarrow as pa

from ksmlens.lens.model import NOT_VISITED as model_NOT_VISITED, PTE_KINDS, KernelInfo

__all__ = ["Raw", "hex_ids", "hex_categories", "release_memory", "hx", "masked",
           "PTE_NAMES", "PTE_UNREAD", "NOT_VISITED", "NOT_VISITED_CODE"]


def release_memory() -> None:
    """Give the C heap's free pages back to the system (glibc
    ``malloc_trim(0)``; nothing elsewhere). The walk frees hundreds of MB
    of short-lived numpy arrays between its phases; glibc keeps those
    pages, so without this a million-item snapshot's RSS would hold them
    until exit."""
    global _trim
    if _trim is None:
        try:
            import ctypes
            _trim = ctypes.CDLL("libc.so.6").malloc_trim
        except (OSError, AttributeError):
            _trim = False
    if _trim:
        _trim(0)


_trim = None

_U = np.uint64


def hx(v: int | None) -> str | None:
    return None if not v else f"0x{v:x}"


def hex_ids(a: np.ndarray, valid: np.ndarray | None = None) -> pd.Series:
    """Kernel pointers (uint64) as hex-string ids (``"0xffff..."``, the
    JSON contract's form), None where 0 or not ``valid``; no Python
    object per value (formatted in numpy, stored as Arrow strings)."""
    a = np.asarray(a, dtype=np.uint64)
    n = a.size
    b = a.astype(">u8").view(np.uint8).reshape(n, 8)
    lut = np.frombuffer(b"0123456789abcdef", dtype=np.uint8)
    out = np.empty((n, 18), dtype=np.uint8)
    out[:, 0], out[:, 1] = ord("0"), ord("x")
    out[:, 2::2] = lut[b >> 4]
    out[:, 3::2] = lut[b & 15]
    mask = a == 0 if valid is None else (a == 0) | ~np.asarray(valid, dtype=bool)
    # an Arrow string array straight from the buffers (no per-value objects,
    # no UTF-8 validation: the bytes are hex digits)
    offsets = pa.py_buffer(np.arange(0, 18 * (n + 1), 18, dtype=np.int32))
    validity = pa.py_buffer(np.packbits(~mask, bitorder="little")) if mask.any() else None
    arr = pa.Array.from_buffers(pa.string(), n, [validity, offsets, pa.py_buffer(out)],
                                null_count=int(mask.sum()))
    short = ~mask & (a < _U(1 << 60))          # leading zero nibbles: rare (not kernel pointers)
    if short.any():
        py = arr.to_pylist()
        for k in np.nonzero(short)[0].tolist():
            py[k] = f"0x{int(a[k]):x}"
        arr = pa.array(py, type=pa.string())
    return pd.Series(arr.to_pandas(types_mapper={pa.string(): pd.StringDtype(na_value=np.nan)}
                                   .get), dtype="str")


@dataclass
class Raw:
    """What :func:`walk_paused` read, as arrays: the input of :func:`finish`."""
    kernel: KernelInfo
    counters: dict
    scan: dict
    meta: dict
    items: dict              # column -> array, one per rmap_item
    nodes: dict              # column -> array, one per stable node
    slots: list[dict]
    anon_vmas: dict
    cand: dict | None = None  # rmap_walk_ksm() pairs with their `mapped` answer
    races: dict = field(default_factory=dict)
    # ids: kernel addresses here; a snapshot's own string ids when replaying
    # its tables (replay_tables): name(int) -> id, key(id) -> int, ids(array)
    name: object = hx
    key: object = staticmethod(lambda s: int(s, 16))
    ids: object = None

    def fmt(self, a, valid=None):
        return (self.ids or hex_ids)(a, valid)

    def cat(self, a, valid=None):
        return hex_categories(a, valid, fmt=self.ids or hex_ids)


# pte column codes: the model's PTE_KINDS order
PTE_NAMES = PTE_KINDS
PTE_UNREAD = 0
NOT_VISITED = model_NOT_VISITED
NOT_VISITED_CODE = {n: k for k, n in enumerate(NOT_VISITED)}


_NUMPY_OF = {"Int64": np.int64, "UInt64": np.uint64, "Int32": np.int32, "boolean": np.bool_}


def masked(values, valid, dtype):
    """A nullable pandas array of ``values`` (None where not ``valid``)
    that shares ``values``' memory when its numpy dtype already matches."""
    mask = ~np.asarray(valid, dtype=bool)
    v = np.asarray(values, dtype=_NUMPY_OF[dtype])
    if dtype == "boolean":
        return pd.arrays.BooleanArray(v, mask)
    return pd.arrays.IntegerArray(v, mask)


def hex_categories(a: np.ndarray, valid: np.ndarray | None = None, fmt=None) -> pd.Categorical:
    """Like :func:`hex_ids` for a column with few distinct values (an mm, an
    anon_vma): each distinct pointer formatted once, a code per row."""
    a = np.asarray(a, dtype=np.uint64)
    bad = a == 0 if valid is None else (a == 0) | ~np.asarray(valid, dtype=bool)
    u, inv = np.unique(np.where(bad, _U(0), a), return_inverse=True)
    cats = (fmt or hex_ids)(u)
    keep = u != 0
    remap = np.full(u.size, -1, np.int64)
    remap[keep] = np.arange(int(keep.sum()))
    return pd.Categorical.from_codes(remap[inv.reshape(-1)],
                                     categories=pd.Index(cats[keep].tolist(), dtype="str"))
