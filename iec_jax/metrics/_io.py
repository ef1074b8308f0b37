"""Small file helpers shared by the metrics modules."""

from __future__ import annotations

import os
import pathlib
import uuid
from typing import Union

import numpy as np

PathLike = Union[str, os.PathLike]


def atomic_savez(path: PathLike, **arrays) -> pathlib.Path:
    """``np.savez`` to ``path`` through a temporary file in the same folder + ``os.replace``.

    Readers never see a partial file, and an interrupted write leaves no debris. The name is
    used as given (no ``.npz`` is appended); the file gets the usual umask permissions.
    """
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.{uuid.uuid4().hex}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)
        os.replace(tmp, path)
    except BaseException:
        if tmp.exists():
            tmp.unlink()
        raise
    return path
