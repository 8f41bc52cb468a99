"""One exception type for everything a user can get wrong or lack.

Every error ksmlens raises for bad input or a missing prerequisite is a
:class:`KsmlensError` whose ``str()`` is one line: the cause, then what to do.
The CLI prints it as ``ksmlens: error: <cause>: <hint>`` and exits 2.
"""

__all__ = ["KsmlensError"]


class KsmlensError(Exception):
    """A one-line cause plus what to do about it."""

    def __init__(self, cause: str, hint: str = ""):
        self.cause = cause
        self.hint = hint
        super().__init__(f"{cause}: {hint}" if hint else cause)
