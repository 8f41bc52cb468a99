"""ksmlens: see Linux KSM's stable tree, rmap_items and rmap walks, live.

Packages and modules, one home per concept:

* :mod:`ksmlens.kbuild`    build the lab's patched 6.12 kernel variants
* :mod:`ksmlens.vm`        boot and drive a lab VM (QEMU via virtme-ng)
* :mod:`ksmlens.scenarios` workloads that put KSM in a known state
* :mod:`ksmlens.cli`       the ``ksmlens`` command
"""

__version__ = "0.1.0"
