"""What people look at: tables (:mod:`~ksmlens.views.report`), figures
(:mod:`~ksmlens.views.plots`), the Explorer (:mod:`~ksmlens.views.widgets`),
``%ksm`` in drgn (:mod:`~ksmlens.views.drgn_commands`) and the executed
notebooks (:mod:`~ksmlens.views.notebook`)."""
