"""Atomic writes: a crash leaves either the old file or the new one, never half of one."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


FILE_MODE = 0o666 & ~_umask()  # what open() would give: mkstemp's private 0600 would hide results from others
TEMP_PREFIX, TEMP_SUFFIX = ".", ".tmp"  # an atomic write's temporary file: .<target name>.<random>.tmp next to its target


def _atomic(path: Path, write: Callable[[Path], None]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f"{TEMP_PREFIX}{path.name}.", suffix=TEMP_SUFFIX, dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        os.chmod(tmp, FILE_MODE)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def remove_temp_files(folder: Path) -> list[Path]:
    """Delete the temporary files that killed writers left in `folder` (a SIGKILL skips their cleanup).

    Only call it while no one else writes there: a live writer's temporary file would go too.
    """
    stale = sorted(folder.glob(f"{TEMP_PREFIX}*{TEMP_SUFFIX}")) if folder.is_dir() else []
    for path in stale:
        path.unlink(missing_ok=True)
    return stale


def write_text(path: Path, text: str) -> None:
    _atomic(path, lambda tmp: tmp.write_text(text))


def write_bytes(path: Path, data: bytes) -> None:
    _atomic(path, lambda tmp: tmp.write_bytes(data))


def write_json(path: Path, data: Any) -> None:
    write_text(path, json.dumps(data, indent=2, sort_keys=True) + "\n")


def save_torch(path: Path, obj: Any) -> None:
    import torch  # here, not at the top: the report reads results without loading torch

    _atomic(path, lambda tmp: torch.save(obj, tmp))


def read_json(path: Path) -> Any:
    return json.loads(path.read_text())
