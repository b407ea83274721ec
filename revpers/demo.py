"""`make demo`: build a smoke bundle, then anonymize real photos that ship in installed packages.

Smoke weights are tiny random models: the demo proves the whole path runs end to end, it does
not make believable faces. Point ``--bundle`` at a real bundle for real results.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import time
from pathlib import Path


def demo_photos() -> list[Path]:
    root = Path(importlib.util.find_spec("insightface").submodule_search_locations[0]) / "data" / "images"
    return [root / "t1.jpg", root / "Tom_Hanks_54745.png"]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m revpers.demo", description=__doc__)
    parser.add_argument("--bundle", type=Path, default=Path("build/demo-bundle"))
    parser.add_argument("--out", type=Path, default=Path("demo-out"))
    parser.add_argument("--steps", type=int, default=100)
    args = parser.parse_args(argv)

    from .cli import _quiet_libraries

    _quiet_libraries()
    from .anonymizer import Anonymizer
    from .bundle import MANIFEST
    from .images import encode_image, read_image
    from .pipeline import Params
    from .smoke import write_smoke_bundle

    if not (args.bundle / MANIFEST).is_file():
        t0 = time.perf_counter()
        write_smoke_bundle(args.bundle, seed=0, overwrite=True)
        print(f"built smoke bundle {args.bundle} in {time.perf_counter() - t0:.1f} s")
    anon = Anonymizer(args.bundle)
    args.out.mkdir(parents=True, exist_ok=True)
    params = Params(steps=args.steps)
    for photo in demo_photos():
        t0 = time.perf_counter()
        result = anon.anonymize_photo(read_image(photo), params)
        out = args.out / (photo.stem + ".png")
        out.write_bytes(encode_image(result.image))
        out.with_name(out.name + ".json").write_text(json.dumps(result.report, indent=2) + "\n")
        faces = result.report["faces"]
        done = sum(f["action"] == "anonymized" for f in faces)
        print(f"{photo.name}: {len(faces)} face(s), {done} anonymized in one batch, "
              f"{time.perf_counter() - t0:.1f} s -> {out} (+ .json report)")
    if anon.bundle.smoke:
        print("NOTE: smoke weights (tiny random models) make noise, not faces; "
              "use a real bundle (README 'Model bundle') for real anonymization.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
