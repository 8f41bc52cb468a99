"""The lab: build kernel variants (:mod:`~ksmlens.lab.kbuild`), boot and
drive VMs (:mod:`~ksmlens.lab.vm`), KSM's sysfs from the guest
(:mod:`~ksmlens.lab.ksmsys`), scenario workloads
(:mod:`~ksmlens.lab.scenarios`), attach drgn (:mod:`~ksmlens.lab.attach`).
Never imports the lens: it only puts kernels into states."""
