"""Per-installation secrets kept in files: generated on first use, never shipped in the source.

``load_or_create_secret(path)`` returns the secret stored at ``path``; the first caller creates
it (``secrets.token_urlsafe``, 384 bits) with mode 0600 in a directory of mode 0700, atomically
(``O_CREAT | O_EXCL``: two processes starting at once agree on one secret). A file that others
can read is refused, as ssh refuses such a key, rather than silently trusted.
"""

from __future__ import annotations

import os
import secrets
import stat
import time
from pathlib import Path

from sfumato.errors import UsageError

SECRET_BYTES = 48


def load_or_create_secret(path: Path, *, nbytes: int = SECRET_BYTES) -> str:
    """The secret in ``path``, created (mode 0600) if the file does not exist yet."""
    path = Path(path)
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return _read(path)
    with os.fdopen(fd, "w") as handle:
        handle.write(secrets.token_urlsafe(nbytes) + "\n")
    return _read(path)


def _read(path: Path) -> str:
    mode = path.stat().st_mode
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise UsageError(
            f"{path} is accessible by other users (mode {stat.filemode(mode)}); run `chmod 600 {path}`"
        )
    # A concurrent creator may not have written its line yet: wait for it briefly.
    for _ in range(50):
        value = path.read_text().strip()
        if value:
            return value
        time.sleep(0.02)
    raise UsageError(f"{path} is empty; delete it to generate a new secret")
