"""Writing a text output (a report, a page) so that a failure leaves nothing half-written."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from .errors import LowRankError

__all__ = ["write_text_atomic"]


def write_text_atomic(path: str | os.PathLike[str], text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` through a temporary file beside it and a rename.

    The file gets the mode a plainly created file gets (0666 less the umask), not the 0600 of a temporary file.
    Raises :class:`LowRankError` when the folder is missing or the write fails; the temporary file is removed.
    """
    dest = Path(path)
    if not dest.parent.is_dir():
        raise LowRankError(f"{dest}: folder {dest.parent} does not exist")
    if dest.is_dir():
        raise LowRankError(f"{dest}: is a directory")
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", dir=dest.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, dest)
    except OSError as exc:
        Path(tmp).unlink(missing_ok=True)
        raise LowRankError(f"{dest}: cannot write ({exc.strerror or exc})") from None
