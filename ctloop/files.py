"""Local files that readers may open at any moment: a link swapped in one step."""

from __future__ import annotations

import os
from pathlib import Path


def repoint_link(link: Path, target: str) -> None:
    """Point the symlink ``link`` at ``target`` (relative to its folder) atomically: a reader
    sees the old target or the new one, never a missing link (``runs/latest``,
    ``runs/latest-study``)."""
    tmp = link.with_name(f".{link.name}.tmp")
    tmp.unlink(missing_ok=True)
    tmp.symlink_to(target)
    os.replace(tmp, link)
