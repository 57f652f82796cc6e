"""User memory: write facts as Engram rows (`remember`), list them, forget them.

`facade` is the remember / forget / facts API the commands and the server call; `writer` fits
the rows. `engram_local.memory.open_overrides` (issue contract) opens .eov files as override
stacks; it lives in engram_local.formats.eov.
"""

from engram_local.formats.eov import open_overrides  # noqa: F401

__all__ = ["open_overrides"]
