"""The lens: drgn helpers for KSM (:mod:`~ksmlens.lens.helpers`), the fast
walk into plain data (:mod:`~ksmlens.lens.snapshot`) and the data itself
(:mod:`~ksmlens.lens.model`). Imports only :mod:`ksmlens.kernel`."""
