"""Pure computation on a snapshot: the rmap walk replayed under each rule,
pgoff status, SmartScan's schedule (:mod:`~ksmlens.analysis.core`)."""

from ksmlens.analysis.core import *  # noqa: F401,F403
from ksmlens.analysis.core import __all__  # noqa: F401
