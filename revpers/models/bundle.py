"""The model bundle: one folder holding everything the pipeline loads, with no network access.

Layout (paths relative to the bundle root; see docs/bundle.md)::

    manifest.json                      format, smoke flag, native face size, embedding size, paths
    sdxl/                              Stable Diffusion XL in diffusers layout (model_index.json,
                                       unet/ vae/ text_encoder/ text_encoder_2/ tokenizer/
                                       tokenizer_2/ scheduler/)
    ip_adapter/ip-adapter-faceid_sdxl.bin   IP-Adapter FaceID SDXL (projection, IP K/V, LoRA)
    face_models/...                    face detector + ArcFace-contract recognizer

``revpers bundle init`` builds one from downloaded weights and ``revpers bundle check`` validates one
(revpers/bundle_tools.py; docs/real-weights.md lists every manifest key).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

from revpers.core.errors import BundleError

FORMAT = "revpers-bundle"
VERSION = 1
MANIFEST = "manifest.json"


def manifest_bytes(manifest: dict) -> bytes:
    """manifest.json as ``write_manifest`` writes it."""
    return (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode()


@dataclass(frozen=True)
class Bundle:
    """``manifest_sha256``: SHA-256 of the manifest bytes this bundle was parsed from (``load_bundle``
    sets it); for a Bundle built in memory, of ``manifest_bytes(manifest)``."""

    root: Path
    manifest: dict = field(repr=False)
    manifest_sha256: str | None = field(default=None, repr=False, compare=False)

    def __post_init__(self):
        if self.manifest_sha256 is None:
            object.__setattr__(self, "manifest_sha256", hashlib.sha256(manifest_bytes(self.manifest)).hexdigest())

    @property
    def smoke(self) -> bool:
        return bool(self.manifest.get("smoke", False))

    @property
    def native_size(self) -> int:
        return int(self.manifest["native_size"])

    @property
    def embedding_dim(self) -> int:
        return int(self.manifest["embedding_dim"])

    @property
    def sdxl_dir(self) -> Path:
        return self.root / self.manifest["sdxl"]

    @property
    def sdxl_variant(self) -> str | None:
        """diffusers weight-file variant of the SDXL folder (``"fp16"``: ``*.fp16.safetensors``), or None."""
        return self.manifest.get("sdxl_variant") or None

    def sdxl_variant_of(self, component: str) -> str | None:
        """The variant to load one component with on its own (a model's ``from_pretrained`` does not
        fall back to the plain file the way a pipeline's does): None when it has no variant file."""
        v = self.sdxl_variant
        return v if v and any(f".{v}." in p.name for p in (self.sdxl_dir / component).glob("*")) else None

    @property
    def ip_adapter_file(self) -> Path:
        return self.root / self.manifest["ip_adapter"]

    @property
    def faces(self) -> dict:
        return dict(self.manifest["faces"])

    def path(self, rel: str) -> Path:
        return self.root / rel

    def digest(self) -> str:
        """SHA-256 of the manifest in use (the bytes parsed at load time, not the file as it is now):
        identifies the bundle in reports and audit records."""
        return self.manifest_sha256

    def describe(self) -> dict:
        """The bundle as reports name it: by name and manifest hash, never by its path on disk (a
        report travels to clients; where the server keeps its models is not theirs to know)."""
        return {
            "name": self.manifest.get("name", self.root.name),
            "smoke": self.smoke,
            "native_size": self.native_size,
            "manifest_sha256": self.digest(),
        }


REQUIRED_SDXL = (
    "model_index.json",
    "unet/config.json",
    "vae/config.json",
    "text_encoder/config.json",
    "text_encoder_2/config.json",
    "scheduler/scheduler_config.json",
)


def write_manifest(
    root: Path,
    *,
    native_size: int,
    embedding_dim: int,
    smoke: bool,
    faces: dict,
    name: str | None = None,
    sdxl: str = "sdxl",
    ip_adapter: str = "ip_adapter/ip-adapter-faceid_sdxl.bin",
    extra: dict | None = None,
) -> Path:
    manifest = {
        "format": FORMAT,
        "version": VERSION,
        "name": name or Path(root).name,
        "smoke": smoke,
        "native_size": native_size,
        "embedding_dim": embedding_dim,
        "sdxl": sdxl,
        "ip_adapter": ip_adapter,
        "faces": faces,
    }
    manifest.update(extra or {})
    path = Path(root) / MANIFEST
    path.write_bytes(manifest_bytes(manifest))
    return path


def read_manifest(mpath: Path) -> tuple[bytes, dict]:
    """The manifest's bytes (the audit hashes exactly these) and its checked JSON object."""
    if not mpath.is_file():
        raise BundleError(f"{mpath.parent} is not a model bundle: {MANIFEST} is missing")
    raw = mpath.read_bytes()
    try:
        manifest = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BundleError(f"{mpath}: invalid JSON: {exc}") from None
    if not isinstance(manifest, dict):
        raise BundleError(f"{mpath}: expected a JSON object, got {type(manifest).__name__}")
    if manifest.get("format") != FORMAT:
        raise BundleError(f"{mpath}: format is {manifest.get('format')!r}, expected {FORMAT!r}")
    missing_keys = [k for k in ("native_size", "embedding_dim", "sdxl", "ip_adapter", "faces") if k not in manifest]
    if missing_keys:
        raise BundleError(f"{mpath}: missing keys {missing_keys}")
    return raw, manifest


def load_bundle(root: str | Path) -> Bundle:
    """Read and check a bundle folder; every problem found is named in one error."""
    root = Path(root).expanduser().resolve()
    if not root.is_dir():
        raise BundleError(
            f"model bundle {root} does not exist (make one with `revpers smoke-model {root}` "
            "or see README 'Model bundle' for real weights)"
        )
    mpath = root / MANIFEST
    raw, manifest = read_manifest(mpath)
    bundle = Bundle(root, manifest, hashlib.sha256(raw).hexdigest())
    problems = [f"sdxl/{rel}" for rel in REQUIRED_SDXL if not (bundle.sdxl_dir / rel).is_file()]
    if not bundle.ip_adapter_file.is_file():
        problems.append(manifest["ip_adapter"])
    faces = bundle.faces
    for key in ("recognizer", "pack"):
        if faces.get(key) and not (root / faces[key]).exists():
            problems.append(faces[key])
    if problems:
        raise BundleError(f"model bundle {root} is incomplete; missing: {', '.join(problems)}")
    if bundle.native_size % 8 or bundle.native_size < 32:
        raise BundleError(f"{mpath}: native_size must be a multiple of 8 and >= 32, got {bundle.native_size}")
    return bundle
