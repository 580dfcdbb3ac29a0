"""The one version string: the installed distribution's metadata (pyproject.toml's
``version``), never a second copy in the code."""

from __future__ import annotations

import functools
from importlib import metadata

__all__ = ["DISTRIBUTION", "version"]

DISTRIBUTION = "backhaul"


@functools.cache
def version() -> str:
    """The installed ``backhaul`` version, or ``0+unknown`` when run from a tree that was
    never installed (no metadata to read)."""
    try:
        return metadata.version(DISTRIBUTION)
    except metadata.PackageNotFoundError:
        return "0+unknown"
