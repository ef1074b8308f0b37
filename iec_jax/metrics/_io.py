"""Small file helpers shared by the metrics modules."""

from __future__ import annotations

import os
import pathlib
from typing import Union

from iec_jax.io import write_npz

PathLike = Union[str, os.PathLike]


def atomic_savez(path: PathLike, **arrays) -> pathlib.Path:
    """``np.savez`` to ``path`` through a temporary file in the same folder + ``os.replace``.

    Readers never see a partial file, and an interrupted write leaves no debris. The name is
    used as given (no ``.npz`` is appended); the file gets the usual umask permissions.
    """
    write_npz(path, **arrays)
    return pathlib.Path(path)
