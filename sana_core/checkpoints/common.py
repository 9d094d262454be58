"""What every weight-file reader shares (`files.py` and the GGUF reader `gguf_files.py`, which `files.py`
dispatches to): the error type and the argument types."""
from __future__ import annotations

import os
from typing import Callable

PathLike = str | os.PathLike
Keep = Callable[[str], bool] | None  # which raw keys of a file to read (None: all)


class CheckpointError(ValueError):
    """A weight file that cannot be used: unreadable, truncated, or not the model that was expected."""
