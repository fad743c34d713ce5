"""kiq's version: the installed distribution's, or pyproject.toml's when running from a checkout not installed."""

from __future__ import annotations

import importlib.metadata
import re
from pathlib import Path


def _version() -> str:
    try:
        return importlib.metadata.version("kiq")
    except importlib.metadata.PackageNotFoundError:
        pyproject = Path(__file__).resolve().parent.parent / "pyproject.toml"
        found = re.search(r'^version = "([^"]+)"', pyproject.read_text(), re.M) if pyproject.is_file() else None
        return found.group(1) if found else "0+unknown"


__version__ = _version()
