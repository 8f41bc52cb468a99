"""The kernel's augmented interval-tree query, once, over any node handles.

A port of ``ITPREFIX_iter_first()`` / ``_iter_next()`` /
``_subtree_search()`` from include/linux/interval_tree_generic.h, the code
behind ``anon_vma_interval_tree_foreach()``. It prunes with the augmented
``rb_subtree_last`` exactly as the kernel does, so a query replayed here
visits the same nodes in the same order as the kernel's.

The tree is reached through a :class:`Tree` adapter, so the same algorithm
runs on live drgn Objects (:func:`ksmlens.lens.helpers.anon_vma_interval_tree_foreach`)
and on trees recorded in a saved snapshot (:mod:`ksmlens.analysis.core`). Node
handles are any hashable value; ``None`` is NULL.
"""

from __future__ import annotations

from typing import Any, Iterator, Optional, Protocol

__all__ = ["Tree", "interval_tree_foreach", "ULONG_MAX"]

ULONG_MAX = (1 << 64) - 1


class Tree(Protocol):
    def left(self, n: Any) -> Optional[Any]: ...
    def right(self, n: Any) -> Optional[Any]: ...
    def parent(self, n: Any) -> Optional[Any]: ...
    def subtree_last(self, n: Any) -> int: ...
    def start(self, n: Any) -> int: ...     # ITSTART: vma->vm_pgoff
    def last(self, n: Any) -> int: ...      # ITLAST: vm_pgoff + vma_pages - 1


def _subtree_search(t: Tree, node, start: int, last: int):
    while True:
        left = t.left(node)
        if left is not None and start <= t.subtree_last(left):
            node = left
            continue
        if t.start(node) <= last:
            if start <= t.last(node):
                return node
            right = t.right(node)
            if right is not None:
                node = right
                if start <= t.subtree_last(node):
                    continue
        return None


def _iter_first(t: Tree, root, leftmost, start: int, last: int):
    if root is None or t.subtree_last(root) < start:
        return None
    if leftmost is not None and t.start(leftmost) > last:
        return None
    return _subtree_search(t, root, start, last)


def _iter_next(t: Tree, node, start: int, last: int):
    rb = t.right(node)
    while True:
        # invariant: start(node) <= last, rb == right(node)
        if rb is not None and start <= t.subtree_last(rb):
            return _subtree_search(t, rb, start, last)
        while True:  # move up until we come from a node's left child
            parent = t.parent(node)
            if parent is None:
                return None
            prev, node = node, parent
            rb = t.right(node)
            if prev != rb:
                break
        if last < t.start(node):
            return None
        if start <= t.last(node):
            return node


def interval_tree_foreach(t: Tree, root, leftmost, start: int, last: int) -> Iterator:
    """Yield each node whose ``[start(n), last(n)]`` meets ``[start, last]``,
    in the kernel's order (``root``: the tree's root node; ``leftmost``: the
    cached leftmost node of the ``rb_root_cached``)."""
    node = _iter_first(t, root, leftmost, start, last)
    while node is not None:
        yield node
        node = _iter_next(t, node, start, last)
