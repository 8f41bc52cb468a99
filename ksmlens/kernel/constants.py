"""Every KSM-related kernel constant ksmlens uses, named once, grouped by
the kernel file that defines it (``#define``s are not in DWARF), in the
manner of the kernel's ``scripts/gdb/linux/constants.py.in``.

x86-64 page size and page-table bits, and the platform check, live in
:mod:`ksmlens.kernel.pgtable` (the one architecture ksmlens decodes); sysfs counter and knob names in
:mod:`ksmlens.kernel.sysfs`. Struct layouts are never written here: they
come from the kernel's DWARF (:mod:`ksmlens.lens.layout`).
"""

__all__ = [
    "SEQNR_MASK", "UNSTABLE_FLAG", "STABLE_FLAG", "STABLE_NODE_CHAIN", "U8_MAX",
    "PAGE_MAPPING_ANON", "PAGE_MAPPING_MOVABLE", "PAGE_MAPPING_KSM", "PAGE_MAPPING_FLAGS",
    "VM_GROWSDOWN", "VM_MERGEABLE", "ULONG_MAX", "STORED_INDEX_MEMBERS",
    "BUS_MCEERR_AR", "BUS_MCEERR_AO", "PF_MCE_PROCESS", "PF_MCE_EARLY", "mce_early_kill",
]

# ---- mm/ksm.c
SEQNR_MASK = 0x0FF          # rmap_item->address: low bits of the unstable tree seqnr
UNSTABLE_FLAG = 0x100       # rmap_item->address: is a node of the unstable tree
STABLE_FLAG = 0x200         # rmap_item->address: is listed from the stable tree
STABLE_NODE_CHAIN = -1024   # stable_node->rmap_hlist_len of a chain head
U8_MAX = 255                # SmartScan's age saturates here (include/linux/limits.h)
# The member of struct ksm_rmap_item that stores the page index rmap_walk_ksm()
# searches, under every name it was posted with (newest first); the walk
# detects whichever the kernel's DWARF has (ksmlens.lens.layout) and records it
# as kernel.stored_index_member (the JSON field stays `stored_pgoff`):
STORED_INDEX_MEMBERS = (
    # "[PATCH v8 1/3] ksm: add linear_page_index into ksm_rmap_item", xu xin,
    # 2026-06-09 (https://lkml.iu.edu/2606.1/03138.html), merged for v7.3
    # (mm-stable 2026-08-18); the lab's v8 kernel. (v5-v7 are not in the
    # stored public pages: whether the name is older than v8 is not known here.)
    "linear_page_index",
    # "[PATCH v4 3/5] ksm: add vm_pgoff into ksm_rmap_item", xu xin, 2026-05-03
    # (https://lkml.iu.edu/2605.0/01823.html).
    "vm_pgoff",
    # David Hildenbrand's diff in the v3 review, "Re: [PATCH v3 2/2] ksm:
    # Optimize rmap_walk_ksm by passing a suitable address range", 2026-04-09
    # (the seed mail; https://lkml.iu.edu/2604.1/02806.html); the lab's union kernel.
    "pgoff",
)

# ---- include/linux/page-flags.h (before the folio->mapping flag rename)
PAGE_MAPPING_ANON = 0x1
PAGE_MAPPING_MOVABLE = 0x2
PAGE_MAPPING_KSM = PAGE_MAPPING_ANON | PAGE_MAPPING_MOVABLE
PAGE_MAPPING_FLAGS = PAGE_MAPPING_ANON | PAGE_MAPPING_MOVABLE

# ---- include/linux/mm.h
VM_GROWSDOWN = 0x00000100
VM_MERGEABLE = 1 << 31      # KSM may merge identical pages (madvise/prctl)

# ---- include/linux/limits.h
ULONG_MAX = (1 << 64) - 1

# ---- include/linux/sched.h: task_struct->flags, the memory-failure kill policy
# a thread set with prctl(PR_MCE_KILL) (kernel/sys.c); without PF_MCE_PROCESS
# the sysctl vm.memory_failure_early_kill decides
PF_MCE_PROCESS = 0x00000080     # the thread has its own policy
PF_MCE_EARLY = 0x08000000       # ... and it is "early kill"


def mce_early_kill(thread_flags, sysctl_early_kill: int) -> bool:
    """Whether a process whose threads have ``thread_flags`` (each
    ``task_struct->flags``) is an early-kill process: mm/memory-failure.c
    ``find_early_kill_thread()`` finds a thread with PF_MCE_PROCESS and
    PF_MCE_EARLY, or one without PF_MCE_PROCESS while the sysctl is set."""
    return any((f & PF_MCE_PROCESS and f & PF_MCE_EARLY)
               or (not f & PF_MCE_PROCESS and sysctl_early_kill) for f in thread_flags)


# ---- include/uapi/asm-generic/siginfo.h: si_code of a memory-failure SIGBUS
BUS_MCEERR_AR = 4       # action required: the task that touched (here: poisoned) the page
BUS_MCEERR_AO = 5       # action optional: an "early kill" task that maps it
