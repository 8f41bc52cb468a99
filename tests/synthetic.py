"""Synthetic drgn kernel programs for fast unit tests of :mod:`ksmlens.lens.helpers`.

A :class:`SyntheticKernel` is a drgn ``Program`` that drgn treats as a Linux
kernel (``vmcoreinfo`` + ``set_linux_kernel_custom``), with the DWARF types
and symbols of a real lab ``vmlinux`` but no guest behind it: its memory is
two bytearrays laid out by the test,

* the kernel data area, covering the mm/ksm.c globals at their ``vmlinux``
  symbol addresses (KERNELOFFSET=0, so no relocation), and
* a fake heap at made-up direct-map addresses, from which :meth:`allocate`
  hands out objects (``struct ksm_stable_node``, ``struct ksm_rmap_item``...).

Every field is written through the DWARF types (member offsets and sizes come
from drgn, never from hard-coded numbers), and helpers link kernel lists,
hlists and rbtrees the way ``include/linux/{list,rbtree}.h`` leave them.

Loading the debug info costs about half a second, so one
``SyntheticKernel`` is meant to be shared and :meth:`SyntheticKernel.reset`
between tests.
"""

from __future__ import annotations

import contextlib
import glob
import json
import mmap
import os
import re
from pathlib import Path
from typing import Iterable, Iterator, Optional, Sequence, Union

import drgn
from drgn import Object, Program, Type, TypeKind

from ksmlens.lens.helpers import STABLE_NODE_CHAIN

HEAP_BASE = 0xFFFF888000100000   # in the x86-64 direct map
HEAP_SIZE = 4 << 20
ALIGN = 64

# Kernel globals the data segment must cover (mm/ksm.c; missing ones are
# skipped, so another 6.12 variant's vmlinux works too).
KSM_GLOBALS = (
    "ksm_mm_head", "ksm_scan", "migrate_nodes", "root_stable_tree",
    "root_unstable_tree", "one_stable_tree", "one_unstable_tree", "ksm_nr_node_ids",
    "ksm_pages_shared", "ksm_pages_sharing", "ksm_pages_unshared", "ksm_pages_scanned",
    "ksm_pages_skipped", "ksm_stable_node_chains", "ksm_stable_node_dups",
    "ksm_rmap_items", "ksm_zero_pages", "ksm_run", "ksm_thread_pages_to_scan",
    "ksm_thread_sleep_millisecs", "ksm_max_page_sharing", "ksm_merge_across_nodes",
    "ksm_use_zero_pages", "ksm_smart_scan", "ksm_stable_node_chains_prune_millisecs",
)

RB_RED = 0
RB_BLACK = 1

TypeLike = Union[str, Type]


# ------------------------------------------------------------------ finding a vmlinux

def find_vmlinux() -> Optional[tuple[Path, str]]:
    """``(vmlinux, release)`` of a built lab kernel, preferring ``stock``.

    First the current stock build (``kbuild.find_kernel("stock")``), then any
    cached ``<cache>/kernels/*/vmlinux`` (the ksmlens cache root, and
    ``~/.cache/ksmlens``; stock ones first; not ``*.tmp`` builds in progress).
    None if there is no kernel at all.
    """
    try:
        import ksmlens.lab.kbuild as kbuild
        k = kbuild.find_kernel("stock")
    except Exception:
        k = None
    if k is not None and Path(k.vmlinux).is_file():
        return Path(k.vmlinux), k.release
    dirs = [os.path.expanduser("~/.cache/ksmlens/kernels")]
    try:
        import ksmlens.lab.paths as paths
        dirs.insert(0, str(paths.cache_root() / "kernels"))    # KSMLENS_CACHE, XDG_CACHE_HOME
    except Exception:
        pass
    candidates = {p for d in dirs for p in glob.glob(os.path.join(glob.escape(d), "*", "vmlinux"))
                  if not Path(p).parent.name.endswith(".tmp")}     # a build in progress
    found = sorted(candidates, key=lambda p: (not Path(p).parent.name.startswith("stock-"), p))
    for p in found:
        path = Path(p)
        release = _release_of(path)
        if release:
            return path, release
    return None


def _release_of(vmlinux: Path) -> Optional[str]:
    """The kernel release a vmlinux was built as (drgn refuses a vmlinux whose
    release differs from VMCOREINFO's OSRELEASE)."""
    meta = vmlinux.parent / "meta.json"
    if meta.is_file():
        try:
            return json.loads(meta.read_text())["release"]
        except (ValueError, KeyError):
            pass
    with open(vmlinux, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
        i = m.find(b"Linux version ")
        if i < 0:
            return None
        rest = m[i + len(b"Linux version "):i + 200]
        return rest.split(b" ", 1)[0].decode()


def variant_of(release: str) -> str:
    """``6.12.117-ksmlens-stock`` -> ``stock``."""
    return release.rsplit("-", 1)[-1]


def _vmcoreinfo(release: str, swapper_pg_dir: int) -> str:
    return (f"OSRELEASE={release}\n"
            "PAGESIZE=4096\n"
            "KERNELOFFSET=0\n"
            f"SYMBOL(swapper_pg_dir)={swapper_pg_dir:x}\n")


def _kernel_program(vmlinux: Path, vmcoreinfo: str) -> Program:
    # Program(vmcoreinfo=...) alone leaves flags empty, and load_debug_info()
    # then ignores the vmlinux; set_linux_kernel_custom() makes it a kernel.
    prog = Program(drgn.host_platform, vmcoreinfo=vmcoreinfo)
    prog.set_linux_kernel_custom(vmcoreinfo, False)
    prog.load_debug_info([str(vmlinux)])
    return prog


def _swapper_pg_dir(vmlinux: Path, release: str) -> int:
    # A throwaway program with a dummy swapper_pg_dir, only to read the symbol
    # table. On x86-64 "swapper_pg_dir" is a #define for init_top_pgt, which
    # is what the kernel's VMCOREINFO_SYMBOL(swapper_pg_dir) reports.
    tmp = _kernel_program(vmlinux, _vmcoreinfo(release, 0xFFFFFFFF82000000))
    for name in ("swapper_pg_dir", "init_top_pgt"):
        try:
            return tmp.symbol(name).address
        except LookupError:
            continue
    raise LookupError(f"{vmlinux}: neither swapper_pg_dir nor init_top_pgt in the symbol table")


# ------------------------------------------------------------------ the builder

class _Segment:
    def __init__(self, base: int, size: int, name: str):
        self.base = base
        self.size = size
        self.name = name
        self.buf = bytearray(size)

    def contains(self, address: int, size: int = 1) -> bool:
        return self.base <= address and address + size <= self.base + self.size


class SyntheticKernel:
    """A drgn kernel program over fake memory; see the module docstring."""

    def __init__(self, vmlinux: Union[str, Path], release: str, *,
                 heap_base: int = HEAP_BASE, heap_size: int = HEAP_SIZE,
                 globals_: Iterable[str] = KSM_GLOBALS):
        self.vmlinux = Path(vmlinux)
        self.release = release
        self.swapper_pg_dir = _swapper_pg_dir(self.vmlinux, release)
        self.prog = _kernel_program(self.vmlinux, _vmcoreinfo(release, self.swapper_pg_dir))
        self.reads: Optional[list[tuple[int, int]]] = None

        spans = []
        for name in globals_:
            try:
                sym = self.prog.symbol(name)
            except LookupError:
                continue
            spans.append((sym.address, sym.address + max(sym.size, 1)))
        if not spans:
            raise LookupError(f"{self.vmlinux}: no KSM globals in the symbol table")
        lo = min(a for a, _ in spans) & ~0xFFF
        hi = (max(b for _, b in spans) + 0xFFF) & ~0xFFF
        self.data = _Segment(lo, hi - lo, "kernel data")
        self.heap = _Segment(heap_base, heap_size, "heap")
        self.segments = [self.data, self.heap]
        self._next = heap_base
        self._pid_node = 0
        for seg in self.segments:
            self.prog.add_memory_segment(seg.base, seg.size, self._reader(seg), False)

    def add_globals(self, names: Iterable[str]) -> None:
        """Back more kernel globals with (zeroed) memory: one segment per
        symbol not already covered, whole pages around it."""
        for name in names:
            sym = self.prog.symbol(name)
            if any(seg.contains(sym.address, max(sym.size, 1)) for seg in self.segments):
                continue
            lo = sym.address & ~0xFFF
            hi = (sym.address + max(sym.size, 1) + 0xFFF) & ~0xFFF
            if any(lo < seg.base + seg.size and seg.base < hi for seg in self.segments):
                raise ValueError(f"{name}: its pages overlap another synthetic segment")
            seg = _Segment(lo, hi - lo, name)
            self.segments.append(seg)
            self.prog.add_memory_segment(seg.base, seg.size, self._reader(seg), False)

    # -- memory

    def _reader(self, seg: _Segment):
        def read(address: int, count: int, offset: int, physical: bool) -> bytes:
            if self.reads is not None:
                self.reads.append((address, count))
            return bytes(seg.buf[offset:offset + count])
        return read

    def reset(self) -> None:
        """Zero all memory and free every allocation (keeps the Program)."""
        for seg in self.segments:
            seg.buf[:] = bytes(seg.size)
        self._next = self.heap.base
        self._pid_node = 0
        self.reads = None

    def _segment(self, address: int, size: int) -> _Segment:
        for seg in self.segments:
            if seg.contains(address, size):
                return seg
        raise ValueError(f"{address:#x}+{size} is outside the synthetic memory")

    def write(self, address: int, data: bytes) -> None:
        seg = self._segment(address, len(data))
        off = address - seg.base
        seg.buf[off:off + len(data)] = data

    @contextlib.contextmanager
    def record_reads(self) -> Iterator[list[tuple[int, int]]]:
        """Log every ``(address, count)`` drgn reads inside the block."""
        self.reads = log = []
        try:
            yield log
        finally:
            self.reads = None

    # -- types and objects

    def type(self, t: TypeLike) -> Type:
        return self.prog.type(t) if isinstance(t, str) else t

    def sizeof(self, t: TypeLike) -> int:
        return self.type(t).size

    def offsetof(self, t: TypeLike, member: str) -> int:
        return drgn.offsetof(self.type(t), member)

    def allocate(self, type_name: TypeLike, count: int = 1, align: int = ALIGN) -> int:
        """Zeroed room for ``count`` objects of a type on the heap; its address."""
        size = self.sizeof(type_name) * count
        address = (self._next + align - 1) & ~(align - 1)
        if address + size > self.heap.base + self.heap.size:
            raise MemoryError("synthetic heap exhausted")
        self._next = address + size
        return address

    def obj(self, address: int, type_name: TypeLike) -> Object:
        """``(type *)address``."""
        return Object(self.prog, self.prog.pointer_type(self.type(type_name)), address)

    def sym(self, name: str) -> int:
        """Address of a kernel global."""
        return self.prog[name].address_

    def _member(self, address: int, type_name: TypeLike, member_path: str) -> Object:
        o = Object(self.prog, self.type(type_name), address=address)
        for name, index in re.findall(r"([A-Za-z_]\w*)|\[(\d+)\]", member_path):
            o = o.member_(name) if name else o[int(index)]
        return o

    def addr(self, address: int, type_name: TypeLike, member_path: str) -> int:
        """``&((type *)address)->member_path``."""
        off = self.offsetof(type_name, member_path)
        assert off == self._member(address, type_name, member_path).address_ - address
        return address + off

    def set(self, address: int, type_name: TypeLike, member_path: str, value: int) -> None:
        """``((type *)address)->member_path = value`` (integer, bool or pointer
        member; ``member_path`` like ``"slot.mm_node.next"`` or ``"a[1].b"``)."""
        m = self._member(address, type_name, member_path)
        t = m.type_.unaliased()
        if t.kind == TypeKind.STRUCT and len(t.members) == 1:   # atomic_t & co.
            m = m.member_(t.members[0].name)
            t = m.type_.unaliased()
        if t.kind not in (TypeKind.INT, TypeKind.BOOL, TypeKind.POINTER, TypeKind.ENUM):
            raise TypeError(f"{member_path}: cannot assign an integer to {m.type_}")
        if m.bit_field_size_ is not None:
            raise TypeError(f"{member_path}: bit fields are not supported")
        bits = 8 * t.size
        value = int(value)
        if not -(1 << (bits - 1)) <= value < (1 << bits):
            raise ValueError(f"{member_path}: {value:#x} does not fit in {m.type_}")
        self.write(m.address_, Object(self.prog, m.type_, value).to_bytes_())

    def set_global(self, name: str, member_path: Optional[str], value: int) -> None:
        """``name.member_path = value`` (or ``name = value``) for a kernel global."""
        var = self.prog[name]
        self.set(var.address_, var.type_, member_path or "", value)

    def get(self, address: int, type_name: TypeLike, member_path: str) -> int:
        """Read back a field (through drgn)."""
        return self._member(address, type_name, member_path).value_()

    # -- include/linux/list.h

    def list_init(self, head: int) -> None:
        """INIT_LIST_HEAD(head): ``head`` is the address of a struct list_head."""
        self.set(head, "struct list_head", "next", head)
        self.set(head, "struct list_head", "prev", head)

    def list_add_tail(self, entry: int, head: int) -> None:
        """list_add_tail(entry, head) on an initialised list."""
        lh = "struct list_head"
        prev = self.get(head, lh, "prev")
        self.set(entry, lh, "next", head)
        self.set(entry, lh, "prev", prev)
        self.set(prev, lh, "next", entry)
        self.set(head, lh, "prev", entry)

    def hlist_add_head(self, node: int, head: int) -> None:
        """hlist_add_head(node, head): ``head`` is a struct hlist_head address."""
        hn = "struct hlist_node"
        first = self.get(head, "struct hlist_head", "first")
        self.set(node, hn, "next", first)
        if first:
            self.set(first, hn, "pprev", self.addr(node, hn, "next"))
        self.set(head, "struct hlist_head", "first", node)
        self.set(node, hn, "pprev", self.addr(head, "struct hlist_head", "first"))

    # -- include/linux/rbtree.h

    def rb_build(self, root: int, nodes: Sequence[int], *, cached: bool = False) -> dict:
        """Link ``nodes`` (struct rb_node addresses, already in key order) as a
        balanced red-black tree under ``root`` (a struct rb_root, or with
        ``cached`` a struct rb_root_cached, whose rb_leftmost is set too).

        Every leaf ends on the last two levels, so colouring the deepest level
        red and the rest black is valid. Returns ``{node: (parent, left,
        right)}`` (0 for none).
        """
        rb = "struct rb_node"
        links: dict[int, tuple[int, int, int]] = {}
        depth: dict[int, int] = {}

        def build(lo: int, hi: int, parent: int, d: int) -> int:
            if lo >= hi:
                return 0
            mid = (lo + hi) // 2
            n = nodes[mid]
            depth[n] = d
            left = build(lo, mid, n, d + 1)
            right = build(mid + 1, hi, n, d + 1)
            links[n] = (parent, left, right)
            return n

        top = build(0, len(nodes), 0, 0)
        deepest = max(depth.values(), default=0)
        for n, (parent, left, right) in links.items():
            colour = RB_RED if depth[n] == deepest and depth[n] > 0 else RB_BLACK
            self.set(n, rb, "__rb_parent_color", parent | colour)
            self.set(n, rb, "rb_left", left)
            self.set(n, rb, "rb_right", right)
        if cached:
            self.set(root, "struct rb_root_cached", "rb_root.rb_node", top)
            self.set(root, "struct rb_root_cached", "rb_leftmost", nodes[0] if nodes else 0)
        else:
            self.set(root, "struct rb_root", "rb_node", top)
        return links


# ------------------------------------------------------------------ KSM layouts

def init_ksm_globals(k: SyntheticKernel) -> None:
    """mm/ksm.c's static initialisers: empty lists, the one-node tree roots."""
    k.list_init(k.addr(k.sym("ksm_mm_head"), "struct ksm_mm_slot", "slot.mm_node"))
    k.list_init(k.sym("migrate_nodes"))
    k.set_global("root_stable_tree", None, k.sym("one_stable_tree"))
    k.set_global("root_unstable_tree", None, k.sym("one_unstable_tree"))
    k.set_global("ksm_nr_node_ids", None, 1)


def stable_node_dup_head(k: SyntheticKernel) -> int:
    """STABLE_NODE_DUP_HEAD: ``(struct list_head *)&migrate_nodes.prev``."""
    return k.addr(k.sym("migrate_nodes"), "struct list_head", "prev")


def add_rmap_items_to_stable_node(k: SyntheticKernel, node: int, addresses: Sequence[int],
                                  mm: int = 0) -> list[int]:
    """stable_tree_append() for each address: new rmap_items with
    STABLE_FLAG, ``head`` = node, hlist_add_head() on ``node->hlist``.
    Returns the items in hlist order (the last added first)."""
    from ksmlens.lens.helpers import STABLE_FLAG
    ri, sn = "struct ksm_rmap_item", "struct ksm_stable_node"
    items = []
    for a in addresses:
        item = k.allocate(ri)
        k.set(item, ri, "address", a | STABLE_FLAG)
        k.set(item, ri, "mm", mm)
        k.set(item, ri, "head", node)
        k.hlist_add_head(k.addr(item, ri, "hlist"), k.addr(node, sn, "hlist"))
        items.append(item)
    k.set(node, sn, "rmap_hlist_len", k.get(node, sn, "rmap_hlist_len") + len(addresses))
    return items[::-1]


# ------------------------------------------------------------------ tasks

def add_task(k: SyntheticKernel, pid: int, comm: str, mm: int) -> int:
    """A thread-group leader ``pid`` (< 64) using ``mm``, findable by drgn's
    ``for_each_task()``: ``struct pid`` at index ``pid`` of ``init_pid_ns.idr``
    (one ``struct xa_node`` of shift 0 under ``xa_head``, include/linux/xarray.h
    ``xa_mk_node()``), its ``tasks[PIDTYPE_PID]`` hlist holding the task's
    ``pid_links[PIDTYPE_PID]`` (kernel/pid.c ``attach_pid()``). Needs
    ``k.add_globals(["init_pid_ns"])``. Returns the task_struct address."""
    ts, xn = "struct task_struct", "struct xa_node"
    chunk = k.type(xn).member("slots").type.length       # XA_CHUNK_SIZE
    if not 0 < pid < chunk:
        raise ValueError(f"pid {pid}: one xa_node holds indices 0..{chunk - 1}")
    ns = k.sym("init_pid_ns")
    if not k._pid_node:
        k._pid_node = k.allocate(xn, align=256)
        k.set(ns, "struct pid_namespace", "idr.idr_rt.xa_head", k._pid_node | 2)
    node = k._pid_node
    k.set(node, xn, "count", k.get(node, xn, "count") + 1)
    task = k.allocate(ts)
    k.set(task, ts, "pid", pid)
    k.set(task, ts, "tgid", pid)
    k.set(task, ts, "mm", mm)
    k.write(k.addr(task, ts, "comm"), comm.encode()[:15] + b"\0")
    spid = k.allocate("struct pid")
    k.set(spid, "struct pid", "numbers[0].nr", pid)
    type_pid = k.prog["PIDTYPE_PID"].value_()
    k.hlist_add_head(k.addr(task, ts, f"pid_links[{type_pid}]"),
                     k.addr(spid, "struct pid", f"tasks[{type_pid}]"))
    k.set(node, xn, f"slots[{pid}]", spid)
    return task


SN = "struct ksm_stable_node"
RI = "struct ksm_rmap_item"
MS = "struct ksm_mm_slot"


# ------------------------------------------------------------------ more builders

def new_stable_node(k: SyntheticKernel, kpfn: int, nid: int = 0) -> int:
    node = k.allocate(SN)
    k.set(node, SN, "kpfn", kpfn)
    k.set(node, SN, "nid", nid)
    return node


def new_chain(k: SyntheticKernel, ndups_items: list[list[int]], kpfn0: int,
              nid: int = 0) -> tuple[int, list[int], list[list[int]]]:
    """A chain head and its dups (each with rmap_items at the given addresses).

    Dups are added with hlist_add_head() as stable_node_chain_add_dup() does,
    so ``for_each_stable_node_dup`` sees them in reverse order of creation.
    Returns (chain, dups in hlist order, items of each dup in that order).
    """
    chain = k.allocate(SN)
    k.set(chain, SN, "rmap_hlist_len", STABLE_NODE_CHAIN)
    k.set(chain, SN, "chain_prune_time", 4242)
    k.set(chain, SN, "nid", nid)
    dups, items = [], []
    for i, item_addrs in enumerate(ndups_items):
        dup = new_stable_node(k, kpfn0 + i, nid)
        k.set(dup, SN, "head", stable_node_dup_head(k))
        k.hlist_add_head(k.addr(dup, SN, "hlist_dup"), k.addr(chain, SN, "hlist"))
        dups.append(dup)
        items.append(add_rmap_items_to_stable_node(k, dup, item_addrs))
    return chain, dups[::-1], items[::-1]


def rb_nodes(k, addresses, type_name_, member="node"):
    return [k.addr(a, type_name_, member) for a in addresses]


def link_rmap_list(k: SyntheticKernel, slot: int, items: list[int]) -> None:
    k.set(slot, MS, "rmap_list", items[0] if items else 0)
    for item, nxt in zip(items, items[1:] + [0]):
        k.set(item, RI, "rmap_list", nxt)


def new_rmap_item(k: SyntheticKernel, address: int, mm: int = 0) -> int:
    item = k.allocate(RI)
    k.set(item, RI, "address", address)
    k.set(item, RI, "mm", mm)
    return item


def new_mm_slot(k: SyntheticKernel, mm: int) -> int:
    slot = k.allocate(MS)
    k.set(slot, MS, "slot.mm", mm)
    k.list_add_tail(k.addr(slot, MS, "slot.mm_node"),
                    k.addr(k.sym("ksm_mm_head"), MS, "slot.mm_node"))
    return slot
