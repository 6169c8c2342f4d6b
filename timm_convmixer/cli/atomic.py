"""Atomic writes: a reader (or a crash) never sees a half-written output file or folder.

Everything the package writes (``convert``'s folders, ``export``'s ONNX files, ``bench``'s JSON and chart, the demo's
results) goes through here, so the outputs get the modes the umask gives, as ``open()`` and ``os.mkdir`` would give
them: ``tempfile`` creates its files 0600 and its folders 0700, which would otherwise stick to the renamed result and
keep other users and service accounts out.
"""
import json
import os
import shutil
import tempfile
from typing import Any, Callable


def current_umask() -> int:
    """The process umask (reading it means setting it: it is put back at once)."""
    umask = os.umask(0o022)
    os.umask(umask)
    return umask


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
        os.chmod(tmp, 0o666 & ~current_umask())  # mkstemp's 0600 would otherwise stick to the result
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


def _umask_modes(folder: str) -> None:
    """Give ``folder`` and everything in it the modes ``os.mkdir``/``open()`` would give under the umask.

    mkdtemp makes the folder 0700, and some writers make their files 0600 (safetensors' ``save_file`` writes a
    temporary file and renames it, so ``model.safetensors`` from timm's ``save_for_hf`` is 0600).
    """
    umask = current_umask()
    for root, dirs, files in os.walk(folder):
        os.chmod(root, 0o777 & ~umask)
        for name in files:
            path = os.path.join(root, name)
            if not os.path.islink(path):
                os.chmod(path, 0o666 & ~umask)


def atomic_write_dir(path: str, write: Callable[[str], None], replace: bool = False) -> str:
    """Create the folder ``path`` by calling ``write(tmp)`` on a temporary folder beside it, then renaming it.

    The folder and what ``write`` put in it get the modes the umask gives (see :func:`_umask_modes`).
    ``write`` may also check what it wrote (``convert`` reloads the folder) and raise: on any error the temporary
    folder is removed and ``path`` is left as it was. An existing ``path`` is replaced only with ``replace``; it is
    moved aside first and removed once the new folder is in place, so ``path`` is never missing a file.
    """
    path = os.path.abspath(path)
    directory, name = os.path.split(path)
    if os.path.lexists(path) and not replace:
        raise FileExistsError(f'{path} already exists')
    os.makedirs(directory, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f'.{name}.tmp-', dir=directory)
    try:
        write(tmp)
        _umask_modes(tmp)
        if os.path.lexists(path):
            old = tempfile.mkdtemp(prefix=f'.{name}.old-', dir=directory)
            os.replace(path, os.path.join(old, name))
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path
