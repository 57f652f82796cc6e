"""The work directory of an evaluation run: the one given (kept, for reuse by a rerun), or a
temporary one removed when the run ends."""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path


@contextlib.contextmanager
def work_directory(path: str | os.PathLike | None, prefix: str):
    if path is None:
        with tempfile.TemporaryDirectory(prefix=prefix) as tmp:
            yield Path(tmp)
        return
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    yield path
