"""Output folders written all or nothing: refused up front when they exist, written into a
temporary sibling and renamed into place (plans and checkpoints)."""
from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path


def check_output_dir(path, overwrite: bool) -> None:
    """Refuse an existing output (unless overwrite) before any work is done."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise FileExistsError(f"{str(path)!r} is a file, not a folder; choose another output folder")
    if path.exists() and not overwrite:
        raise FileExistsError(f"{str(path)!r} already exists; choose another output folder or pass overwrite=True "
                              "(--overwrite on the command line)")



@contextmanager
def writing_folder(path: Path):
    """Yield a temporary sibling folder of `path` to write into. When the block completes it is
    renamed to `path` (an existing `path`, checked by the caller, is swapped out and removed only
    then); on any failure, Ctrl-C included, it is removed and `path` is left as it was."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    umask = os.umask(0o022)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)  # mkdtemp's folder is private (0700); the result gets the usual permissions
    try:
        yield tmp
        if not path.exists():
            os.replace(tmp, path)
            return
        old = Path(tempfile.mkdtemp(prefix=f".{path.name}.old-", dir=path.parent))  # a unique, empty name
        try:
            os.replace(path, old)
        except BaseException:
            old.rmdir()
            raise
        try:
            os.replace(tmp, path)
        except BaseException:
            os.replace(old, path)
            raise
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # gone on success (renamed); removed on any failure
