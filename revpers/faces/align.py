"""Whole-face alignment: a similarity transform from 5 landmarks to a fixed square crop.

Template. The standard ArcFace 112x112 5-point template (insightface ``face_align.arcface_dst``)
is a tight face chip. We keep its shape and scale/shift it so the crop shows the whole face with
hair and some background, as the paper's "whole face" crops do (their extractor fits the
DeepFaceLab mean face and pads it by 40 %, with a 7 % upward shift; in that framing the eyes sit
at 40 % of the height and the eye distance is about 25 % of the side):

* eye midpoint at (50 %, 40 %) of the crop,
* eye distance 25 % of the side (scale factor 0.25 * 112 / 35.24 = 0.795 on the ArcFace template),
* which puts the nose tip at 54.3 % and the mouth corners at 68.9 % of the height.

For comparison FFHQ crops have the same eye distance (24.6 %) but the eyes at 47 %: our crop
shows about 7 % more forehead and hair and less neck. Every face gets the same framing at any
size: 1024 px for SDXL, 64 px for the smoke bundle.

The transform is the least-squares similarity (rotation, uniform scale, translation; no
reflection) from the 5 detected points to the template, i.e. what
``cv2.estimateAffinePartial2D`` without RANSAC or skimage ``SimilarityTransform`` compute.
"""

from __future__ import annotations

from typing import NamedTuple

import cv2
import numpy as np

from revpers.faces.analysis import Face

# insightface face_align.arcface_dst: left eye, right eye, nose, left mouth, right mouth (image left first)
ARCFACE_112 = np.array(
    [[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366], [41.5493, 92.3655], [70.7299, 92.2041]],
    dtype=np.float64,
)

EYE_DISTANCE = 0.25  # of the crop side
EYE_CENTRE = (0.50, 0.40)  # (x, y) of the eye midpoint, fractions of the crop side


def _unit_template() -> np.ndarray:
    eyes = ARCFACE_112[:2]
    mid = eyes.mean(0)
    dist = float(np.linalg.norm(eyes[1] - eyes[0]))
    return (ARCFACE_112 - mid) * (EYE_DISTANCE / dist) + np.asarray(EYE_CENTRE)


TEMPLATE_UNIT = _unit_template()  # (5, 2) in fractions of the crop side


def template_points(size: int) -> np.ndarray:
    """The template's 5 points in an ``size`` x ``size`` crop (pixel coordinates, cv2 convention)."""
    return (TEMPLATE_UNIT * float(size)).astype(np.float32)


def similarity_lstsq(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """Least-squares similarity ``dst ~ [[a, -b], [b, a]] @ src + t`` as a 2x3 float64 matrix."""
    src = np.asarray(src, dtype=np.float64).reshape(-1, 2)
    dst = np.asarray(dst, dtype=np.float64).reshape(-1, 2)
    if src.shape != dst.shape or len(src) < 2:
        raise ValueError("need at least two corresponding points")
    n = len(src)
    a = np.zeros((2 * n, 4))
    a[0::2] = np.stack([src[:, 0], -src[:, 1], np.ones(n), np.zeros(n)], 1)
    a[1::2] = np.stack([src[:, 1], src[:, 0], np.zeros(n), np.ones(n)], 1)
    p, *_ = np.linalg.lstsq(a, dst.reshape(-1), rcond=None)
    ca, cb, tx, ty = p
    if ca * ca + cb * cb < 1e-12:
        raise ValueError("degenerate landmarks (all points coincide)")
    return np.array([[ca, -cb, tx], [cb, ca, ty]], dtype=np.float64)


def alignment_matrix(kps: np.ndarray, size: int) -> np.ndarray:
    """2x3 matrix photo -> crop that puts the 5 landmarks on the template."""
    kps = np.asarray(kps, dtype=np.float64).reshape(5, 2)
    if not np.all(np.isfinite(kps)):
        raise ValueError("landmarks are not finite")
    return similarity_lstsq(kps, template_points(size))


def crop_scale(matrix: np.ndarray) -> float:
    """Magnification from photo pixels to crop pixels (> 1: the face is upscaled)."""
    m = np.asarray(matrix, dtype=np.float64)
    return float(np.sqrt(abs(np.linalg.det(m[:, :2]))))


def transform_points(points: np.ndarray, matrix: np.ndarray) -> np.ndarray:
    m = np.asarray(matrix, dtype=np.float64)
    pts = np.asarray(points, dtype=np.float64).reshape(-1, 2)
    return pts @ m[:, :2].T + m[:, 2]


def crop_footprint(matrix: np.ndarray, size: int) -> np.ndarray:
    """The crop square's 4 corners in photo coordinates."""
    inv = cv2.invertAffineTransform(np.asarray(matrix, dtype=np.float64))
    corners = np.array([[0, 0], [size, 0], [size, size], [0, size]], dtype=np.float64) - 0.5
    return transform_points(corners, inv)


def warp_to_crop(rgb: np.ndarray, matrix: np.ndarray, size: int) -> np.ndarray:
    """Sample the crop. Upscaling uses bicubic interpolation; for downscaling the covered part of
    the photo is first reduced with area averaging (warpAffine alone would alias). Outside the
    photo the edge pixels are repeated (the generator sees no artificial white or black frame;
    only the part inside the photo is ever pasted back)."""
    m = np.asarray(matrix, dtype=np.float64)
    scale = crop_scale(m)
    h, w = rgb.shape[:2]
    if scale >= 1.0:
        return cv2.warpAffine(rgb, m, (size, size), flags=cv2.INTER_CUBIC, borderMode=cv2.BORDER_REPLICATE)
    corners = crop_footprint(m, size)
    x0 = int(np.clip(np.floor(corners[:, 0].min()) - 2, 0, w - 1))
    y0 = int(np.clip(np.floor(corners[:, 1].min()) - 2, 0, h - 1))
    x1 = int(np.clip(np.ceil(corners[:, 0].max()) + 3, x0 + 1, w))
    y1 = int(np.clip(np.ceil(corners[:, 1].max()) + 3, y0 + 1, h))
    sub = rgb[y0:y1, x0:x1]
    nw, nh = max(1, int(round(sub.shape[1] * scale))), max(1, int(round(sub.shape[0] * scale)))
    small = cv2.resize(sub, (nw, nh), interpolation=cv2.INTER_AREA)
    kx, ky = nw / sub.shape[1], nh / sub.shape[0]
    # photo point p = (q + 0.5) / k - 0.5 + origin for a point q of the reduced image
    to_photo = np.array([[1 / kx, 0, 0.5 / kx - 0.5 + x0], [0, 1 / ky, 0.5 / ky - 0.5 + y0]])
    m2 = m[:, :2] @ to_photo[:, :2]
    t2 = m[:, :2] @ to_photo[:, 2] + m[:, 2]
    return cv2.warpAffine(
        small, np.hstack([m2, t2[:, None]]), (size, size), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE
    )


def align_face(rgb: np.ndarray, kps: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Whole-face crop ``(size, size, 3)`` uint8 and the 2x3 float64 matrix photo -> crop."""
    rgb = np.asarray(rgb)
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
        raise ValueError(f"expected an (H, W, 3) uint8 RGB image, got shape {rgb.shape} dtype {rgb.dtype}")
    size = int(size)
    if size < 8:
        raise ValueError(f"crop size must be at least 8, got {size}")
    m = alignment_matrix(kps, size)
    return warp_to_crop(np.ascontiguousarray(rgb), m, size), m


# ---------------------------------------------------------------------------------------- identity
DETECTED_IN_CROP = "detected in crop"
TEMPLATE_FALLBACK = "template fallback"


class CropIdentity(NamedTuple):
    """``embedding`` (E,) float32 unit length; ``source`` is DETECTED_IN_CROP or TEMPLATE_FALLBACK."""

    embedding: np.ndarray
    source: str


def template_face(size: int) -> Face:
    """The face an aligned crop holds by construction: template landmarks, and a box around them
    (brows to chin, cheek to cheek). Used where nothing is detected in a crop: ArcFace aligns on its
    5 points, dlib's recognizer places its landmarks inside the box (``verify.py``)."""
    pts = template_points(size)
    box = np.array([0.22, 0.24, 0.78, 0.86], dtype=np.float32) * float(size)
    return Face(box=box, score=0.0, kps=pts)


def locate_in_crop(
    analyzer,
    crop: np.ndarray,
    near: np.ndarray | None = None,
    tolerance: float | None = None,
    fallback: Face | None = None,
) -> tuple[Face, bool]:
    """The face in an aligned crop, and whether the detector found it there.

    Detects on the crop (``analyzer.detect_in_crop`` when the backend has a faster path for
    aligned crops, else ``detect``). Without ``near``: the largest detection by box area. With
    ``near`` (5 expected points, crop pixels): the detection whose points are on average nearest,
    if that mean distance is at most ``tolerance`` px. When nothing is chosen: ``fallback``, else
    the template face (where the alignment put the face, exactly), and False.
    """
    detect = getattr(analyzer, "detect_in_crop", None) or analyzer.detect
    faces = detect(crop)
    best = None
    if near is None:
        best = max(faces, key=lambda f: f.area) if faces else None
    else:
        near = np.asarray(near, dtype=np.float64).reshape(5, 2)
        best_d = float("inf") if tolerance is None else float(tolerance)
        for f in faces:
            d = float(np.mean(np.linalg.norm(f.kps - near, axis=1)))
            if d <= best_d:
                best, best_d = f, d
    if best is not None:
        return best, True
    return (fallback if fallback is not None else template_face(crop.shape[0])), False


def identity_from_crop(analyzer, crop: np.ndarray) -> CropIdentity:
    """ArcFace embedding of the face in an aligned crop, as the paper computes it.

    The largest face the detector finds in the crop (``locate_in_crop``) is embedded. When the
    detector finds nothing (e.g. a 64 px smoke crop, or a face the detector cannot see), the
    template landmarks are used: they are where the alignment put the face, exactly, so the
    embedding is still well defined, and the result is flagged TEMPLATE_FALLBACK.
    """
    crop = np.ascontiguousarray(crop)
    if crop.ndim != 3 or crop.shape[2] != 3 or crop.shape[0] != crop.shape[1] or crop.dtype != np.uint8:
        raise ValueError(f"expected a square (S, S, 3) uint8 crop, got shape {crop.shape} dtype {crop.dtype}")
    face, found = locate_in_crop(analyzer, crop)
    emb = np.asarray(analyzer.embed(crop, [face]), dtype=np.float32).reshape(-1)
    return CropIdentity(emb, DETECTED_IN_CROP if found else TEMPLATE_FALLBACK)


def identities_of_crops(analyzer, crops: list[np.ndarray]) -> tuple[np.ndarray, list[str]]:
    """``identity_from_crop`` of each aligned crop: ((F, E) float32 embeddings, F sources)."""
    if not len(crops):
        raise ValueError("no crops to embed")
    embs, sources = [], []
    for crop in crops:
        emb, source = identity_from_crop(analyzer, crop)
        embs.append(np.asarray(emb, dtype=np.float32).reshape(-1))
        sources.append(source)
    return np.stack(embs), sources
