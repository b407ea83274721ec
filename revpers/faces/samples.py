"""Real photos with faces that ship inside installed packages (no download): the demo, the
export's FP8 calibration, the benchmarks and the tests use them."""

from __future__ import annotations

import importlib.util
from pathlib import Path


def insightface_photo(name: str) -> Path:
    """A real photo that ships inside the insightface wheel (``data/images``: t1.jpg with 6 faces,
    Tom_Hanks_54745.png, mask_white.jpg, mask_blue.jpg, ...)."""
    return Path(importlib.util.find_spec("insightface").submodule_search_locations[0]) / "data" / "images" / name


def demo_photos() -> list[Path]:
    return [insightface_photo("t1.jpg"), insightface_photo("Tom_Hanks_54745.png")]
