"""KSM's kernel rules, with no drgn program state: every constant and bit
named once (:mod:`~ksmlens.kernel.constants`), pure decoders of them
(:mod:`~ksmlens.kernel.rules`), the rmap walk replayed in bulk
(:mod:`~ksmlens.kernel.rmap_walk`), /sys/kernel/mm/ksm (:mod:`~ksmlens.kernel.sysfs`), the kernel variants
(:mod:`~ksmlens.kernel.variants`), x86-64 page tables
(:mod:`~ksmlens.kernel.pgtable`) and augmented interval trees
(:mod:`~ksmlens.kernel.itree`)."""
