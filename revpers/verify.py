"""Identity verification gate: prove that each output face no longer matches its input face.

Two recognizers measure every output face against its own input face:

* the bundle's ArcFace (the identity model the generator is steered against): cosine similarity
  of unit embeddings; the face still *matches* when cosine >= ``ARCFACE_THRESHOLD``;
* dlib's 128-d ResNet (``dlib_face_recognition_resnet_model_v1.dat`` from the PyPI package
  face-recognition-models), independent of the generator: Euclidean distance of descriptors;
  the face still *matches* when distance <= ``DLIB_THRESHOLD``.

A face passes when neither recognizer matches. With a smoke bundle the ArcFace is random, so the
gate relies on dlib alone and every report says so. Operating points, their sources and the
failure policy are in docs/verification.md.

Measurement. Both images are warped with the *input* face's alignment (the whole-face crop of
``faces/align.py``) to a ``VERIFY_SIZE`` crop, so output and input are compared at the same place.
In each crop the face is re-detected (the analyzer's detector) and the detection whose 5 points are
nearest the expected ones is embedded. When no face is re-detected in the output (heavy blur, a
broken generation), the output is embedded at the input face's landmarks and ``redetected`` is
False: a vanished face is not a pass by itself, the similarities at the input's place decide.

Policy (``VerifyPolicy``): on failure retry with a new seed and/or stronger (more negative)
guidance up to ``retries`` times, all failing faces of a request in one generator batch per
retry, then fall back to blur, pixelate, or reject the image.
"""

from __future__ import annotations

import hashlib
import math
import time
from dataclasses import dataclass, field, replace
from functools import lru_cache
from typing import Callable

import numpy as np

from .pipeline import ParameterError, Params, coerce_number, given_values

VERIFY_SIZE = 320  # side of the whole-face crop both recognizers read (eye distance 80 px)
DLIB_THRESHOLD = 0.6  # Euclidean distance; dlib's documented operating point (99.38 % on LFW)
ARCFACE_THRESHOLD = 0.28  # cosine; FAR 0.1 % on LFW for an insightface ArcFace (docs/verification.md)
ROUND = 4  # digits kept in reports and audit records
SEED_STRIDE = 1_000_003  # retry a's seed is the face's seed + a * SEED_STRIDE (mod 2**63)
MAX_RETRIES = 5
RETRY_MODES = ("seed", "guidance", "both")
FALLBACKS = ("blur", "pixelate", "reject")
LOCATE_TOLERANCE = 0.1  # a re-detected face must have its 5 points within this fraction of the crop

# per-face verdicts (report["faces"][i]["verdict"])
PASSED = "passed"  # generated, and neither recognizer matches the input face
FALLBACK_VERDICT = {"blur": "fallback_blurred", "pixelate": "fallback_pixelated"}  # gate failed, obscured
REJECTED = "rejected"  # gate failed every attempt and the policy rejects the image
FAILED = "failed"  # the final pixels still match (e.g. a blurred fallback a recognizer still matches)
NOT_GENERATED = "not_generated"  # blurred/pixelated by the face-size policy; not gated
LEFT = "left"  # left unchanged by the face-size policy ("leave"); not gated
UNVERIFIED = "unverified"  # verification switched off
FACE_VERDICTS = (PASSED, "fallback_blurred", "fallback_pixelated", REJECTED, FAILED, NOT_GENERATED, LEFT, UNVERIFIED)
# per-image verdicts (report["verdict"]); "not_gated": faces were found, but the face-size policy
# obscured every one of them, so none went through the gate
IMAGE_VERDICTS = ("passed", "fallback", "partial", "not_gated", "rejected", "no_faces", "unverified")


# ---------------------------------------------------------------------------------------- policy
@dataclass(frozen=True)
class VerifyPolicy:
    """What to do when an output face still matches its input face.

    verify: run the gate at all. retries: extra generation attempts (0..MAX_RETRIES) for failing
    faces. retry_mode: "seed" (new seed), "guidance" (guidance - attempt * guidance_step), or
    "both". fallback: after the last failed attempt, "blur" or "pixelate" the face (the input
    face, obscured as the face-size policy does) or "reject" the whole image (no image returned).
    """

    verify: bool = True
    retries: int = 2
    retry_mode: str = "both"
    guidance_step: float = 2.0
    fallback: str = "blur"

    KEYS = ("verify", "retries", "retry_mode", "guidance_step", "fallback")

    def __post_init__(self):
        if not isinstance(self.verify, bool):
            raise ParameterError(f"verify must be true or false, got {self.verify!r}")
        if isinstance(self.retries, bool) or not isinstance(self.retries, int) or not 0 <= self.retries <= MAX_RETRIES:
            raise ParameterError(f"retries must be an integer in [0, {MAX_RETRIES}], got {self.retries!r}")
        if self.retry_mode not in RETRY_MODES:
            raise ParameterError(f"retry_mode must be one of {', '.join(RETRY_MODES)}, got {self.retry_mode!r}")
        if (isinstance(self.guidance_step, bool) or not isinstance(self.guidance_step, (int, float))
                or not math.isfinite(self.guidance_step) or not 0 < self.guidance_step <= 20):
            raise ParameterError(f"guidance_step must be a number in (0, 20], got {self.guidance_step!r}")
        if self.fallback not in FALLBACKS:
            raise ParameterError(f"fallback must be one of {', '.join(FALLBACKS)}, got {self.fallback!r}")

    @property
    def attempts(self) -> int:
        return 1 + (self.retries if self.verify else 0)

    def seed_for(self, seed: int, attempt: int) -> int:
        if attempt == 0 or self.retry_mode == "guidance":
            return int(seed)
        return int((seed + attempt * SEED_STRIDE) % 2**63)

    def params_for(self, params: Params, attempt: int) -> Params:
        if attempt == 0 or self.retry_mode == "seed":
            return params
        lo = Params.LIMITS["guidance"][0]
        return replace(params, guidance=max(lo, params.guidance - attempt * float(self.guidance_step)))

    def as_dict(self) -> dict:
        return {k: getattr(self, k) for k in self.KEYS}

    @classmethod
    def from_mapping(cls, values: dict) -> "VerifyPolicy":
        """Validated construction from untrusted input (Triton PARAMS, JSON); unknown keys refused."""
        kwargs = {}
        for key, raw in given_values(values, cls.KEYS, "verification parameter(s)").items():
            if key == "verify":
                if isinstance(raw, str) and raw.lower() in ("true", "on", "1", "false", "off", "0"):
                    raw = raw.lower() in ("true", "on", "1")
                if not isinstance(raw, bool):
                    raise ParameterError(f"verify must be true or false, got {raw!r}")
            elif key in ("retries", "guidance_step"):
                raw = coerce_number(key, raw, int if key == "retries" else float)
            kwargs[key] = raw
        return cls(**kwargs)


def pop_verify_policy(options: dict) -> VerifyPolicy:
    """Remove the verification keys from a request's option dict and validate them."""
    return VerifyPolicy.from_mapping({k: options.pop(k) for k in VerifyPolicy.KEYS if k in options})


# ---------------------------------------------------------------------------------------- dlib recognizer
@lru_cache(maxsize=1)
def _dlib_models() -> tuple:
    import dlib

    from .faces.analysis import FaceModelError, _shape_predictor, face_recognition_models_dir

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

        from .faces.analysis import DLIB_LOCK

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
        self.arcface_match = None if self.arcface_cosine is None else bool(self.arcface_cosine >= self.arcface_threshold)
        self.dlib_match = bool(self.dlib_distance <= self.dlib_threshold)

    @property
    def passed(self) -> bool:
        return not self.dlib_match and not bool(self.arcface_match)

    def as_dict(self) -> dict:
        r = lambda v: None if v is None else round(float(v), ROUND)  # noqa: E731
        return {"arcface_cosine": r(self.arcface_cosine), "arcface_threshold": self.arcface_threshold,
                "arcface_match": self.arcface_match, "dlib_distance": r(self.dlib_distance),
                "dlib_threshold": self.dlib_threshold, "dlib_match": self.dlib_match,
                "redetected": self.redetected, "passed": self.passed}


class Verifier:
    """Re-detects and re-embeds faces in verification crops. Build once per process (models load once).

    analyzer: the bundle's face analyzer (detector + ArcFace); None uses dlib's HOG detector only.
    use_arcface: False for smoke bundles (random ArcFace) or when there is no bundle.
    """

    def __init__(self, analyzer=None, use_arcface: bool = True, arcface_threshold: float = ARCFACE_THRESHOLD,
                 dlib_threshold: float = DLIB_THRESHOLD, arcface_note: str | None = None, arcface_model: str | None = None):
        if analyzer is None:
            from .faces.analysis import DlibAnalyzer

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
            "arcface": {"used": self.use_arcface, "metric": "cosine similarity", "match_when": ">= threshold",
                        "threshold": self.arcface_threshold, "model": self.arcface_model,
                        **({"note": self.arcface_note} if self.arcface_note else {})},
            "dlib": {"used": True, "metric": "euclidean distance", "match_when": "<= threshold",
                     "threshold": self.dlib_threshold, "model": self.dlib.model_name,
                     "model_sha256": self.dlib.model_sha256},
            "crop_size": self.size,
            "rule": "a face passes when no recognizer in use matches",
        }

    # ------------------------------------------------------------------ crops
    def crop(self, rgb: np.ndarray, matrix: np.ndarray) -> np.ndarray:
        """The whole-face verification crop of ``rgb`` for a 2x3 matrix photo -> VERIFY_SIZE crop."""
        from .faces.align import warp_to_crop

        return warp_to_crop(np.ascontiguousarray(rgb), np.asarray(matrix, np.float64), self.size)

    def matrix_for(self, kps: np.ndarray) -> np.ndarray:
        from .faces.align import alignment_matrix

        return alignment_matrix(kps, self.size)

    def embed(self, crop: np.ndarray, fallback_face=None) -> Embedded:
        """Embed the face in a verification crop: the detection whose 5 points are nearest (within
        LOCATE_TOLERANCE of the side) to ``fallback_face``'s (crop coordinates; default: the template
        face the alignment put there), or, when there is none, that face itself (redetected False)."""
        from .faces.align import locate_in_crop, template_face

        expected = fallback_face if fallback_face is not None else template_face(self.size)
        face, redetected = locate_in_crop(self.analyzer, crop, near=expected.kps,
                                          tolerance=LOCATE_TOLERANCE * self.size, fallback=expected)
        arc = None
        if self.use_arcface:
            arc = np.asarray(self.analyzer.embed(crop, [face]), dtype=np.float64).reshape(-1)
            arc = arc / max(np.linalg.norm(arc), 1e-12)
        # 68 points are reusable only when they were predicted on this crop (not the fallback's)
        points = face.extra.get("landmarks68") if redetected else None
        return Embedded(face, redetected, self.dlib(crop, face.box, points), arc)

    def compare(self, ref: Embedded, out: Embedded) -> FaceCheck:
        cos = float(np.dot(ref.arcface, out.arcface)) if self.use_arcface else None
        return FaceCheck(cos, dlib_distance(ref.dlib, out.dlib), out.redetected, self.arcface_threshold,
                         self.dlib_threshold)


class GateSession:
    """Checks of one request: the input faces' reference embeddings are computed once, and an
    output face is re-measured only when its verification crop changed (so re-rendering the photo
    after a retry re-checks exactly the faces whose pixels moved, neighbours included)."""

    def __init__(self, verifier: Verifier, refs: dict):
        """refs: face id -> (input image, 2x3 matrix image -> verification crop)."""
        self.v = verifier
        self.refs = refs
        self._ref: dict = {}
        self._last: dict = {}
        self.embeddings = 0
        self.seconds = 0.0  # time spent re-detecting and embedding

    def reference(self, i) -> Embedded:
        if i not in self._ref:
            t0 = time.perf_counter()
            img, m = self.refs[i]
            self._ref[i] = self.v.embed(self.v.crop(img, m))
            self.embeddings += 1
            self.seconds += time.perf_counter() - t0
        return self._ref[i]

    def check(self, outputs: Callable[[object], np.ndarray], ids) -> dict:
        """outputs(id) -> the output image that holds face ``id``; returns {id: FaceCheck}."""
        result = {}
        for i in ids:
            ref = self.reference(i)
            t0 = time.perf_counter()
            crop = self.v.crop(outputs(i), self.refs[i][1])
            key = hashlib.sha256(crop.tobytes()).digest()
            last = self._last.get(i)
            if last is None or last[0] != key:
                out = self.v.embed(crop, fallback_face=ref.face)
                self.embeddings += 1
                last = (key, self.v.compare(ref, out))
                self._last[i] = last
            self.seconds += time.perf_counter() - t0
            result[i] = last[1]
        return result


# ---------------------------------------------------------------------------------------- the gate loop
@dataclass
class GateOutcome:
    image: object  # what render() returned last; the caller withholds every image that holds a rejected id
    attempts: dict  # id -> list of attempt records
    final: dict  # id -> FaceCheck of the released pixels (empty when verification is off)
    fallback: dict  # id -> "blur" | "pixelate" for faces that fell back
    rejected: list  # ids that failed every attempt under fallback "reject"
    failed: list  # ids whose final pixels still match
    generator_batches: list  # faces per generator call


def run_gate(ids: list, generate: Callable, render: Callable, session: GateSession | None,
             policy: VerifyPolicy, outputs: Callable | None = None) -> GateOutcome:
    """Generate, check, retry the failing faces (one generator batch per attempt), fall back.

    generate(ids, attempt) -> {id: {"seed": s, "guidance": g}} (and stores the new crops);
    render(override) -> output (override: id -> "blur" | "pixelate");
    outputs(output, id) -> the image holding face ``id`` in that output (default: output itself).
    ``outcome.image`` is always the last render: with several images per output (aligned batches)
    only the images holding a rejected or failed id are withheld, by the caller.
    """
    outputs = outputs or (lambda out, i: out)
    attempts = {i: [] for i in ids}
    batches, pending, image = [], list(ids), None
    verify = policy.verify and session is not None
    for a in range(policy.attempts if verify else 1):
        if not pending:
            break
        meta = generate(pending, a)
        batches.append(len(pending))
        image = render({})
        if not verify:
            for i in pending:
                attempts[i].append({"attempt": a, **meta[i]})
            pending = []
            break
        checks = session.check(lambda i: outputs(image, i), pending)
        for i in pending:
            attempts[i].append({"attempt": a, **meta[i], **checks[i].as_dict()})
        pending = [i for i in pending if not checks[i].passed]
    if image is None:
        image = render({})
    fallback, rejected = {}, []
    if pending:  # verification on, every attempt failed
        if policy.fallback == "reject":
            rejected = list(pending)
        else:
            fallback = {i: policy.fallback for i in pending}
            image = render(fallback)
    final, failed = {}, []
    if verify and ids:  # the pixels to release; a rejected face's last attempt stands in its attempts
        final = session.check(lambda i: outputs(image, i), [i for i in ids if i not in rejected])
        failed = [i for i in ids if i in final and not final[i].passed]
    return GateOutcome(image, attempts, final, fallback, rejected, failed, batches)


def face_verdict(i, outcome: GateOutcome, policy: VerifyPolicy) -> str:
    if not policy.verify:
        return UNVERIFIED
    if i in outcome.rejected:
        return REJECTED
    if i in outcome.failed:
        return FAILED
    if i in outcome.fallback:
        return FALLBACK_VERDICT[outcome.fallback[i]]
    return PASSED


def image_verdict(verdicts: list[str], verify: bool) -> str:
    """One of IMAGE_VERDICTS (docs/verification.md)."""
    if not verdicts:
        return "no_faces"
    if not verify:
        return "unverified"
    if any(v in (REJECTED, FAILED) for v in verdicts):
        return "rejected"
    if any(v == LEFT for v in verdicts):
        return "partial"
    if all(v == NOT_GENERATED for v in verdicts):
        return "not_gated"
    if any(v.startswith("fallback_") for v in verdicts):
        return "fallback"
    return "passed"


def rejection_reason(faces: list[dict]) -> str:
    bad = [f for f in faces if f.get("verdict") in (REJECTED, FAILED)]
    parts = []
    for f in bad:
        if f["verdict"] == REJECTED:
            parts.append(f"face {f['index']} still matched its input after {len(f.get('attempts', []))} attempt(s) "
                         "(fallback: reject)")
        else:
            parts.append(f"face {f['index']} still matches its input in the final image "
                         f"(after action {f.get('action')!r})")
    return "; ".join(parts) + "; no image is returned"


SMOKE_ARCFACE_NOTE = ("not used: the smoke bundle's ArcFace is a random network, so the gate relies on the "
                      "independent dlib recognizer alone")


def verify_thresholds(manifest: dict) -> tuple[float, float]:
    """(arcface_threshold, dlib_threshold) from a manifest's optional ``verify`` section; BundleError
    naming the problem when it is not an object of numbers in range."""
    from .bundle import BundleError

    cfg = manifest.get("verify") or {}
    if not isinstance(cfg, dict):
        raise BundleError(f"manifest 'verify' must be an object, got {cfg!r}")
    try:
        arc = float(cfg.get("arcface_threshold", ARCFACE_THRESHOLD))
        dl = float(cfg.get("dlib_threshold", DLIB_THRESHOLD))
    except (TypeError, ValueError):
        raise BundleError(f"manifest 'verify' thresholds must be numbers, got {cfg}") from None
    if not (-1.0 < arc < 1.0 and 0.0 < dl < 2.0):
        raise BundleError(f"manifest 'verify' thresholds out of range: arcface_threshold {arc} (cosine, in (-1, 1)), "
                          f"dlib_threshold {dl} (distance, in (0, 2))")
    return arc, dl


def verifier_for_bundle(bundle, analyzer=None) -> Verifier:
    """The gate's recognizers for a bundle: its detector and ArcFace (not for smoke bundles) plus dlib.
    Thresholds can be overridden in the manifest: ``"verify": {"arcface_threshold": 0.3,
    "dlib_threshold": 0.55}`` (after calibrating on your own data; docs/verification.md)."""
    from .faces import load_face_analyzer

    arc, dl = verify_thresholds(bundle.manifest)
    if analyzer is None:
        analyzer = load_face_analyzer(bundle.faces, bundle.root)
    return Verifier(analyzer, use_arcface=not bundle.smoke, arcface_threshold=arc, dlib_threshold=dl,
                    arcface_note=SMOKE_ARCFACE_NOTE if bundle.smoke else None,
                    arcface_model=bundle.faces.get("recognizer"))


# ---------------------------------------------------------------------------------------- pairs after the fact
def verify_pair(verifier: Verifier, original: np.ndarray, anonymized: np.ndarray, aligned: bool = False) -> list[dict]:
    """Check every face of ``original`` against the same place in ``anonymized`` (same size).
    ``aligned``: the whole image is one aligned face (no detection in the original)."""
    original, anonymized = np.asarray(original), np.asarray(anonymized)
    if original.shape != anonymized.shape:
        raise ValueError(f"the images differ in size: original {original.shape[1]}x{original.shape[0]}, "
                         f"anonymized {anonymized.shape[1]}x{anonymized.shape[0]}; verify compares a photo "
                         "with its own anonymized output")
    if aligned:
        refs = {0: (original, aligned_matrix(original.shape, verifier.size))}
        boxes = {0: [0.0, 0.0, float(original.shape[1]), float(original.shape[0])]}
    else:
        faces = verifier.analyzer.detect(original)
        refs = {i: (original, verifier.matrix_for(f.kps)) for i, f in enumerate(faces)}
        boxes = {i: [round(float(v), 2) for v in f.box] for i, f in enumerate(faces)}
    session = GateSession(verifier, refs)
    checks = session.check(lambda i: anonymized, list(refs))
    return [{"index": i, "box": boxes[i], **checks[i].as_dict()} for i in refs]


def aligned_matrix(shape, size: int) -> np.ndarray:
    """2x3 matrix from an aligned face image (template framing at any size) to a ``size`` crop."""
    h, w = shape[:2]
    return np.array([[size / w, 0.0, 0.5 * size / w - 0.5], [0.0, size / h, 0.5 * size / h - 0.5]])


__all__ = ["VerifyPolicy", "pop_verify_policy", "Verifier", "GateSession", "FaceCheck", "run_gate", "verify_pair",
           "face_verdict", "image_verdict", "DLIB_THRESHOLD", "ARCFACE_THRESHOLD"]
