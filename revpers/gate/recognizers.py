"""The gate's recognizers: dlib's 128-d ResNet and the bundle's ArcFace, measuring each output face
against its input face at the input face's place (docs/verification.md, "Measurement")."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np

from revpers.faces import load_face_analyzer
from revpers.faces.align import alignment_matrix, locate_in_crop, template_face, warp_to_crop
from revpers.faces.analysis import (
    DLIB_LOCK,
    DlibAnalyzer,
    FaceModelError,
    _shape_predictor,
    face_recognition_models_dir,
)
from revpers.gate.policy import ARCFACE_THRESHOLD, DLIB_THRESHOLD, LOCATE_TOLERANCE, ROUND, VERIFY_SIZE
from revpers.models.bundle import BundleError


@lru_cache(maxsize=1)
def _dlib_models() -> tuple:
    import dlib

    root = face_recognition_models_dir()
    rec_path = root / "dlib_face_recognition_resnet_model_v1.dat"
    lm_path = root / "shape_predictor_68_face_landmarks.dat"

    for p in (rec_path, lm_path):
        if not p.is_file():
            raise FaceModelError(f"dlib model {p} does not exist (reinstall face-recognition-models)")
    digest = hashlib.sha256(rec_path.read_bytes()).hexdigest()
    return dlib.face_recognition_model_v1(str(rec_path)), _shape_predictor(str(lm_path)), rec_path.name, digest


class DlibRecognizer:
    """dlib's 128-d face descriptor at a face box: 68 landmarks (the shape predictor) give dlib's own
    chip alignment (150 px, padding 0.25), then the ResNet. Models load once per process."""

    def __init__(self):
        self.net, self.predictor, self.model_name, self.model_sha256 = _dlib_models()

    def __call__(self, rgb: np.ndarray, box, landmarks68: np.ndarray | None = None) -> np.ndarray:
        """``landmarks68``: the 68 points already predicted on these pixels in this box (the dlib
        analyzer's ``detect_in_crop`` keeps them), so the predictor does not run twice."""
        import dlib

        x1, y1, x2, y2 = (int(round(float(v))) for v in box)
        rect = dlib.rectangle(x1, y1, x2 - 1, y2 - 1)
        with DLIB_LOCK:  # the same dlib models as the face analyzer's (faces.analysis)
            if landmarks68 is None:
                shape = self.predictor(rgb, rect)
            else:
                pts = np.rint(np.asarray(landmarks68, dtype=np.float64).reshape(68, 2)).astype(int)
                shape = dlib.full_object_detection(rect, [dlib.point(int(x), int(y)) for x, y in pts])
            desc = self.net.compute_face_descriptor(np.ascontiguousarray(rgb), shape)
        return np.asarray(desc, dtype=np.float64)


def dlib_distance(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(np.asarray(a, np.float64) - np.asarray(b, np.float64)))


# ---------------------------------------------------------------------------------------- verifier
@dataclass
class Embedded:
    """One face in a verification crop: where it was found and its embeddings."""

    face: object  # faces.Face in crop coordinates
    redetected: bool
    dlib: np.ndarray
    arcface: np.ndarray | None


@dataclass
class FaceCheck:
    arcface_cosine: float | None
    dlib_distance: float
    redetected: bool
    arcface_threshold: float | None
    dlib_threshold: float
    arcface_match: bool | None = field(init=False)
    dlib_match: bool = field(init=False)

    def __post_init__(self):
        self.arcface_match = (
            None if self.arcface_cosine is None else bool(self.arcface_cosine >= self.arcface_threshold)
        )
        self.dlib_match = bool(self.dlib_distance <= self.dlib_threshold)

    @property
    def passed(self) -> bool:
        return not self.dlib_match and not bool(self.arcface_match)

    def as_dict(self) -> dict:
        r = lambda v: None if v is None else round(float(v), ROUND)  # noqa: E731
        return {
            "arcface_cosine": r(self.arcface_cosine),
            "arcface_threshold": self.arcface_threshold,
            "arcface_match": self.arcface_match,
            "dlib_distance": r(self.dlib_distance),
            "dlib_threshold": self.dlib_threshold,
            "dlib_match": self.dlib_match,
            "redetected": self.redetected,
            "passed": self.passed,
        }


class Verifier:
    """Re-detects and re-embeds faces in verification crops. Build once per process (models load once).

    analyzer: the bundle's face analyzer (detector + ArcFace); None uses dlib's HOG detector only.
    use_arcface: False for smoke bundles (random ArcFace) or when there is no bundle.
    """

    def __init__(
        self,
        analyzer=None,
        use_arcface: bool = True,
        arcface_threshold: float = ARCFACE_THRESHOLD,
        dlib_threshold: float = DLIB_THRESHOLD,
        arcface_note: str | None = None,
        arcface_model: str | None = None,
    ):
        if analyzer is None:
            analyzer, use_arcface = DlibAnalyzer(recognizer=None), False
            arcface_note = arcface_note or "not used: no model bundle given (dlib only)"
        self.analyzer = analyzer
        self.use_arcface = bool(use_arcface)
        self.arcface_threshold = float(arcface_threshold) if self.use_arcface else None
        self.dlib_threshold = float(dlib_threshold)
        self.dlib = DlibRecognizer()
        self.arcface_note = arcface_note
        self.arcface_model = arcface_model
        self.size = VERIFY_SIZE

    def describe(self) -> dict:
        return {
            "arcface": {
                "used": self.use_arcface,
                "metric": "cosine similarity",
                "match_when": ">= threshold",
                "threshold": self.arcface_threshold,
                "model": self.arcface_model,
                **({"note": self.arcface_note} if self.arcface_note else {}),
            },
            "dlib": {
                "used": True,
                "metric": "euclidean distance",
                "match_when": "<= threshold",
                "threshold": self.dlib_threshold,
                "model": self.dlib.model_name,
                "model_sha256": self.dlib.model_sha256,
            },
            "crop_size": self.size,
            "rule": "a face passes when no recognizer in use matches",
        }

    # ------------------------------------------------------------------ crops
    def crop(self, rgb: np.ndarray, matrix: np.ndarray) -> np.ndarray:
        """The whole-face verification crop of ``rgb`` for a 2x3 matrix photo -> VERIFY_SIZE crop."""
        return warp_to_crop(np.ascontiguousarray(rgb), np.asarray(matrix, np.float64), self.size)

    def matrix_for(self, kps: np.ndarray) -> np.ndarray:
        return alignment_matrix(kps, self.size)

    def embed(self, crop: np.ndarray, fallback_face=None) -> Embedded:
        """Embed the face in a verification crop: the detection whose 5 points are nearest (within
        LOCATE_TOLERANCE of the side) to ``fallback_face``'s (crop coordinates; default: the template
        face the alignment put there), or, when there is none, that face itself (redetected False)."""
        expected = fallback_face if fallback_face is not None else template_face(self.size)
        face, redetected = locate_in_crop(
            self.analyzer, crop, near=expected.kps, tolerance=LOCATE_TOLERANCE * self.size, fallback=expected
        )
        arc = None
        if self.use_arcface:
            arc = np.asarray(self.analyzer.embed(crop, [face]), dtype=np.float64).reshape(-1)
            arc = arc / max(np.linalg.norm(arc), 1e-12)
        # 68 points are reusable only when they were predicted on this crop (not the fallback's)
        points = face.extra.get("landmarks68") if redetected else None
        return Embedded(face, redetected, self.dlib(crop, face.box, points), arc)

    def compare(self, ref: Embedded, out: Embedded) -> FaceCheck:
        cos = float(np.dot(ref.arcface, out.arcface)) if self.use_arcface else None
        return FaceCheck(
            cos, dlib_distance(ref.dlib, out.dlib), out.redetected, self.arcface_threshold, self.dlib_threshold
        )


SMOKE_ARCFACE_NOTE = (
    "not used: the smoke bundle's ArcFace is a random network, so the gate relies on the "
    "independent dlib recognizer alone"
)


def verify_thresholds(manifest: dict) -> tuple[float, float]:
    """(arcface_threshold, dlib_threshold) from a manifest's optional ``verify`` section; BundleError
    naming the problem when it is not an object of numbers in range."""
    cfg = manifest.get("verify") or {}
    if not isinstance(cfg, dict):
        raise BundleError(f"manifest 'verify' must be an object, got {cfg!r}")
    try:
        arc = float(cfg.get("arcface_threshold", ARCFACE_THRESHOLD))
        dl = float(cfg.get("dlib_threshold", DLIB_THRESHOLD))
    except (TypeError, ValueError):
        raise BundleError(f"manifest 'verify' thresholds must be numbers, got {cfg}") from None
    if not (-1.0 < arc < 1.0 and 0.0 < dl < 2.0):
        raise BundleError(
            f"manifest 'verify' thresholds out of range: arcface_threshold {arc} (cosine, in (-1, 1)), "
            f"dlib_threshold {dl} (distance, in (0, 2))"
        )
    return arc, dl


def verifier_for_bundle(bundle, analyzer=None) -> Verifier:
    """The gate's recognizers for a bundle: its detector and ArcFace (not for smoke bundles) plus dlib.
    Thresholds can be overridden in the manifest: ``"verify": {"arcface_threshold": 0.3,
    "dlib_threshold": 0.55}`` (after calibrating on your own data; docs/verification.md)."""
    arc, dl = verify_thresholds(bundle.manifest)
    if analyzer is None:
        analyzer = load_face_analyzer(bundle.faces, bundle.root)
    return Verifier(
        analyzer,
        use_arcface=not bundle.smoke,
        arcface_threshold=arc,
        dlib_threshold=dl,
        arcface_note=SMOKE_ARCFACE_NOTE if bundle.smoke else None,
        arcface_model=bundle.faces.get("recognizer"),
    )


# ---------------------------------------------------------------------------------------- pairs after the fact
def aligned_matrix(shape, size: int) -> np.ndarray:
    """2x3 matrix from an aligned face image (template framing at any size) to a ``size`` crop."""
    h, w = shape[:2]
    return np.array([[size / w, 0.0, 0.5 * size / w - 0.5], [0.0, size / h, 0.5 * size / h - 0.5]])
