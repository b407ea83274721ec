"""Image quality: change outside the faces, detection agreement, FID/KID with a user's Inception.

Background. The face region of a photo is where the anonymizer may write: the union of the soft
masks ``faces/blend.py`` uses for paste-back and for blur/pixelate (an ellipse fixed in the
whole-face crop, ``limit_to_crop=False``, the larger of the two), placed at the faces detected in
the *original*, and dilated by ``MASK_MARGIN`` of the crop side to absorb the small landmark
differences between the evaluator's detector and the one the anonymizer used. Everything else is
background: PSNR over those pixels (``PSNR_CAP`` dB when they are identical) and the mean of the
SSIM map (7 px Gaussian-free uniform window, skimage) over background pixels at least 3 px from the
face region, so no SSIM window straddles a face. The pixels the anonymizer does not touch keep
their input bytes (photo.py), so for a lossless output the background PSNR is the cap; a lower
value means the image was re-encoded, resized, recoloured or pasted beyond the mask.

FID / KID (``InceptionFeatures``, only with ``--inception PATH``): Inception-v3 pool features of
the original and the anonymized whole-face crops (the same 320 px crops the recognizers read,
resized to 299 px). Contract of the model file (ONNX, run by onnxruntime, or TorchScript, run by
torch.jit): input (N, 3, 299, 299) float32 RGB scaled to [-1, 1] (pixel / 127.5 - 1); output the
(N, 2048) pool features (extra singleton dimensions are flattened). FID is the Frechet distance of
Gaussians fitted to the two feature sets; KID the unbiased squared MMD with the cubic polynomial
kernel k(x, y) = (x.y / d + 1)^3. FID is strongly biased for small sets (fewer faces than feature
dimensions); prefer KID there, and compare configurations on the same faces.
"""

from __future__ import annotations

import math
import pathlib

import cv2
import numpy as np

from revpers.faces.align import crop_scale
from revpers.faces.blend import full_alpha

PSNR_CAP = 100.0  # dB reported for identical pixels (an MSE of 0)
MASK_MARGIN = 0.05  # dilation of the face region, fraction of the whole-face crop side
MASK_SIZE = 1024  # crop size the mask geometry is computed at (the geometry is in crop fractions)
SSIM_WINDOW = 7


def face_region(shape, matrices: list[np.ndarray], size: int = MASK_SIZE) -> np.ndarray:
    """(H, W) bool: where the anonymizer may have written for faces aligned by ``matrices``
    (photo -> ``size`` crop), dilated by MASK_MARGIN of each crop's side."""

    region = np.zeros(shape[:2], dtype=bool)
    for m in matrices:
        alpha = full_alpha(np.asarray(m, np.float64), size, shape, limit_to_crop=False) > 0
        r = int(math.ceil(MASK_MARGIN * size / crop_scale(m)))
        if r > 0:
            kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * r + 1, 2 * r + 1))
            alpha = cv2.dilate(alpha.astype(np.uint8), kernel) > 0
        region |= alpha
    return region


def psnr(a: np.ndarray, b: np.ndarray, where: np.ndarray) -> float | None:
    """PSNR in dB over the pixels ``where`` (all channels); PSNR_CAP when identical; None when empty."""
    if not where.any():
        return None
    d = a[where].astype(np.float64) - b[where].astype(np.float64)
    mse = float(np.mean(d * d))
    if mse == 0.0:
        return PSNR_CAP
    return float(min(PSNR_CAP, 10.0 * math.log10(255.0**2 / mse)))


def ssim(a: np.ndarray, b: np.ndarray, where: np.ndarray) -> float | None:
    """Mean SSIM over ``where`` eroded by the window radius (None when nothing is left, or when
    scikit-image, an optional dependency, is not installed)."""
    try:
        from skimage.metrics import structural_similarity
    except ImportError:
        return None

    if min(a.shape[:2]) < SSIM_WINDOW:
        return None
    r = SSIM_WINDOW // 2
    inner = cv2.erode(where.astype(np.uint8), np.ones((2 * r + 1, 2 * r + 1), np.uint8)) > 0
    if not inner.any():
        return None
    _, smap = structural_similarity(a, b, data_range=255, channel_axis=2, win_size=SSIM_WINDOW, full=True)
    return float(smap.mean(axis=2)[inner].mean())


# ---------------------------------------------------------------------------------------- FID / KID
class InceptionError(ValueError):
    """The --inception model cannot be used (the message says why)."""


class InceptionFeatures:
    SIDE = 299

    def __init__(self, path: pathlib.Path):
        self.path = pathlib.Path(path).expanduser()
        if not self.path.is_file():
            raise InceptionError(f"--inception {self.path} does not exist")
        if self.path.suffix.lower() == ".onnx":
            import onnxruntime

            try:
                self.session = onnxruntime.InferenceSession(str(self.path), providers=["CPUExecutionProvider"])
            except Exception as exc:
                raise InceptionError(
                    f"--inception {self.path} is not a usable ONNX model: "
                    f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}"
                ) from None
            self.input_name = self.session.get_inputs()[0].name
            self.kind = "onnx"
        else:
            import torch

            try:
                self.module = torch.jit.load(str(self.path), map_location="cpu").eval()
            except Exception as exc:
                raise InceptionError(
                    f"--inception {self.path} is neither ONNX (.onnx) nor a TorchScript file: "
                    f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}"
                ) from None
            self.kind = "torchscript"

    def __call__(self, crops: list[np.ndarray], batch: int = 16) -> np.ndarray:
        feats = []
        for i in range(0, len(crops), batch):
            x = np.stack(
                [
                    cv2.resize(
                        c,
                        (self.SIDE, self.SIDE),
                        interpolation=cv2.INTER_AREA if c.shape[0] > self.SIDE else cv2.INTER_CUBIC,
                    )
                    for c in crops[i : i + batch]
                ]
            )
            x = np.ascontiguousarray((x.astype(np.float32) / 127.5 - 1.0).transpose(0, 3, 1, 2))
            if self.kind == "onnx":
                out = self.session.run(None, {self.input_name: x})[0]
            else:
                import torch

                with torch.inference_mode():
                    out = self.module(torch.from_numpy(x))
                    out = (out[0] if isinstance(out, (tuple, list)) else out).float().numpy()
            feats.append(np.asarray(out, np.float64).reshape(len(x), -1))
        f = np.concatenate(feats) if feats else np.zeros((0, 0))
        if not np.all(np.isfinite(f)):
            raise InceptionError(f"--inception {self.path} produced non-finite features")
        return f


def fid(x: np.ndarray, y: np.ndarray) -> float:
    """Frechet distance between Gaussians fitted to two (N, D) feature sets."""
    try:
        from scipy import linalg
    except ImportError:
        raise InceptionError("FID needs scipy (pip install scipy)") from None

    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    if len(x) < 2 or len(y) < 2:
        raise ValueError("FID needs at least two samples per set")
    mx, my = x.mean(0), y.mean(0)
    cx, cy = np.atleast_2d(np.cov(x, rowvar=False)), np.atleast_2d(np.cov(y, rowvar=False))
    covmean = linalg.sqrtm(cx @ cy)
    covmean = np.real(covmean)
    return float(np.sum((mx - my) ** 2) + np.trace(cx) + np.trace(cy) - 2.0 * np.trace(covmean))


def kid(x: np.ndarray, y: np.ndarray) -> float:
    """Unbiased squared MMD with k(a, b) = (a.b / d + 1)^3 (Binkowski et al. 2018)."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    m, n = len(x), len(y)
    if m < 2 or n < 2:
        raise ValueError("KID needs at least two samples per set")
    d = x.shape[1]
    kxx, kyy, kxy = (x @ x.T / d + 1) ** 3, (y @ y.T / d + 1) ** 3, (x @ y.T / d + 1) ** 3
    return float(
        (kxx.sum() - np.trace(kxx)) / (m * (m - 1)) + (kyy.sum() - np.trace(kyy)) / (n * (n - 1)) - 2.0 * kxy.mean()
    )


__all__ = ["PSNR_CAP", "InceptionError", "InceptionFeatures", "face_region", "fid", "kid", "psnr", "ssim"]
