"""The evaluator: measures (original, anonymized) pairs face by face and summarises a whole set.

``Evaluator.add(name, original, anonymized)`` measures one pair of RGB arrays (the same size);
``Evaluator.metrics()`` returns the summary written to metrics.json. What each number means is in
docs/evaluation.md; the pieces are in ``pairs`` (geometry), ``identity`` (re-ID), ``attributes``
(pose, expression) and ``quality`` (background, detection agreement, FID/KID).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import cv2
import numpy as np

from revpers.evaluate import attributes as attr
from revpers.evaluate import quality
from revpers.evaluate.identity import summarize
from revpers.evaluate.pairs import face_sites

SMOKE_NOTE = "smoke weights: numbers meaningless"
THUMB = 128  # side of the face thumbnails kept for the contact sheets
IMAGE_THUMB = 256  # height of the whole-image thumbnails
FACE_IQA_SKIPPED = (
    "not measured: no face image-quality model (e.g. CR-FIQA, SER-FIQ as in the paper) installs offline here"
)
ROUND = 6


class EvaluationInputError(ValueError):
    """Inputs that cannot be evaluated together (the message says why)."""


def _r(v):
    return None if v is None else round(float(v), ROUND)


def _thumb(rgb: np.ndarray, height: int) -> np.ndarray:
    h, w = rgb.shape[:2]
    k = height / float(h)
    return cv2.resize(
        rgb, (max(1, int(round(w * k))), height), interpolation=cv2.INTER_AREA if k < 1 else cv2.INTER_CUBIC
    )


def _outline(thumb: np.ndarray, region: np.ndarray) -> np.ndarray:
    """The thumbnail with the face region's border drawn in green (what is not background)."""
    small = cv2.resize(region.astype(np.uint8), (thumb.shape[1], thumb.shape[0]), interpolation=cv2.INTER_NEAREST)
    contours, _ = cv2.findContours(small, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    out = np.ascontiguousarray(thumb.copy())
    cv2.drawContours(out, contours, -1, (0, 220, 0), 1, cv2.LINE_AA)
    return out


@dataclass
class Evaluator:
    """verifier: revpers.gate.recognizers.Verifier (its detector and recognizers, dlib always; ArcFace when the
    bundle is real). extras: identity.OnnxRecognizer list. inception: quality.InceptionFeatures or None."""

    verifier: object
    extras: list = field(default_factory=list)
    inception: object | None = None
    aligned: bool = False
    smoke: bool = False
    faces: list = field(default_factory=list)
    images: list = field(default_factory=list)
    thumbs: dict = field(default_factory=dict)  # (image, face) -> (original crop, anonymized crop)
    image_thumbs: dict = field(default_factory=dict)  # image -> (original, anonymized)
    features: dict = field(default_factory=lambda: {"original": [], "anonymized": []})
    withheld: list = field(default_factory=list)
    unmatched: list = field(default_factory=list)

    # ------------------------------------------------------------------ recognizers
    def recognizer_names(self) -> list[str]:
        v = self.verifier
        return ["dlib"] + (["arcface"] if v.use_arcface else []) + [e.name for e in self.extras]

    def describe_recognizers(self) -> dict:
        d = self.verifier.describe()
        out = {"dlib": d["dlib"], "arcface": d["arcface"]}
        for e in self.extras:
            out[e.name] = e.describe()
        return out

    def _landmarks68(self, crop: np.ndarray, face) -> np.ndarray:
        pts = face.extra.get("landmarks68")
        if pts is not None:
            return np.asarray(pts, np.float64)
        import dlib

        x1, y1, x2, y2 = (int(round(float(v))) for v in face.box)
        # dlib's shape predictor may be used from many threads at once (faces.analysis)
        shape = self.verifier.dlib.predictor(np.ascontiguousarray(crop), dlib.rectangle(x1, y1, x2 - 1, y2 - 1))
        return np.array([(p.x, p.y) for p in shape.parts()], dtype=np.float64)

    # ------------------------------------------------------------------ measuring
    def add_withheld(self, name: str) -> None:
        self.withheld.append(name)

    def add(self, name: str, original: np.ndarray, anonymized: np.ndarray) -> dict:
        original, anonymized = np.asarray(original), np.asarray(anonymized)
        if original.shape != anonymized.shape:
            raise EvaluationInputError(
                f"{name}: the images differ in size: original {original.shape[1]}x{original.shape[0]}, "
                f"anonymized {anonymized.shape[1]}x{anonymized.shape[0]}"
            )
        v = self.verifier
        sites = face_sites(v, original, self.aligned)
        side = float(v.size)
        records = []
        feats_o, feats_a = [], []
        for site in sites:
            crop_o, crop_a = v.crop(original, site.matrix), v.crop(anonymized, site.matrix)
            ref = v.embed(crop_o)
            out = v.embed(crop_a, fallback_face=ref.face)
            check = v.compare(ref, out)
            scores = {"dlib": check.dlib_distance}
            matches = {"dlib": check.dlib_match}
            if v.use_arcface:
                scores["arcface"], matches["arcface"] = check.arcface_cosine, check.arcface_match
            for e in self.extras:
                c = float(np.dot(e.embed(crop_o, ref.face.kps), e.embed(crop_a, out.face.kps)))
                scores[e.name] = c
                matches[e.name] = None if e.threshold is None else bool(c >= e.threshold)
            rec = {
                "image": name,
                "face": site.index,
                "box": site.box,
                "redetected": bool(out.redetected),
                "original_redetected": bool(ref.redetected),
                "scores": {k: _r(s) for k, s in scores.items()},
                "matches": matches,
            }
            if ref.redetected and out.redetected:
                lo, la = self._landmarks68(crop_o, ref.face), self._landmarks68(crop_a, out.face)
                po, pa = attr.head_pose(lo, side), attr.head_pose(la, side)
                rec["pose_original"] = {k: _r(x) for k, x in po.items()}
                rec["pose_anonymized"] = {k: _r(x) for k, x in pa.items()}
                rec["pose_difference"] = {k: _r(x) for k, x in attr.pose_difference(po, pa).items()}
                rec["expression_difference"] = _r(attr.expression_difference(lo, la))
            else:
                rec["attributes"] = (
                    "not measured: the face was not re-detected in the "
                    + ("anonymized" if ref.redetected else "original")
                    + " crop"
                )
            records.append(rec)
            self.thumbs[(name, site.index)] = (_thumb(crop_o, THUMB), _thumb(crop_a, THUMB))
            if self.inception is not None:
                feats_o.append(crop_o)
                feats_a.append(crop_a)
        if self.inception is not None and feats_o:
            self.features["original"].append(self.inception(feats_o))
            self.features["anonymized"].append(self.inception(feats_a))
        region = quality.face_region(original.shape, [self._mask_matrix(s.matrix) for s in sites])
        background = ~region
        img = {
            "image": name,
            "faces": len(sites),
            "background_fraction": _r(background.mean()),
            "background_psnr_db": _r(quality.psnr(original, anonymized, background)),
            "background_ssim": _r(quality.ssim(original, anonymized, background)),
        }
        self.images.append(img)
        self.faces.extend(records)
        self.image_thumbs[name] = (_thumb(original, IMAGE_THUMB), _outline(_thumb(anonymized, IMAGE_THUMB), region))
        return {"image": img, "faces": records}

    def _mask_matrix(self, verify_matrix: np.ndarray) -> np.ndarray:
        """The verification crop's matrix rescaled to the mask geometry's crop size."""
        return np.asarray(verify_matrix, np.float64) * (quality.MASK_SIZE / float(self.verifier.size))

    # ------------------------------------------------------------------ summary
    def metrics(self) -> dict:
        names = self.recognizer_names()
        described = self.describe_recognizers()
        identity = {}
        for n in names:
            vals = [f["scores"][n] for f in self.faces if f["scores"].get(n) is not None]
            has_op = described[n].get("threshold") is not None
            identity[n] = summarize(vals, [f["matches"][n] for f in self.faces] if has_op else None)
            identity[n].update(
                {
                    "metric": described[n]["metric"],
                    "match_when": described[n]["match_when"],
                    "threshold": described[n].get("threshold"),
                }
            )
        measured = [f for f in self.faces if "pose_difference" in f]
        pose = {
            ax: summarize([f["pose_difference"][ax] for f in measured], None)
            for ax in ("yaw", "pitch", "roll", "l2_rad")
        }
        for s in pose.values():
            s.pop("reid_rate", None)
        expr = summarize([f["expression_difference"] for f in measured], None)
        expr.pop("reid_rate", None)
        n_faces = len(self.faces)
        redetected = sum(f["redetected"] for f in self.faces)
        psnrs = [i["background_psnr_db"] for i in self.images if i["background_psnr_db"] is not None]
        ssims = [i["background_ssim"] for i in self.images if i["background_ssim"] is not None]
        bg = {
            "psnr_db": summarize(psnrs, None),
            "ssim": summarize(ssims, None),
            "psnr_cap_db": quality.PSNR_CAP,
            "identical_images": int(sum(p >= quality.PSNR_CAP for p in psnrs)),
        }
        for s in (bg["psnr_db"], bg["ssim"]):
            s.pop("reid_rate", None)
        q = {
            "background": bg,
            "detection_agreement": {
                "original_faces": n_faces,
                "redetected": int(redetected),
                "rate": (redetected / n_faces) if n_faces else None,
            },
            "face_iqa": {"skipped": FACE_IQA_SKIPPED},
        }
        q.update(self._fid_kid())
        m = {
            "format": "revpers-evaluation",
            "version": 1,
            "smoke": bool(self.smoke),
            **({"warning": SMOKE_NOTE} if self.smoke else {}),
            "mode": "aligned" if self.aligned else "photo",
            "images": {
                "evaluated": len(self.images),
                "withheld": len(self.withheld),
                "withheld_names": list(self.withheld),
                "unmatched": list(self.unmatched),
                "without_faces": int(sum(i["faces"] == 0 for i in self.images)),
            },
            "faces": {"measured": n_faces, "attributes_measured": len(measured)},
            "recognizers": {n: described[n] for n in described},
            "identity": identity,
            "attributes": {
                "pose_degrees": {k: pose[k] for k in ("yaw", "pitch", "roll")},
                "pose_distance_rad": pose["l2_rad"],
                "expression": expr,
                "gaze": {"skipped": attr.GAZE_SKIPPED},
                "pose_template": attr.POSE_TEMPLATE,
            },
            "quality": q,
            "per_image": self.images,
            "per_face": self.faces,
        }
        return m

    def _fid_kid(self) -> dict:
        if self.inception is None:
            return {
                "fid": None,
                "kid": None,
                "fid_kid_skipped": "no Inception weights given (--inception PATH; docs/evaluation.md)",
            }
        fo = np.concatenate(self.features["original"]) if self.features["original"] else np.zeros((0, 1))
        fa = np.concatenate(self.features["anonymized"]) if self.features["anonymized"] else np.zeros((0, 1))
        if len(fo) < 2:
            return {"fid": None, "kid": None, "fid_kid_skipped": f"{len(fo)} face(s): FID/KID need at least 2"}
        out = {
            "fid": _r(quality.fid(fo, fa)),
            "kid": _r(quality.kid(fo, fa)),
            "fid_kid_faces": int(len(fo)),
            "inception": str(self.inception.path),
        }
        if len(fo) <= fo.shape[1]:
            out["fid_note"] = (
                f"{len(fo)} faces for {fo.shape[1]}-d features: FID is strongly biased at this size; "
                "compare KID, and only between configurations on the same faces"
            )
        return out


def reid_headline(metrics: dict) -> float | None:
    """The highest re-ID rate among the recognizers that have an operating point (what a target
    re-ID rate is compared with), or None when none has one."""
    rates = [s["reid_rate"] for s in metrics["identity"].values() if s.get("reid_rate") is not None]
    return max(rates) if rates else None


def finite(v) -> bool:
    return v is not None and isinstance(v, (int, float)) and math.isfinite(v)


__all__ = ["SMOKE_NOTE", "Evaluator", "reid_headline"]
