"""Paths and the image scripts (which are scripts of the repository, not part of the package)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

REPO = Path(__file__).resolve().parents[2]
IMAGES = REPO / "images"
DOCKERFILES = {name: IMAGES / name / "Dockerfile" for name in ("agent", "operator", "placeholder")}


def load_script(relative: str) -> ModuleType:
    path = REPO / relative
    name = "images_" + path.stem
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def layout() -> ModuleType:
    return load_script("images/placeholder/layout.py")
