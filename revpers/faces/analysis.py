"""Face detection, 5-point landmarks and ArcFace identity embeddings behind one interface.

Two backends, chosen by the ``faces`` section of the bundle manifest: ``insightface`` (SCRFD +
ArcFace from a local model pack; production) and ``dlib`` (HOG + 68-point landmarks, all from PyPI;
the offline default). Their options, why dlib is the offline default, and measured times are in
docs/faces.md.
"""

from __future__ import annotations

import copy
import importlib.util
import os
import pathlib
import threading
import warnings
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Protocol, runtime_checkable

import cv2
import numpy as np

from revpers.core.errors import FaceModelError

INSIGHTFACE_DETECTOR_FILE = "det_10g.onnx"
HOG_MIN_FACE_PX = 80  # dlib's frontal HOG window
ROLL_REFINE_DEG = 8.0  # landmarks of faces tilted more than this are predicted again, levelled
CROP_DETECT_SIDE = 320  # aligned crops are searched at this size by the dlib backend


@dataclass
class Face:
    """One detected face in image pixel coordinates.

    ``kps`` follows insightface's order: left eye, right eye, nose tip, left mouth corner,
    right mouth corner, where "left" is image left (the subject's right).
    """

    box: np.ndarray  # (4,) float32 x1, y1, x2, y2
    score: float
    kps: np.ndarray  # (5, 2) float32
    extra: dict = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self):
        self.box = np.asarray(self.box, dtype=np.float32).reshape(4)
        self.kps = np.asarray(self.kps, dtype=np.float32).reshape(5, 2)
        self.score = float(self.score)

    @property
    def area(self) -> float:
        return float(max(0.0, self.box[2] - self.box[0]) * max(0.0, self.box[3] - self.box[1]))

    @property
    def side(self) -> float:
        """Longer side of the detector box in pixels."""
        return float(max(self.box[2] - self.box[0], self.box[3] - self.box[1]))


@runtime_checkable
class FaceAnalyzer(Protocol):
    name: str

    def detect(self, rgb: np.ndarray) -> list[Face]:
        """All faces in an (H, W, 3) uint8 RGB image."""
        ...

    def embed(self, rgb: np.ndarray, faces: list[Face]) -> np.ndarray:
        """(F, E) float32 unit-length ArcFace embeddings, one row per face."""
        ...


def _check_rgb(rgb: np.ndarray) -> np.ndarray:
    rgb = np.asarray(rgb)
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
        raise ValueError(f"expected an (H, W, 3) uint8 RGB image, got shape {rgb.shape} dtype {rgb.dtype}")
    return np.ascontiguousarray(rgb)


# ---------------------------------------------------------------------------------------- recognizer
class ArcFaceRecognizer:
    """ArcFace contract: ``face_align.norm_crop(img_bgr, kps, 112)`` then the ONNX network.

    insightface's ``ArcFaceONNX`` runner does the (x - 127.5) / 127.5 normalisation and the
    BGR->RGB swap its models expect, so images are handed to it in BGR.
    """

    def __init__(self, path: pathlib.Path):
        path = pathlib.Path(path)
        if not path.is_file():
            raise FaceModelError(f"face recognizer {path} does not exist")
        import onnxruntime
        from insightface.model_zoo.arcface_onnx import ArcFaceONNX

        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        self.runner = ArcFaceONNX(model_file=str(path), session=session)
        self.input_size = int(self.runner.input_size[0])
        dim = self.runner.output_shape[-1] if self.runner.output_shape else None
        self.dim = int(dim) if isinstance(dim, int) else None
        self.path = path

    def blob(self, rgb: np.ndarray, faces: list[Face]) -> np.ndarray:
        """The network input for ``faces``: (F, 3, S, S) float32, aligned and normalised exactly as
        insightface's ``ArcFaceONNX.get_feat`` prepares it."""
        from insightface.utils import face_align

        bgr = cv2.cvtColor(_check_rgb(rgb), cv2.COLOR_RGB2BGR)
        with warnings.catch_warnings():  # insightface calls skimage's deprecated SimilarityTransform.estimate
            warnings.simplefilter("ignore", FutureWarning)
            chips = [
                face_align.norm_crop(bgr, landmark=f.kps.astype(np.float32), image_size=self.input_size) for f in faces
            ]
        r = self.runner
        blob = cv2.dnn.blobFromImages(
            chips,
            1.0 / r.input_std,
            (self.input_size, self.input_size),
            (r.input_mean, r.input_mean, r.input_mean),
            swapRB=True,
        )
        return np.ascontiguousarray(blob, dtype=np.float32)

    def features(self, blob: np.ndarray) -> np.ndarray:
        """Run the network on a prepared blob (subclasses run it elsewhere, e.g. on Triton)."""
        return self.runner.session.run(self.runner.output_names, {self.runner.input_name: blob})[0]

    def __call__(self, rgb: np.ndarray, faces: list[Face]) -> np.ndarray:
        if not faces:
            dim = self.dim if self.dim is not None else 512
            return np.zeros((0, dim), dtype=np.float32)
        feats = np.asarray(self.features(self.blob(rgb, faces)), dtype=np.float32).reshape(len(faces), -1)
        norms = np.linalg.norm(feats, axis=1, keepdims=True)
        if not np.all(np.isfinite(norms)) or np.any(norms == 0):
            raise FaceModelError(f"recognizer {self.path.name} produced a zero or non-finite embedding")
        return feats / norms


# ---------------------------------------------------------------------------------------- dlib backend
def face_recognition_models_dir() -> pathlib.Path:
    """The ``models`` folder of the face-recognition-models package, found without importing it
    (its ``__init__`` imports pkg_resources, which setuptools >= 81 no longer provides)."""
    spec = importlib.util.find_spec("face_recognition_models")
    if spec is None or not spec.submodule_search_locations:
        raise FaceModelError(
            "the package face-recognition-models is not installed "
            "(pip install face-recognition-models); it carries dlib's landmark model"
        )
    for loc in spec.submodule_search_locations:
        models = pathlib.Path(loc) / "models"
        if models.is_dir():
            return models
    raise FaceModelError("face-recognition-models is installed but has no models/ folder")


# dlib's shape predictor and ResNet are loaded once per process and shared (the BLS model's request
# threads, the verification gate). dlib's documentation: the shape predictor may be used from many
# threads at once; an object_detector (the HOG face detector) may not, so each thread has its own
# (built in, no file: cheap); the ResNet (a dnn network) may not either, and every use of it holds
# this lock. dlib releases the GIL while it computes, so a no-face image's detection runs beside a
# 6-face photo's instead of waiting for it.
DLIB_LOCK = threading.Lock()


@lru_cache(maxsize=2)
def _shape_predictor(path: str):
    import dlib

    return dlib.shape_predictor(path)


@lru_cache(maxsize=1)
def _hog_prototype():
    """dlib's built-in HOG face detector, read once (about 180 ms); never run, only copied."""
    import dlib

    return dlib.get_frontal_face_detector()


_HOG_COPY_LOCK = threading.Lock()


@lru_cache(maxsize=64)
def _hog_detector(thread: int):
    """The HOG face detector of thread ``thread`` (``threading.get_ident()``): a copy of the
    prototype (about 1 ms). An ident is reused only after its thread ended, and an evicted
    detector is replaced, never shared."""
    with _HOG_COPY_LOCK:  # dlib: copying is safe while nothing else uses the object
        return copy.copy(_hog_prototype())


def five_from_68(pts: np.ndarray) -> np.ndarray:
    """dlib/iBUG 68 points -> insightface 5 points (image-left eye first)."""
    pts = np.asarray(pts, dtype=np.float64).reshape(68, 2)
    return np.stack([pts[36:42].mean(0), pts[42:48].mean(0), pts[30], pts[48], pts[54]]).astype(np.float32)


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    x1, y1 = max(a[0], b[0]), max(a[1], b[1])
    x2, y2 = min(a[2], b[2]), min(a[3], b[3])
    inter = max(0.0, x2 - x1) * max(0.0, y2 - y1)
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return float(inter / union) if union > 0 else 0.0


def _overlaps(box: np.ndarray, kept: list[Face], iou: float = 0.3) -> bool:
    for f in kept:
        if _iou(box, f.box) > iou:
            return True
        cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2  # centre of one inside the other
        if f.box[0] <= cx <= f.box[2] and f.box[1] <= cy <= f.box[3]:
            return True
        fx, fy = (f.box[0] + f.box[2]) / 2, (f.box[1] + f.box[3]) / 2
        if box[0] <= fx <= box[2] and box[1] <= fy <= box[3]:
            return True
    return False


def _rotated_canvas(rgb: np.ndarray, angle: float) -> tuple[np.ndarray, np.ndarray]:
    """Rotate by ``angle`` degrees (counter-clockwise) on a canvas that holds the whole image.
    Returns the rotated image and the 2x3 matrix image -> rotated."""
    h, w = rgb.shape[:2]
    m = cv2.getRotationMatrix2D((w / 2.0, h / 2.0), angle, 1.0)
    c, s = abs(m[0, 0]), abs(m[0, 1])
    nw, nh = int(np.ceil(h * s + w * c)), int(np.ceil(h * c + w * s))
    m[0, 2] += nw / 2.0 - w / 2.0
    m[1, 2] += nh / 2.0 - h / 2.0
    return cv2.warpAffine(rgb, m, (nw, nh), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT), m


class DlibAnalyzer:
    name = "dlib"

    def __init__(
        self,
        recognizer: ArcFaceRecognizer,
        landmarks: pathlib.Path | None = None,
        upsample: int = 1,
        max_pixels: float = 24e6,
        rotations=(-30.0, 30.0),
        min_score: float = 0.0,
    ):
        landmarks = (
            pathlib.Path(landmarks)
            if landmarks
            else face_recognition_models_dir() / "shape_predictor_68_face_landmarks.dat"
        )
        if not landmarks.is_file():
            raise FaceModelError(f"dlib landmark model {landmarks} does not exist")
        self.predictor = _shape_predictor(str(landmarks))
        _hog_detector(threading.get_ident())  # loaded now, not in the first request
        self.recognizer = recognizer
        self.upsample = int(upsample)
        self.max_pixels = float(max_pixels)
        self.rotations = tuple(float(a) for a in rotations)
        self.min_score = float(min_score)

    def _upsample_for(self, shape) -> int:
        n, px = self.upsample, float(shape[0] * shape[1])
        while n > 0 and px * 4**n > self.max_pixels:
            n -= 1
        return n

    def _predict(self, img: np.ndarray, rect) -> np.ndarray:
        shape = self.predictor(img, rect)
        return np.array([(p.x, p.y) for p in shape.parts()], dtype=np.float64)

    def _landmarks(self, img: np.ndarray, rect) -> np.ndarray:
        """68 landmarks; for a tilted head they are predicted again on a patch rotated so that the
        eye line is level (the predictor, like the detector, is trained on upright faces: on t1.jpg
        turned by 25 degrees this moves one face's points by up to 18 px onto the right place)."""
        import dlib

        pts = self._predict(img, rect)
        side = float(max(rect.width(), rect.height()))
        for _ in range(2):
            eyes = pts[36:42].mean(0), pts[42:48].mean(0)
            roll = float(np.degrees(np.arctan2(eyes[1][1] - eyes[0][1], eyes[1][0] - eyes[0][0])))
            if abs(roll) < ROLL_REFINE_DEG:
                break
            centre = (float(rect.left() + rect.right()) / 2.0, float(rect.top() + rect.bottom()) / 2.0)
            size = int(np.ceil(3 * side))
            m = cv2.getRotationMatrix2D(centre, roll, 1.0)
            m[:, 2] += np.array([size / 2.0, size / 2.0]) - np.asarray(centre)
            patch = cv2.warpAffine(img, m, (size, size), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
            half = side / 2.0
            r = dlib.rectangle(
                int(round(size / 2 - half)),
                int(round(size / 2 - half)),
                int(round(size / 2 + half)) - 1,
                int(round(size / 2 + half)) - 1,
            )
            inv = cv2.invertAffineTransform(m)
            pts = self._predict(patch, r) @ inv[:, :2].T + inv[:, 2]
        return pts

    def _pass(self, img: np.ndarray, upsample: int, small_only: bool) -> list[tuple]:
        rects, scores, _ = _hog_detector(threading.get_ident()).run(img, upsample, self.min_score)
        out = []
        for r, s in zip(rects, scores):
            if small_only and max(r.width(), r.height()) >= HOG_MIN_FACE_PX:
                continue
            out.append((r, float(s)))
        return out

    def detect(self, rgb: np.ndarray) -> list[Face]:
        return self._detect(_check_rgb(rgb))

    def _detect(self, rgb: np.ndarray) -> list[Face]:
        kept: list[Face] = []

        def add(cands, img, back: np.ndarray | None, pass_name: str):
            for r, s in sorted(cands, key=lambda c: -c[1]):
                pts = self._landmarks(img, r)
                box = np.array([r.left(), r.top(), r.right() + 1, r.bottom() + 1], dtype=np.float64)
                if back is not None:  # map rotated-frame results back into the photo
                    pts = pts @ back[:, :2].T + back[:, 2]
                    c = np.array([(box[0] + box[2]) / 2, (box[1] + box[3]) / 2]) @ back[:, :2].T + back[:, 2]
                    hw, hh = (box[2] - box[0]) / 2, (box[3] - box[1]) / 2
                    box = np.array([c[0] - hw, c[1] - hh, c[0] + hw, c[1] + hh])
                if _overlaps(box, kept):
                    continue
                kept.append(Face(box=box, score=s, kps=five_from_68(pts), extra={"pass": pass_name}))

        add(self._pass(rgb, 0, False), rgb, None, "upright")
        up = self._upsample_for(rgb.shape)
        if up > 0:
            add(self._pass(rgb, up, True), rgb, None, f"upright x{2**up}")
        for angle in self.rotations:
            rot, m = _rotated_canvas(rgb, angle)
            add(self._pass(rot, 0, False), rot, cv2.invertAffineTransform(m), f"rotated {angle:g}")
        return sorted(kept, key=lambda f: (float(f.box[0]), float(f.box[1])))

    def detect_in_crop(self, crop: np.ndarray) -> list[Face]:
        """Detection on an aligned whole-face crop, where the face is upright and about half the
        side wide by construction: the crop is resized to CROP_DETECT_SIDE px and searched once,
        upright, without upsampling (about 20 ms instead of ~0.5 s for all passes on 1024 px).
        When the crop is already CROP_DETECT_SIDE px (the verification gate's crops), the 68 points
        were predicted on the crop's own pixels and are kept in ``Face.extra["landmarks68"]`` so dlib's
        recognizer need not predict them again."""
        crop = _check_rgb(crop)
        k = CROP_DETECT_SIDE / float(crop.shape[0])
        interp = cv2.INTER_AREA if k < 1 else cv2.INTER_CUBIC
        img = np.ascontiguousarray(cv2.resize(crop, (CROP_DETECT_SIDE, CROP_DETECT_SIDE), interpolation=interp))
        faces = []
        found = [(r, s, self._landmarks(img, r)) for r, s in self._pass(img, 0, False)]
        for r, s, pts in found:
            pts = (pts + 0.5) / k - 0.5
            box = np.array([r.left(), r.top(), r.right() + 1, r.bottom() + 1], dtype=np.float64) / k
            extra = {"pass": "crop", **({"landmarks68": pts} if k == 1.0 else {})}
            faces.append(Face(box=box, score=s, kps=five_from_68(pts), extra=extra))
        return faces

    def embed(self, rgb: np.ndarray, faces: list[Face]) -> np.ndarray:
        return self.recognizer(rgb, faces)


# ---------------------------------------------------------------------------------------- insightface
class InsightFaceAnalyzer:
    """SCRFD (det_10g.onnx) + ArcFace (w600k_r50.onnx) from a local buffalo_l-style pack."""

    name = "insightface"

    def __init__(
        self,
        pack: pathlib.Path,
        recognizer: ArcFaceRecognizer,
        det_thresh: float = 0.1,
        det_size: int = 640,
        detector_file: str = INSIGHTFACE_DETECTOR_FILE,
    ):
        pack = pathlib.Path(pack)
        det_path = pack / detector_file
        if not pack.is_dir():
            raise FaceModelError(
                f"insightface model pack {pack} is not a directory (it is never downloaded: "
                f"put buffalo_l's {detector_file} and w600k_r50.onnx there)"
            )
        if not det_path.is_file():
            raise FaceModelError(f"insightface detector {det_path} does not exist")
        import onnxruntime
        from insightface.model_zoo.scrfd import SCRFD

        session = onnxruntime.InferenceSession(str(det_path), providers=["CPUExecutionProvider"])
        self.detector = SCRFD(model_file=str(det_path), session=session)
        self.detector.prepare(-1, input_size=(int(det_size), int(det_size)), det_thresh=float(det_thresh))
        self.recognizer = recognizer
        self.det_thresh = float(det_thresh)
        self._lock = threading.Lock()

    def detect(self, rgb: np.ndarray) -> list[Face]:
        bgr = cv2.cvtColor(_check_rgb(rgb), cv2.COLOR_RGB2BGR)
        with self._lock:  # one SCRFD object, shared by the BLS model's request threads
            dets, kpss = self.detector.detect(bgr, max_num=0, metric="default")
        if kpss is None and len(dets):
            raise FaceModelError("the SCRFD model gives no keypoints; use a pack with a 5-point detector")
        faces = [Face(box=d[:4], score=float(d[4]), kps=k) for d, k in zip(dets, kpss if kpss is not None else [])]
        return sorted(faces, key=lambda f: (float(f.box[0]), float(f.box[1])))

    def embed(self, rgb: np.ndarray, faces: list[Face]) -> np.ndarray:
        return self.recognizer(rgb, faces)


# ---------------------------------------------------------------------------------------- loader
def load_face_analyzer(spec: dict, root: pathlib.Path, det_thresh: float = 0.1, det_size: int = 640) -> FaceAnalyzer:
    """Build the analyzer named by a bundle manifest's ``faces`` section (paths relative to ``root``)."""
    root = pathlib.Path(root)
    spec = dict(spec or {})
    kind = str(spec.get("detector", "")).lower()
    if "recognizer" not in spec:
        raise FaceModelError(f"faces spec {spec} names no recognizer ONNX file")
    if kind not in ("dlib", "insightface"):
        raise FaceModelError(f"unknown face detector {spec.get('detector')!r}; expected 'dlib' or 'insightface'")
    recognizer = ArcFaceRecognizer(root / spec["recognizer"])
    if kind == "dlib":
        landmarks = spec.get("landmarks")
        return DlibAnalyzer(
            recognizer,
            landmarks=root / landmarks if landmarks else None,
            upsample=int(spec.get("upsample", 1)),
            max_pixels=float(spec.get("max_pixels", 24e6)),
            rotations=spec.get("rotations", (-30.0, 30.0)),
            min_score=float(spec.get("min_score", 0.0)),
        )
    if "pack" not in spec:
        raise FaceModelError("the insightface detector needs 'pack' (a local buffalo_l-style directory)")
    return InsightFaceAnalyzer(
        root / spec["pack"],
        recognizer,
        det_thresh=float(spec.get("det_thresh", det_thresh)),
        det_size=int(spec.get("det_size", det_size)),
        detector_file=str(spec.get("detector_file", INSIGHTFACE_DETECTOR_FILE)),
    )


def buffalo_pack_from_env() -> pathlib.Path | None:
    """``REVPERS_BUFFALO_L``: a local buffalo_l pack, used by tests of the production backend."""
    value = os.environ.get("REVPERS_BUFFALO_L")
    return pathlib.Path(value).expanduser() if value else None
