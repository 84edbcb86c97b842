"""State files: what the relay writes to ``state.dir`` is readable by its own user only.

SQLite creates a database with mode 0644 (less the umask), and its ``-wal`` and ``-shm`` files
with the database's mode. ``private_database`` creates the database file 0600 before SQLite
opens it, whatever the umask, and brings an existing one (with its ``-wal``, ``-shm`` and
``-journal``) back to 0600, so the spool, the persisted dedup keys and the token registry are
never readable by other users, also when the relay is started outside systemd (whose unit
sets ``UMask=0077``).
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

#: the mode of every state file
PRIVATE = 0o600
#: the mode of a state directory the relay creates
PRIVATE_DIR = 0o700
SQLITE_SIDE_FILES = ("-wal", "-shm", "-journal")


def private_file(path: Path) -> None:
    """Create ``path`` empty when missing and set its mode to 0600 (umask-independent);
    its directory is created 0700 when missing. Raises OSError."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=PRIVATE_DIR)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, PRIVATE)
    try:
        os.fchmod(fd, PRIVATE)
    finally:
        os.close(fd)


def private_database(path: Path) -> None:
    """Make the SQLite database at ``path`` (created empty when missing: SQLite takes an
    empty file as a new database) and its existing side files 0600. SQLite then creates the
    ``-wal`` and ``-shm`` files with the database's mode. Raises OSError."""
    private_file(path)
    for suffix in SQLITE_SIDE_FILES:
        with contextlib.suppress(FileNotFoundError):
            os.chmod(path.with_name(path.name + suffix), PRIVATE)
