"""Atomic file writes: a reader (or a crash) never sees a half-written output file."""
import json
import os
import tempfile
from typing import Any, Callable


def atomic_write(path: str, write: Callable[[str], None]) -> str:
    """Create ``path`` by calling ``write(tmp)`` on a temporary file beside it, then renaming it into place.

    The temporary name keeps ``path``'s extension, so writers that pick a format from it (matplotlib's ``savefig``)
    work unchanged. On any error the temporary file is removed and ``path`` is left as it was.
    """
    path = os.path.abspath(path)
    directory, name = os.path.split(path)
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f'.{name}.', suffix='.tmp' + os.path.splitext(name)[1], dir=directory)
    os.close(fd)
    try:
        write(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp's 0600 would otherwise stick to the result
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def atomic_write_json(path: str, obj: Any) -> str:
    """:func:`atomic_write` of ``obj`` as indented JSON."""
    def write(tmp: str) -> None:
        with open(tmp, 'w') as f:
            json.dump(obj, f, indent=1)
    return atomic_write(path, write)
