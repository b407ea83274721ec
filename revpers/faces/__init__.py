"""Faces in ordinary photos: detection + landmarks + ArcFace identity (``analysis``), whole-face
alignment (``align``), soft paste-back, blur and pixelate (``blend``) and the photo driver
(``photo``). See each module's docstring for the numbers and the reasons behind them."""

from revpers.faces.align import (
    DETECTED_IN_CROP,
    TEMPLATE_FALLBACK,
    CropIdentity,
    align_face,
    alignment_matrix,
    crop_scale,
    identities_of_crops,
    identity_from_crop,
    locate_in_crop,
    template_face,
    template_points,
)
from revpers.faces.analysis import Face, FaceAnalyzer, FaceModelError, load_face_analyzer
from revpers.faces.blend import face_alpha, full_alpha, obscure_face, paste_face
from revpers.faces.photo import FacePolicy, PhotoPlan, anonymize_photo, compose_photo, face_mask, plan_photo, union_mask

__all__ = [
    "Face",
    "FaceAnalyzer",
    "FaceModelError",
    "load_face_analyzer",
    "align_face",
    "alignment_matrix",
    "crop_scale",
    "template_points",
    "template_face",
    "locate_in_crop",
    "identity_from_crop",
    "identities_of_crops",
    "CropIdentity",
    "DETECTED_IN_CROP",
    "TEMPLATE_FALLBACK",
    "face_alpha",
    "full_alpha",
    "paste_face",
    "obscure_face",
    "FacePolicy",
    "PhotoPlan",
    "anonymize_photo",
    "plan_photo",
    "compose_photo",
    "face_mask",
    "union_mask",
]
