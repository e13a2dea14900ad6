"""The one exception every image check raises: why a file cannot be screened, in words a person can act on."""
from __future__ import annotations


class Rejected(Exception):
    """The file cannot be screened. `code` is machine-readable, `reason` tells a person what to do.

    `maybe_incomplete` marks failures that also happen while a file is still
    being written (empty, truncated): the daemon waits before quarantining those.
    """

    def __init__(self, code: str, reason: str, maybe_incomplete: bool = False) -> None:
        super().__init__(reason)
        self.code, self.reason, self.maybe_incomplete = code, reason, maybe_incomplete
