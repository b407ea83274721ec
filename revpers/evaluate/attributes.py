"""Attribute preservation: head pose and expression from dlib's 68 landmarks; gaze is not measured.

Landmarks. Both faces of a pair are read in the same verification crop (the original face's
whole-face alignment, ``VERIFY_SIZE`` px, see ``pairs.py``), with dlib's 68-point predictor (the
re-detection of the dlib analyzer keeps them; with another detector they are predicted at its box).
Because both crops use the same similarity warp, differences of pose and expression between the
two faces are the differences in the photo (the warp only adds the same in-plane rotation to both).

Head pose (``head_pose``). ``cv2.solvePnP`` (SQPnP, a globally optimal solver) fits a 3D face
template to the 68 points with a pinhole camera whose focal length is the crop side (a field of
view of about 53 degrees) and whose principal point is the crop centre (the eye midpoint's column
of the original face). The template is the 68-point 3D mean shape insightface ships in its wheel
(``insightface/data/objects/meanshape_68.pkl``, the mean shape its ``landmark_3d_68`` model
regresses around), made exactly left-right symmetric by averaging it with its mirror image and
re-expressed in OpenCV's camera axes (x right, y down, z away from the camera). The rotation is
read as R = Rz(roll) Ry(yaw) Rx(pitch): yaw turns the head left/right (positive: the face turned
toward the image's left), pitch nods, roll tilts (an in-plane rotation of the image about the
principal point changes roll only).
With a symmetric template and the principal point on the mirror axis, a mirrored set of landmarks
gives exactly the mirrored pose (yaw and roll change sign, pitch is unchanged), which the tests
check; the absolute angles carry the template's and the camera's approximation.

Expression (``expression_difference``). The anonymized face's 68 points are mapped onto the
original's by the least-squares similarity over the rigid points (eye corners, nose bridge and
base: they move with the head, not with the expression), then the mean distance over the points
that move with expression (brows 17-26, eye lids 36-47, mouth 48-67) is divided by the original's
outer-eye-corner distance. Unit: fraction of the inter-ocular distance (0 = the same expression
and shape; it also contains the two people's face-shape difference and any pose difference that a
similarity transform cannot undo, so compare configurations, not absolute values).

Gaze is not measured: that needs iris or pupil landmarks (mediapipe's face mesh with iris or a gaze
network), and none installs offline beside this environment (mediapipe pins numpy < 2). dlib's 68
points outline the eye lids only. Reports say so instead of giving a number.
"""

from __future__ import annotations

import importlib.util
import pathlib
import pickle
from functools import lru_cache

import cv2
import numpy as np

from revpers.faces.align import similarity_lstsq

# index of each iBUG 68 point's mirror image (the subject's left <-> right)
MIRROR_68 = np.array(
    list(range(16, -1, -1))  # jaw 0..16
    + list(range(26, 16, -1))  # brows 17..26
    + [27, 28, 29, 30]  # nose bridge
    + [35, 34, 33, 32, 31]  # nose base
    + [45, 44, 43, 42, 47, 46]  # eye 36..41 <-> 42..47
    + [39, 38, 37, 36, 41, 40]
    + [54, 53, 52, 51, 50, 49, 48]  # outer lip top 48..54
    + [59, 58, 57, 56, 55]  # outer lip bottom 55..59
    + [64, 63, 62, 61, 60]  # inner lip top 60..64
    + [67, 66, 65]
)  # inner lip bottom 65..67
RIGID = np.array([27, 28, 29, 30, 31, 32, 33, 34, 35, 36, 39, 42, 45])  # eye corners, nose
EXPRESSIVE = np.r_[17:27, 36:48, 48:68]  # brows, eye lids, mouth
GAZE_SKIPPED = (
    "not measured: gaze needs iris/pupil landmarks (e.g. mediapipe's face mesh with iris, or a gaze "
    "network) and none installs offline here (mediapipe pins numpy < 2); dlib's 68 points outline "
    "only the eye lids"
)
POSE_TEMPLATE = "insightface/data/objects/meanshape_68.pkl (symmetrised)"


def mirror_points(points: np.ndarray, axis_x: float) -> np.ndarray:
    """The 68 points of the mirrored face (mirrored about the vertical line x = axis_x), relabelled
    so that each index names the same anatomical point again."""
    pts = np.asarray(points, np.float64).reshape(68, -1).copy()
    pts[:, 0] = 2.0 * axis_x - pts[:, 0]
    return pts[MIRROR_68]


@lru_cache(maxsize=1)
def pose_template() -> np.ndarray:
    """(68, 3) float64 object points in OpenCV axes, left-right symmetric, eye distance about 1."""
    spec = importlib.util.find_spec("insightface")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("insightface is not installed; its wheel carries the 3D face template used for head pose")
    path = pathlib.Path(spec.submodule_search_locations[0]) / "data" / "objects" / "meanshape_68.pkl"
    with open(path, "rb") as fh:
        mean = np.asarray(pickle.load(fh), dtype=np.float64).reshape(68, 3)
    # insightface's mean shape: x to image right, y down, z toward the viewer; OpenCV's z points away
    mean = mean * np.array([1.0, 1.0, -1.0])
    mean = mean - mean[RIGID].mean(0)
    mirrored = mean[MIRROR_68] * np.array([-1.0, 1.0, 1.0])
    return 0.5 * (mean + mirrored)


def camera_matrix(side: float) -> np.ndarray:
    f = float(side)
    return np.array([[f, 0.0, side / 2.0], [0.0, f, side / 2.0], [0.0, 0.0, 1.0]])


def euler_from_rotation(r: np.ndarray) -> tuple[float, float, float]:
    """(yaw, pitch, roll) in degrees of R = Rz(roll) Ry(yaw) Rx(pitch)."""
    yaw = np.degrees(np.arcsin(np.clip(-r[2, 0], -1.0, 1.0)))
    pitch = np.degrees(np.arctan2(r[2, 1], r[2, 2]))
    roll = np.degrees(np.arctan2(r[1, 0], r[0, 0]))
    return float(yaw), float(pitch), float(roll)


def head_pose(landmarks68: np.ndarray, side: float) -> dict:
    """Yaw, pitch, roll (degrees) of a face from its 68 points in a ``side`` px square crop whose
    centre is the principal point; ``reprojection_px`` is the fit's RMS error."""
    pts = np.ascontiguousarray(np.asarray(landmarks68, np.float64).reshape(68, 2))
    obj = pose_template()
    k = camera_matrix(side)
    ok, rvec, tvec = cv2.solvePnP(obj, pts, k, None, flags=cv2.SOLVEPNP_SQPNP)
    if not ok:
        raise ValueError("solvePnP found no head pose for these landmarks")
    r, _ = cv2.Rodrigues(rvec)
    if np.linalg.det(r) < 0:  # pragma: no cover - SQPnP returns rotations
        raise ValueError("solvePnP returned a reflection")
    proj, _ = cv2.projectPoints(obj, rvec, tvec, k, None)
    rms = float(np.sqrt(np.mean(np.sum((proj.reshape(68, 2) - pts) ** 2, axis=1))))
    yaw, pitch, roll = euler_from_rotation(r)
    return {"yaw": yaw, "pitch": pitch, "roll": roll, "reprojection_px": rms}


def pose_difference(a: dict, b: dict) -> dict:
    """Absolute per-axis differences (degrees, roll wrapped to [0, 180]) and their L2 norm in radians."""
    d = {}
    for axis in ("yaw", "pitch", "roll"):
        v = abs(a[axis] - b[axis]) % 360.0
        d[axis] = float(min(v, 360.0 - v))
    d["l2_rad"] = float(np.radians(np.sqrt(d["yaw"] ** 2 + d["pitch"] ** 2 + d["roll"] ** 2)))
    return d


def inter_ocular(landmarks68: np.ndarray) -> float:
    pts = np.asarray(landmarks68, np.float64).reshape(68, 2)
    return float(np.linalg.norm(pts[45] - pts[36]))


def expression_difference(original68: np.ndarray, other68: np.ndarray) -> float:
    """Mean distance of the expressive points after a similarity fit on the rigid points, as a
    fraction of the original's outer-eye-corner distance."""
    a = np.asarray(original68, np.float64).reshape(68, 2)
    b = np.asarray(other68, np.float64).reshape(68, 2)
    m = similarity_lstsq(b[RIGID], a[RIGID])
    b2 = b @ m[:, :2].T + m[:, 2]
    return float(np.mean(np.linalg.norm(b2[EXPRESSIVE] - a[EXPRESSIVE], axis=1)) / max(inter_ocular(a), 1e-9))


__all__ = [
    "GAZE_SKIPPED",
    "MIRROR_68",
    "expression_difference",
    "head_pose",
    "mirror_points",
    "pose_difference",
    "pose_template",
]
