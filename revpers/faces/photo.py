"""Anonymize every face of an ordinary photo: detect, align, one generator batch, paste back.

``anonymize_photo(rgb, analyzer, anonymize_batch, native_size, policy)``:

1. detect all faces (the analyzer's detector, on the EXIF-oriented RGB image);
2. decide per face (``FacePolicy``): faces the generator can work with are aligned to a
   ``native_size`` whole-face crop (``align.py``) and get an identity embedding from that crop
   (``identity_from_crop``); faces too small (detector box side below ``min_face_px``, or a crop
   that would need more than ``max_upscale`` magnification, or too small for a smooth paste) and,
   optionally, faces larger than ``max_face_px`` get their configured action instead:
   "anonymize", "blur", "pixelate" or "leave";
3. call ``anonymize_batch(crops, identities)`` exactly once with all faces to anonymize (the
   generator runs them as one batch), never per face;
4. paste each generated crop back under its soft mask with colour matching; blur/pixelate the
   others under the same mask (``blend.py``).

Pixels outside the union of the face masks keep their input bytes. A photo with no face comes
back as the very same array, with an empty report list.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Callable

import numpy as np

from revpers.core.errors import LimitError
from revpers.faces.align import align_face, alignment_matrix, crop_scale, identities_of_crops
from revpers.faces.analysis import Face
from revpers.faces.blend import MIN_FEATHER_PX, OBSCURE_MODES, full_alpha, mask_geometry, obscure_face, paste_face

ACTIONS = ("anonymize", "blur", "pixelate", "leave")
DONE = {"anonymize": "anonymized", "blur": "blurred", "pixelate": "pixelated", "fill": "filled", "leave": "left"}

AnonymizeBatch = Callable[[list, np.ndarray], list]


@dataclass(frozen=True)
class FacePolicy:
    """Which faces go through the generator and what happens to the others.

    min_face_px: detector box side (the longer one, photo pixels) below which a face is "too
        small". None: ``min_face_rel * native_size`` (48 px for a 1024 px SDXL bundle).
    max_upscale: a face whose crop would be magnified more than this from the photo is too small
        as well. The crop side is 4 eye distances, about 1.65 dlib box sides, so at 1024 px a
        48 px dlib box (eye distance ~20 px) is magnified about 13x; 16x is an eye distance of
        16 px. None: no limit.
    small_action: what too-small faces get; "blur" by default, since a face the generator cannot
        handle must still not be left identifiable.
    max_face_px / large_action: optional upper limit (None: none) and its action.
    color_match: LAB mean/std matching of generated faces in the feather band (blend.py).
    min_feather_px: the mask's minimum feather width in photo pixels (alpha step <= 1.5 / this).
    """

    min_face_px: float | None = None
    min_face_rel: float = 48.0 / 1024.0
    max_upscale: float | None = 16.0
    small_action: str = "blur"
    max_face_px: float | None = None
    large_action: str = "anonymize"
    color_match: bool = True
    min_feather_px: float = MIN_FEATHER_PX
    min_score: float | None = None  # detections scoring below this are not faces (raises the bundle's threshold)

    def __post_init__(self):
        for name in ("small_action", "large_action"):
            if getattr(self, name) not in ACTIONS:
                raise ValueError(f"FacePolicy.{name} must be one of {ACTIONS}, got {getattr(self, name)!r}")
        for name in ("min_face_px", "max_upscale", "max_face_px"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise ValueError(f"FacePolicy.{name} must be positive or None, got {value!r}")
        if not self.min_face_rel >= 0:
            raise ValueError("FacePolicy.min_face_rel must be >= 0")
        if not self.min_feather_px > 0:
            raise ValueError("FacePolicy.min_feather_px must be positive")

    def min_side(self, native_size: int) -> float:
        return float(self.min_face_px) if self.min_face_px is not None else self.min_face_rel * float(native_size)

    def as_dict(self) -> dict:
        return asdict(self)


def _decide(face: Face, scale: float, smooth: bool, native_size: int, policy: FacePolicy) -> tuple[str, str]:
    side = face.side
    min_side = policy.min_side(native_size)
    if side < min_side:
        return policy.small_action, f"face box {side:.0f} px is below the minimum {min_side:.0f} px"
    if policy.max_upscale is not None and scale > policy.max_upscale:
        return policy.small_action, (
            f"crop would upscale the face {scale:.1f}x, more than the maximum {policy.max_upscale:g}x"
        )
    if not smooth:
        return policy.small_action, (
            f"face too small for a soft paste with a {policy.min_feather_px:g} px feather inside its crop"
        )
    if policy.max_face_px is not None and side > policy.max_face_px:
        return policy.large_action, f"face box {side:.0f} px is above the maximum {policy.max_face_px:g} px"
    return "anonymize", "face size is within the generator's range"


@dataclass
class PhotoPlan:
    """What ``plan_photo`` decided for one photo: per-face reports (``action`` is still the decided
    action, one of ACTIONS), and the aligned crops + identities of the faces to generate."""

    rgb: np.ndarray
    native_size: int
    policy: FacePolicy
    faces: list
    reports: list
    to_generate: list  # face indices, in order; rank r of the generator batch is to_generate[r]
    crops: list
    identities: np.ndarray | None


def plan_photo(
    rgb: np.ndarray, analyzer, native_size: int, policy: FacePolicy | None = None, max_faces: int | None = None
) -> PhotoPlan:
    """Steps 1-2 of ``anonymize_photo``: detect, decide, align, embed (no generation, no paste).
    More than ``max_faces`` detected faces is a LimitError, raised before any face is aligned or embedded."""
    policy = policy or FacePolicy()
    rgb = np.asarray(rgb)
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
        raise ValueError(f"expected an (H, W, 3) uint8 RGB image, got shape {rgb.shape} dtype {rgb.dtype}")
    native_size = int(native_size)
    faces = analyzer.detect(rgb)
    if policy.min_score is not None:
        faces = [f for f in faces if f.score >= policy.min_score]
    if max_faces is not None and len(faces) > max_faces:
        raise LimitError(f"{len(faces)} faces found; this server's limit is {max_faces} per image")
    reports: list[dict] = []
    crops, to_generate = [], []
    for i, face in enumerate(faces):
        m = alignment_matrix(face.kps, native_size)
        scale = crop_scale(m)
        geom = mask_geometry(m, native_size, policy.min_feather_px, limit_to_crop=True)
        action, reason = _decide(face, scale, geom.smooth, native_size, policy)
        reports.append(
            {
                "index": i,
                "box": [round(float(v), 2) for v in face.box],
                "score": round(float(face.score), 4),
                "landmarks": [[round(float(x), 2), round(float(y), 2)] for x, y in face.kps],
                "crop_size": native_size,
                "scale": round(scale, 4),
                "matrix": m.tolist(),
                "identity_source": None,
                "action": action,
                "reason": reason,
            }
        )
        if action == "anonymize":
            crop, _ = align_face(rgb, face.kps, native_size)
            crops.append(crop)
            to_generate.append(i)
    identities = None
    if to_generate:
        identities, sources = identities_of_crops(analyzer, crops)
        for i, source in zip(to_generate, sources):
            reports[i]["identity_source"] = source
    return PhotoPlan(rgb, native_size, policy, faces, reports, to_generate, crops, identities)


def check_generated(plan: PhotoPlan, results, indices=None) -> dict[int, np.ndarray]:
    """Validate the generator's crops for ``indices`` (default: all of ``plan.to_generate``)."""
    indices = list(plan.to_generate if indices is None else indices)
    results = list(results) if results is not None else []
    if len(results) != len(indices):
        raise ValueError(f"anonymize_batch returned {len(results)} images for {len(indices)} faces")
    n = plan.native_size
    out = {}
    for i, res in zip(indices, results):
        res = np.asarray(res)
        if res.shape != (n, n, 3) or res.dtype != np.uint8:
            raise ValueError(
                f"anonymize_batch must return ({n}, {n}, 3) uint8 crops, got shape {res.shape} dtype {res.dtype}"
            )
        out[i] = res
    return out


def compose_photo(
    plan: PhotoPlan,
    generated: dict[int, np.ndarray],
    override: dict[int, str] | None = None,
) -> np.ndarray:
    """Step 4: a new image from the input: paste each generated crop, blur/pixelate the others.
    ``override`` replaces a face's action (e.g. the verification gate's blur fallback)."""
    override = override or {}
    out = np.array(plan.rgb, copy=True)
    policy = plan.policy
    for rep in plan.reports:
        i, m = rep["index"], np.asarray(rep["matrix"])
        action = override.get(i, rep["action"])
        if action == "anonymize":
            paste_face(out, generated[i], m, color_match=policy.color_match, min_feather_px=policy.min_feather_px)
        elif action in OBSCURE_MODES:
            obscure_face(out, m, plan.native_size, action, min_feather_px=policy.min_feather_px)
    return out


def anonymize_photo(
    rgb: np.ndarray, analyzer, anonymize_batch: AnonymizeBatch, native_size: int, policy: FacePolicy | None = None
) -> tuple[np.ndarray, list[dict]]:
    """Anonymize all faces of an (H, W, 3) uint8 RGB photo; returns (image, per-face reports)."""
    plan = plan_photo(rgb, analyzer, native_size, policy)
    if not plan.faces:
        return plan.rgb, []
    generated: dict[int, np.ndarray] = {}
    if plan.to_generate:
        generated = check_generated(plan, anonymize_batch(plan.crops, plan.identities))
    out = compose_photo(plan, generated)
    for rep in plan.reports:
        rep["action"] = DONE[rep["action"]]
    return out, plan.reports


def face_mask(report: dict, shape, min_feather_px: float = MIN_FEATHER_PX) -> np.ndarray:
    """The soft mask (H, W) float32 that ``anonymize_photo`` used for one reported face
    (zeros for a face that was left)."""
    if report["action"] == "left":
        return np.zeros(shape[:2], dtype=np.float32)
    return full_alpha(
        np.asarray(report["matrix"]),
        int(report["crop_size"]),
        shape,
        min_feather_px=min_feather_px,
        limit_to_crop=report["action"] == "anonymized",
    )


def union_mask(reports: list[dict], shape, min_feather_px: float = MIN_FEATHER_PX) -> np.ndarray:
    """Pixel-wise maximum of all faces' masks: where it is 0 the output equals the input."""
    out = np.zeros(shape[:2], dtype=np.float32)
    for rep in reports:
        np.maximum(out, face_mask(rep, shape, min_feather_px), out=out)
    return out
