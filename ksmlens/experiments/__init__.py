"""The kernel's own behaviour against the lens: :mod:`~ksmlens.experiments.check`
(sysfs and ksm_stat), :mod:`~ksmlens.experiments.verify` (migration, reclaim,
SmartScan), :mod:`~ksmlens.experiments.watch` (time),
:mod:`~ksmlens.experiments.selftests` (the kernel's own KSM tests)."""
