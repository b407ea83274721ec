"""The audit record of one request (``report["audit"]``): what went in, what came out, how.

Deterministic for a given input, bundle, parameters and software: no timings, no paths, no host
names, floats rounded to ``verify.ROUND`` digits, so two runs give byte-identical
``canonical_json(audit)``. Contents (docs/verification.md has the schema):

* ``input_pixels_sha256`` / ``output_pixels_sha256``: SHA-256 of the decoded RGB pixels
  (``HxWx3`` uint8, row-major, prefixed by ``"H,W,3;"``); always present (output null when the
  image was rejected);
* ``input_sha256`` / ``output_sha256``: SHA-256 of the encoded file bytes, filled in where bytes
  exist (server request, CLI file) by ``add_byte_hashes``; null for in-process array calls;
* bundle manifest hash, every method parameter, the face and verification policies, thresholds,
  recognizer model hashes, software versions, and per face: action, verdict, every attempt's seed,
  guidance and similarities, and the final check of the released pixels.
"""

from __future__ import annotations

import hashlib
import json
import platform
from functools import lru_cache

import numpy as np

from . import __version__
from .verify import ROUND

FORMAT = "revpers-audit"
VERSION = 1
FACE_KEYS = ("index", "box", "action", "reason", "identity_source", "verdict", "seed_used", "attempts", "verification")


def pixels_sha256(rgb: np.ndarray | None) -> str | None:
    if rgb is None:
        return None
    a = np.ascontiguousarray(rgb, dtype=np.uint8)
    h = hashlib.sha256(",".join(str(d) for d in a.shape).encode() + b";")
    h.update(a.tobytes())
    return h.hexdigest()


def bytes_sha256(data: bytes | None) -> str | None:
    return None if data is None else hashlib.sha256(bytes(data)).hexdigest()


@lru_cache(maxsize=1)
def versions() -> dict:
    """Versions of the software that decides the output (read once per process)."""
    from importlib import metadata

    out = {"revpers": __version__, "python": platform.python_version()}
    for dist in ("torch", "diffusers", "transformers", "onnxruntime", "insightface", "numpy", "opencv-python",
                 "opencv-python-headless", "pillow", "dlib-bin", "dlib", "face-recognition-models"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    try:
        import dlib

        out["dlib_runtime"] = dlib.__version__
    except ImportError:  # pragma: no cover - dlib is a dependency
        pass
    return dict(sorted(out.items()))


def round_floats(obj, digits: int = ROUND):
    if isinstance(obj, float):
        return round(obj, digits)
    if isinstance(obj, dict):
        return {k: round_floats(v, digits) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [round_floats(v, digits) for v in obj]
    return obj


def build_audit(*, mode: str, bundle, params: dict, face_policy: dict | None, verify_policy: dict,
                verification: dict | None, faces: list[dict], verdict: str, input_rgb: np.ndarray,
                output_rgb: np.ndarray | None, runtime: dict) -> dict:
    audit = {
        "format": FORMAT, "version": VERSION, "mode": mode,
        "input_sha256": None, "output_sha256": None,
        "input_pixels_sha256": pixels_sha256(input_rgb), "output_pixels_sha256": pixels_sha256(output_rgb),
        "input_size": [int(input_rgb.shape[1]), int(input_rgb.shape[0])],
        "bundle": {"name": bundle.manifest.get("name", bundle.root.name), "manifest_sha256": bundle.digest(),
                   "smoke": bundle.smoke},
        "runtime": runtime,
        "params": params, "face_policy": face_policy, "verify_policy": verify_policy,
        "verification": verification,
        "versions": versions(),
        "faces": [{k: f[k] for k in FACE_KEYS if k in f} for f in faces],
        "verdict": verdict,
    }
    return round_floats(audit, ROUND)


def add_byte_hashes(report: dict, input_bytes: bytes | None, output_bytes: bytes | None) -> dict:
    """Record the SHA-256 of the encoded input and output (server, CLI) in ``report["audit"]``."""
    audit = report.get("audit")
    if audit is not None:
        audit["input_sha256"] = bytes_sha256(input_bytes)
        audit["output_sha256"] = bytes_sha256(output_bytes) if output_bytes else None
    return report


def canonical_json(audit: dict) -> bytes:
    """The byte form to store or compare: sorted keys, no whitespace, UTF-8."""
    return json.dumps(audit, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
