"""Real photos with faces that ship inside installed packages (no download): the demo, the
export's FP8 calibration, the benchmarks and the tests use them."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
from PIL import Image


def insightface_photo(name: str) -> Path:
    """A real photo that ships inside the insightface wheel (``data/images``: t1.jpg with 6 faces,
    Tom_Hanks_54745.png, mask_white.jpg, mask_blue.jpg, ...)."""
    return Path(importlib.util.find_spec("insightface").submodule_search_locations[0]) / "data" / "images" / name


def demo_photos() -> list[Path]:
    return [insightface_photo("t1.jpg"), insightface_photo("Tom_Hanks_54745.png")]


def varied_photos(count: int = 40) -> list[tuple[str, np.ndarray]]:
    """``count`` distinct real photos (relative file name, RGB uint8) made from the shipped ones by
    flips, scales and crops: a collection for batch tests and benchmarks. Names spread over three
    folders and two formats (``.jpg``, ``.png``); the masked-face photos mostly have no face the
    detector finds, the group photo several. scikit-image's astronaut is used when it is installed."""

    def load(name):
        with Image.open(insightface_photo(name)) as img:
            return np.asarray(img.convert("RGB"))

    def scale(rgb, s):
        h, w = rgb.shape[:2]
        return np.asarray(Image.fromarray(rgb).resize((max(16, round(w * s)), max(16, round(h * s))), Image.LANCZOS))

    def crop(rgb, f):  # the centre fraction f of each side
        h, w = rgb.shape[:2]
        dh, dw = round(h * (1 - f) / 2), round(w * (1 - f) / 2)
        return rgb[dh : h - dh, dw : w - dw]

    bases = [("people/hanks", load("Tom_Hanks_54745.png"), ".png"), ("group/t1", scale(load("t1.jpg"), 0.4), ".jpg")]
    try:
        from skimage.data import astronaut

        bases.append(("people/astronaut", scale(astronaut(), 0.5), ".jpg"))
    except ImportError:  # pragma: no cover - scikit-image is in the dev extra
        pass
    bases += [(f"masks/{m}", load(f"{m}.jpg"), ".jpg") for m in ("mask_white", "mask_blue", "mask_black", "mask_green")]
    transforms = [
        ("", lambda a: a),
        ("-flip", lambda a: a[:, ::-1]),
        ("-s125", lambda a: scale(a, 1.25)),
        ("-s80", lambda a: scale(a, 0.8)),
        ("-crop90", lambda a: crop(a, 0.9)),
        ("-flip-s110", lambda a: scale(a[:, ::-1], 1.1)),
        ("-crop95-flip", lambda a: crop(a, 0.95)[:, ::-1]),
    ]
    out = []
    for suffix, fn in transforms:
        for stem, rgb, ext in bases:
            if len(out) < count:
                out.append((f"{stem}{suffix}{ext}", np.ascontiguousarray(fn(rgb))))
    if len(out) < count:
        raise ValueError(f"only {len(out)} distinct photos can be made here, {count} asked")
    return out
