"""ksmlens: see Linux KSM's stable tree, rmap_items and rmap walks, live.

The sub-packages are the layers, lowest first; a layer imports only from
layers below it (``tests/test_layers.py`` holds the direction):

* :mod:`ksmlens.kernel`      KSM's kernel rules: constants, pure decoders,
                             the kernel variants, x86-64 page tables, interval trees
* :mod:`ksmlens.lens`        the drgn walk into plain data (:class:`~ksmlens.lens.model.Snapshot`)
* :mod:`ksmlens.analysis`    pure computation on a snapshot: rmap walk replay, SmartScan
* :mod:`ksmlens.lab`         build, boot and drive lab VMs; attach drgn (never imports the lens)
* :mod:`ksmlens.experiments` the kernel's own behaviour against the lens: check, verify, watch
* :mod:`ksmlens.views`       tables, plots, widgets, ``%ksm`` in drgn, notebooks
* :mod:`ksmlens.cli`         the ``ksmlens`` command
"""

__version__ = "0.2.0"
