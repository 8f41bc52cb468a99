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

Modules moved in 0.2 (``ksmlens.vm`` is now ``ksmlens.lab.vm`` and so on)
still import from their old names, with a :class:`DeprecationWarning`.
"""

import importlib
import importlib.abc
import importlib.util
import sys
import warnings

__version__ = "0.2.0"

# old module -> new home (0.1 -> 0.2)
_MOVED = {
    "itree": "kernel.itree", "pgtable": "kernel.pgtable",
    "model": "lens.model", "snapshot": "lens.snapshot", "walk": "lens.helpers",
    "midupdate": "lens.midupdate",
    "paths": "lab.paths", "qmp": "lab.qmp", "kbuild": "lab.kbuild", "ksmsys": "lab.ksmsys",
    "vm": "lab.vm", "scenarios": "lab.scenarios", "attach": "lab.attach",
    "check": "experiments.check", "verify": "experiments.verify",
    "watch": "experiments.watch", "selftests": "experiments.selftests",
    "report": "views.report", "plots": "views.plots", "widgets": "views.widgets",
    "drgn_commands": "views.drgn_commands", "notebook": "views.notebook",
}


class _MovedModule(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """``import ksmlens.vm`` still works: it is ``ksmlens.lab.vm``, with a warning."""

    def find_spec(self, fullname, path=None, target=None):
        head, _, name = fullname.partition(".")
        if head == __name__ and name in _MOVED:
            return importlib.util.spec_from_loader(fullname, self)
        return None

    def create_module(self, spec):
        new = f"{__name__}.{_MOVED[spec.name.split('.', 1)[1]]}"
        warnings.warn(f"{spec.name} moved to {new}; import it from there",
                      DeprecationWarning, stacklevel=3)
        return importlib.import_module(new)

    def exec_module(self, module):
        pass


if not any(isinstance(f, _MovedModule) for f in sys.meta_path):
    sys.meta_path.append(_MovedModule())
