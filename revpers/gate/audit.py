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
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from revpers import __version__
from revpers.core.record import Record, plain
from revpers.gate.policy import ROUND
from revpers_client.protocol import ImageVerdict

AUDIT_FORMAT = "revpers-audit"
AUDIT_VERSION = 1
FACE_KEYS = (
    "index",
    "box",
    "action",
    "reason",
    "identity_source",
    "verdict",
    "seed_used",
    "attempts",
    "fallback_checks",
    "verification",
)


@dataclass(eq=False)
class BundleRef(Record):
    """The bundle that made an output, by name and manifest hash (never its path on disk)."""

    name: str
    manifest_sha256: str
    smoke: bool


@dataclass(eq=False)
class AuditRecord(Record):
    """Everything needed to show later what was done to an image and by which models and software;
    byte-identical for the same input, parameters and models (``canonical_json``)."""

    mode: str
    input_size: list[int]
    bundle: BundleRef
    runtime: dict
    params: dict
    face_policy: dict | None
    verify_policy: dict
    verification: dict | None
    versions: dict[str, str]
    faces: list[dict]
    verdict: ImageVerdict
    input_pixels_sha256: str | None
    output_pixels_sha256: str | None
    input_sha256: str | None = None
    output_sha256: str | None = None
    format: str = AUDIT_FORMAT
    version: int = AUDIT_VERSION


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
    for dist in (
        "torch",
        "diffusers",
        "transformers",
        "onnxruntime",
        "insightface",
        "numpy",
        "opencv-python",
        "opencv-python-headless",
        "pillow",
        "dlib-bin",
        "dlib",
        "face-recognition-models",
    ):
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


def build_audit(
    *,
    mode: str,
    bundle,
    params: dict,
    face_policy: dict | None,
    verify_policy: dict,
    verification: dict | None,
    faces: list[dict],
    verdict: str,
    input_rgb: np.ndarray,
    output_rgb: np.ndarray | None,
    runtime: dict,
) -> AuditRecord:
    return AuditRecord(
        mode=mode,
        input_size=[int(input_rgb.shape[1]), int(input_rgb.shape[0])],
        bundle=BundleRef(
            name=bundle.manifest.get("name", bundle.root.name), manifest_sha256=bundle.digest(), smoke=bundle.smoke
        ),
        runtime=runtime,
        params=round_floats(params),
        face_policy=round_floats(face_policy),
        verify_policy=round_floats(verify_policy),
        verification=round_floats(verification),
        versions=versions(),
        faces=[round_floats({k: plain(f[k]) for k in FACE_KEYS if k in f}) for f in faces],
        verdict=ImageVerdict(verdict),
        input_pixels_sha256=pixels_sha256(input_rgb),
        output_pixels_sha256=pixels_sha256(output_rgb),
    )


def add_byte_hashes(audit: AuditRecord, input_bytes: bytes | None, output_bytes: bytes | None) -> AuditRecord:
    """Record the SHA-256 of the encoded input and output (server, CLI) in the audit record."""
    audit.input_sha256 = bytes_sha256(input_bytes)
    audit.output_sha256 = bytes_sha256(output_bytes) if output_bytes else None
    return audit


def canonical_json(audit: AuditRecord | dict) -> bytes:
    """The byte form to store or compare: sorted keys, no whitespace, UTF-8."""
    return json.dumps(plain(audit), sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
