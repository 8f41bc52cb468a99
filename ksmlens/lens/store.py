"""Snapshot files: JSON (the contract) and the columnar form (Parquet).

``save(snap, path)`` writes JSON when ``path`` ends in ``.json``, else the
columnar form: one zip archive (stored, not deflated) holding
``snapshot.json`` (schema, kernel, counters, scan, meta) and one Parquet
table (zstd) per DataFrame: ``rmap_items``, ``stable_nodes``, ``mm_slots``,
``mappings``, ``orphans``, ``avcs`` (the recorded anon_vma tree nodes).
``load(path)`` tells the two apart by their first bytes.

JSON is written from the tables a chunk of rows at a time (orjson encodes
each chunk; no Python object per row outlives its chunk), with
the field names of schema 3 (``walk``, ``found`` and ``unmappable_under``
nested; ``items``, ``dups`` and ``mappings`` inside each node), so scripts
written against the JSON keep working.
"""

from __future__ import annotations

import io
import json
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd

from ksmlens.errors import KsmlensError
from ksmlens.kernel.rules import RULES
from ksmlens.lens.model import (ITEM_COLUMNS, MAPPING_COLUMNS, NODE_COLUMNS, ORPHAN_COLUMNS,
                                SCHEMA, SLOT_COLUMNS, KernelInfo, MmSlot, Snapshot,
                                column_values, table)

__all__ = ["save", "load", "to_dict", "from_dict", "FORMATS"]

FORMATS = ("json", "columnar")
_CHUNK = 20_000
_AVC_COLUMNS = {"anon_vma": "str", "root": "str", "leftmost": "str", "avc": "str",
                "vma": "str", "mm": "str", "vm_start": "UInt64", "vm_end": "UInt64",
                "vm_pgoff": "UInt64", "left": "str", "right": "str", "parent": "str",
                "subtree_last": "UInt64"}
_TABLES = {"rmap_items": ITEM_COLUMNS, "stable_nodes": NODE_COLUMNS, "mm_slots": SLOT_COLUMNS,
           "mappings": MAPPING_COLUMNS, "orphans": ORPHAN_COLUMNS}


def _header(snap: Snapshot) -> dict:
    import dataclasses
    return {"schema": snap.schema, "kernel": dataclasses.asdict(snap.kernel),
            "counters": snap.counters, "scan": snap.scan, "meta": snap.meta}


def save(snap: Snapshot, path) -> str:
    """Write ``snap`` to ``path``: JSON for ``*.json``, else columnar.
    Returns ``"json"`` or ``"columnar"``."""
    path = Path(path)
    if path.suffix.lower() == ".json":
        with open(path, "wb") as f:
            write_json(snap, f)
        return "json"
    write_columnar(snap, path)
    return "columnar"


# ------------------------------------------------------------------ JSON

def _rows(df: pd.DataFrame, start: int, stop: int) -> tuple[list, list]:
    part = df.iloc[start:stop]
    names = list(df.columns)
    return names, [column_values(part, c) for c in names]


def _item_dicts(df, start, stop):
    names, cols = _rows(df, start, stop)
    walks = [cols[names.index(f"walk_{r}")] for r in RULES]
    keep = [k for k, n in enumerate(names) if not n.startswith("walk_")]
    keep_names = [names[k] for k in keep] + ["walk"]
    walk = [None if w == (None, None, None) else dict(zip(RULES, w)) for w in zip(*walks)]
    return [dict(zip(keep_names, row)) for row in zip(*(cols[k] for k in keep), walk)]


def _dumps(o) -> bytes:
    import orjson
    return orjson.dumps(o, default=_json_default,
                        option=orjson.OPT_SERIALIZE_NUMPY | orjson.OPT_NON_STR_KEYS)


def _write_list(w, key: str, chunks) -> None:
    w(f',\n "{key}": ['.encode())
    first = True
    for chunk in chunks:
        if not chunk:
            continue
        if not first:
            w(b",\n")
        w(memoryview(_dumps(chunk))[1:-1])
        first = False
    w(b"]")


def _json_default(o):
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.bool_,)):
        return bool(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    raise TypeError(f"{type(o).__name__} is not JSON serialisable")


class _ByNode:
    """Rows of ``df`` grouped by the stable node in ``key``, in the order of
    the node table ``ids`` (then ``order``, then table order), so that the
    rows of nodes ``[a, b)`` are one slice: :meth:`rows` (a chunk at a time,
    no Python object per row outside it)."""

    def __init__(self, df: pd.DataFrame, key: str, ids: pd.Index, order: str | None = None):
        pos = ids.get_indexer(df[key].astype(object)) if len(df) else np.zeros(0, np.int64)
        keep = np.flatnonzero(pos >= 0)
        sub = [pos[keep]]
        if order is not None:
            sub.insert(0, df[order].to_numpy(dtype=np.int64, na_value=1 << 40)[keep])
        o = keep[np.lexsort(sub)] if keep.size else keep
        self.df, self.rows_at, self.pos = df, o, pos[o]

    def rows(self, a: int, b: int):
        """``(node position of each row, the rows as a DataFrame)`` for nodes
        ``[a, b)``."""
        i, j = np.searchsorted(self.pos, [a, b])
        return self.pos[i:j], self.df.iloc[self.rows_at[i:j]]


def _split(pos: np.ndarray, values: list, a: int, b: int) -> list[list]:
    """``values`` (one per row, rows sorted by ``pos``) as a list per node
    position ``a .. b - 1``."""
    cut = np.searchsorted(pos, np.arange(a, b + 1)).tolist()
    return [values[cut[k]:cut[k + 1]] for k in range(b - a)]


def _node_chunks(snap: Snapshot):
    """The ``stable_nodes`` of the JSON contract, :data:`_CHUNK` nodes at a
    time, from the tables: what :meth:`Snapshot.nodes` gives (the fields of
    :class:`~ksmlens.lens.model.StableNode` in order; ``items`` in hlist
    order, a chain's its dups), built per chunk only."""
    import dataclasses
    from ksmlens.lens.model import NODE_DERIVED, StableNode, mapping_dicts
    df = snap.stable_nodes
    if not len(df):
        return
    fields = [x.name for x in dataclasses.fields(StableNode)]
    base = [n for n in fields if n not in NODE_DERIVED]
    ids = pd.Index(df["id"].astype(object))
    items = _ByNode(snap.rmap_items, "stable_node", ids, order="hlist_pos")
    dups = _ByNode(df[df["kind"] == "dup"], "chain", ids)
    maps = _ByNode(snap.mappings, "node", ids)
    orph = _ByNode(snap.orphans, "node", ids)
    unm_cols = [f"unmappable_{r}" for r in RULES]
    for a in range(0, len(df), _CHUNK):
        b = min(len(df), a + _CHUNK)
        part = df.iloc[a:b]
        cols = {n: column_values(part, n) for n in base}
        p, rows = items.rows(a, b)
        it = _split(p, column_values(rows, "id"), a, b)
        p, rows = dups.rows(a, b)
        du = _split(p, column_values(rows, "id"), a, b)
        p, rows = maps.rows(a, b)
        mp = _split(p, mapping_dicts(rows), a, b)
        p, rows = orph.rows(a, b)
        oc = {c: column_values(rows, c) for c in ("pid", "comm", "mm", "address")}
        op = _split(p, [{c: oc[c][k] for c in oc} for k in range(len(rows))], a, b)
        unm = [part[c].to_numpy(dtype=bool).tolist() for c in unm_cols]
        derived = {"dups": du, "mappings": mp, "orphan_mappings": op,
                   "unmappable_under": [[r for r, u in zip(RULES, us) if u]
                                        for us in zip(*unm)]}
        kinds = cols["kind"]
        derived["items"] = [list(du[k]) if kinds[k] == "chain" else it[k]
                            for k in range(b - a)]
        derived["dups"] = [du[k] if kinds[k] == "chain" else [] for k in range(b - a)]
        srcs = [cols[n] if n in cols else derived[n] for n in fields]
        yield [dict(zip(fields, row)) for row in zip(*srcs)]


def write_json(snap: Snapshot, f) -> None:
    """Stream the JSON contract of ``snap`` to ``f`` (a binary file, or a
    text one such as ``io.StringIO``): from the tables, a chunk of rows at a
    time (each chunk's dicts encoded by orjson, then dropped)."""
    import dataclasses
    if isinstance(f, io.TextIOBase):
        def w(b):
            f.write(bytes(b).decode())
    else:
        w = f.write
    head = _header(snap)
    w(("{" + json.dumps(head, default=_json_default)[1:-1]).encode())
    _write_list(w, "stable_nodes", _node_chunks(snap))
    df = snap.rmap_items
    _write_list(w, "rmap_items", (_item_dicts(df, k, k + _CHUNK)
                                  for k in range(0, len(df), _CHUNK)))
    slots = snap.slots()
    # MmSlot holds plain values and lists of them: no deep copy (asdict) needed
    names = [x.name for x in dataclasses.fields(MmSlot)]
    _write_list(w, "mm_slots", [[{n: getattr(s, n) for n in names} for s in slots]])
    w(b',\n "anon_vmas": ' + _dumps(snap.anon_vmas) + b"}\n")


def to_dict(snap: Snapshot) -> dict:
    buf = io.StringIO()
    write_json(snap, buf)
    return json.loads(buf.getvalue())


def _check_schema(schema) -> None:
    if schema != SCHEMA:
        raise KsmlensError(f"snapshot schema {schema!r} is not {SCHEMA!r}",
                           "take the snapshot again with this ksmlens version")


def from_dict(d: dict) -> Snapshot:
    """A :class:`Snapshot` from the JSON contract (a parsed file)."""
    from ksmlens.lens.model import MmSlot, RmapItem, StableNode
    _check_schema(d.get("schema"))
    try:
        return Snapshot(KernelInfo(**d["kernel"]), d["counters"],
                        stable_nodes=[StableNode(**n) for n in d["stable_nodes"]],
                        rmap_items=[RmapItem(**i) for i in d["rmap_items"]],
                        mm_slots=[MmSlot(**m) for m in d["mm_slots"]],
                        scan=d.get("scan", {}), meta=d.get("meta", {}),
                        anon_vmas=d.get("anon_vmas", {}), schema=d["schema"])
    except (KeyError, TypeError) as e:
        raise KsmlensError(f"snapshot file is malformed ({e})",
                           "was it written by ksmlens?") from None


# ------------------------------------------------------------------ columnar

def _avc_table(anon_vmas: dict) -> pd.DataFrame:
    rows = {c: [] for c in _AVC_COLUMNS}
    for av, rec in anon_vmas.items():
        nodes = rec.get("nodes") or {}
        # an anon_vma with an empty tree still gets a row (avc None)
        for avc, n in (nodes.items() if nodes else [(None, {})]):
            rows["anon_vma"].append(av)
            rows["root"].append(rec.get("root"))
            rows["leftmost"].append(rec.get("leftmost"))
            rows["avc"].append(avc)
            for c in ("vma", "mm", "vm_start", "vm_end", "vm_pgoff", "left", "right",
                      "parent", "subtree_last"):
                rows[c].append(n.get(c))
    return table(rows, _AVC_COLUMNS)


def _anon_vmas(df: pd.DataFrame) -> dict:
    out: dict = {}
    cols = {c: column_values(df, c) for c in df.columns}
    for k in range(len(df)):
        r = {c: v[k] for c, v in cols.items()}
        rec = out.setdefault(r["anon_vma"], {"root": r["root"], "leftmost": r["leftmost"],
                                             "nodes": {}})
        if r["avc"] is not None:
            rec["nodes"][r["avc"]] = {c: r[c] for c in (
                "vma", "mm", "vm_start", "vm_end", "vm_pgoff", "left", "right", "parent",
                "subtree_last")}
    return out


def write_columnar(snap: Snapshot, path) -> None:
    """The columnar form: a zip of ``snapshot.json`` and Parquet tables."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    tables = {"rmap_items": snap.rmap_items, "stable_nodes": snap.stable_nodes,
              "mm_slots": snap.mm_slots, "mappings": snap.mappings, "orphans": snap.orphans,
              "avcs": _avc_table(snap.anon_vmas)}
    tmp = Path(str(path) + ".tmp")
    with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED) as z:
        z.writestr("snapshot.json", json.dumps(dict(_header(snap), format="columnar"),
                                               default=_json_default))
        for name, df in tables.items():
            buf = io.BytesIO()
            pq.write_table(pa.Table.from_pandas(df, preserve_index=False), buf,
                           compression="zstd")
            z.writestr(f"{name}.parquet", buf.getvalue())
    tmp.replace(path)


def read_columnar(path) -> Snapshot:
    import pyarrow.parquet as pq
    with zipfile.ZipFile(path) as z:
        head = json.loads(z.read("snapshot.json"))
        _check_schema(head.get("schema"))
        t = {}
        for name in list(_TABLES) + ["avcs"]:
            df = pq.read_table(io.BytesIO(z.read(f"{name}.parquet"))).to_pandas()
            cols = _TABLES.get(name, _AVC_COLUMNS)
            t[name] = table({c: df[c] for c in df.columns if c in cols}, cols)
    return Snapshot(KernelInfo(**head["kernel"]), head["counters"], t["stable_nodes"],
                    t["rmap_items"], t["mm_slots"], scan=head.get("scan", {}),
                    meta=head.get("meta", {}), anon_vmas=_anon_vmas(t["avcs"]),
                    mappings=t["mappings"], orphans=t["orphans"], schema=head["schema"])


def load(path) -> Snapshot:
    """Read a snapshot of either format (see the module doc)."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            magic = f.read(2)
    except FileNotFoundError:
        raise KsmlensError(f"no snapshot file {path}", "") from None
    except IsADirectoryError:
        raise KsmlensError(f"{path} is a directory, not a snapshot file",
                           "a watch timeline is read with Timeline.load()") from None
    if magic == b"PK":
        try:
            return read_columnar(path)
        except (zipfile.BadZipFile, KeyError) as e:
            raise KsmlensError(f"{path} is not a ksmlens columnar snapshot ({e})", "") from None
    import orjson
    try:
        d = orjson.loads(path.read_bytes())
    except ValueError as e:     # orjson.JSONDecodeError is one
        raise KsmlensError(f"{path} is neither JSON nor a columnar snapshot ({e})", "") \
            from None
    return from_dict(d)
