"""Paste anonymized face crops back into the photo with a soft mask (and blur/pixelate with it).

Mask. An ellipse fixed in crop coordinates (centre (50 %, 53 %), semi-axes 32 % x 40 % of the
side: cheek to cheek with margin, forehead to below the chin, for the framing of ``align.py``).
With the default feather the fully replaced core reaches the template's mouth corners at r = 0.51.
Its alpha is computed directly for every photo pixel: the pixel is mapped into the crop with the
alignment matrix, its elliptical radius r is taken (r = 1 on the ellipse), and

    alpha = smoothstep((r_out - r) / w)      (1 inside r <= r_out - w, exactly 0 for r >= r_out)

This is the closed form of "warp a feathered mask back and blur it", without a blur's
infinite tails: alpha is exactly 0 outside the ellipse, so every pixel there keeps its input
bytes (compositing only ever writes pixels with alpha > 0; the rest of the image is never
converted to float). The feather width ``w`` is at least FEATHER_REL of the radius and at least
``min_feather_px`` photo pixels along the ellipse's short axis; since |grad r| <= 1 / (short
semi-axis in photo px), the alpha step between neighbouring pixels is at most
1.5 / min_feather_px (0.075 for the default 20 px), whatever the face size. When the face is small
the band grows outward (up to the crop border for pasted crops, which must not show the crop's
edge; without limit for blur/pixelate, which do not use the crop).

Colour matching (``color_match``). A generated face can come back with a slight colour cast or
brightness shift. In the feather band (0 < alpha < 1, where generated and original pixels meet)
the per-channel mean and standard deviation of the warped generated face are matched to the
original photo's in CIELAB, and that affine correction (std ratio clamped to [0.5, 2]) is applied
to the whole generated face before compositing. The band lies at the face's periphery (hair,
forehead, jaw line, background), so a deliberate change of the face itself (attribute prompts)
is left mostly alone, while a global cast is removed and the seam disappears. No Poisson
blending: it would pull the face's own colours toward the surroundings and it costs a linear solve.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from revpers.faces.align import crop_scale

MASK_CENTRE = (0.50, 0.53)  # fractions of the crop side
MASK_AXES = (0.32, 0.40)  # semi-axes (x, y), fractions of the crop side; r = 1 here
FEATHER_REL = 0.3  # feather width as a fraction of r at least
MIN_CORE = 0.55  # grow the band outward (while the crop allows) to keep alpha == 1 out to this r
# the largest r whose ellipse stays inside the crop square (bottom edge: 0.53 + r * 0.40 <= 1)
R_MAX_IN_CROP = (1.0 - MASK_CENTRE[1]) / MASK_AXES[1] - 0.01
MIN_FEATHER_PX = 20.0
OBSCURE_MODES = ("blur", "pixelate", "fill")  # weakest first: the gate's fallback escalates in this order


@dataclass(frozen=True)
class MaskGeometry:
    r_out: float  # alpha reaches 0 at this elliptical radius
    width: float  # feather width in r units (alpha is 1 for r <= r_out - width)
    short_axis_px: float  # short semi-axis (r = 1) in photo pixels
    smooth: bool  # False when the face is too small for min_feather_px inside the crop

    @property
    def max_step(self) -> float:
        """Upper bound of the alpha difference between 4-neighbour photo pixels."""
        return 1.5 / (self.width * self.short_axis_px)


def mask_geometry(
    matrix: np.ndarray, size: int, min_feather_px: float = MIN_FEATHER_PX, limit_to_crop: bool = True
) -> MaskGeometry:
    scale = crop_scale(matrix)
    short = min(MASK_AXES) * size / scale
    width = max(FEATHER_REL, min_feather_px / short)
    r_out, smooth = 1.0, True
    if r_out - width < MIN_CORE:
        r_out = MIN_CORE + width
        if limit_to_crop and r_out > R_MAX_IN_CROP:
            r_out = R_MAX_IN_CROP
            if r_out - width < 0:
                width, smooth = r_out, False
    return MaskGeometry(float(r_out), float(width), float(short), smooth)


def mask_roi(matrix: np.ndarray, size: int, geom: MaskGeometry, shape) -> tuple[int, int, int, int] | None:
    """(y0, y1, x0, x1) bounding the pixels with alpha > 0, clipped to the photo; None if empty."""
    m = np.asarray(matrix, dtype=np.float64)
    scale = crop_scale(m)
    inv = cv2.invertAffineTransform(m)
    centre = inv[:, :2] @ (np.asarray(MASK_CENTRE) * size) + inv[:, 2]
    a = geom.r_out * MASK_AXES[0] * size / scale
    b = geom.r_out * MASK_AXES[1] * size / scale
    theta = np.arctan2(inv[1, 0], inv[0, 0])
    hx = np.sqrt((a * np.cos(theta)) ** 2 + (b * np.sin(theta)) ** 2)
    hy = np.sqrt((a * np.sin(theta)) ** 2 + (b * np.cos(theta)) ** 2)
    h, w = shape[:2]
    x0, x1 = int(max(0, np.floor(centre[0] - hx) - 1)), int(min(w, np.ceil(centre[0] + hx) + 2))
    y0, y1 = int(max(0, np.floor(centre[1] - hy) - 1)), int(min(h, np.ceil(centre[1] + hy) + 2))
    if x1 <= x0 or y1 <= y0:
        return None
    return y0, y1, x0, x1


def _alpha_in_roi(matrix: np.ndarray, size: int, geom: MaskGeometry, roi) -> np.ndarray:
    y0, y1, x0, x1 = roi
    m = np.asarray(matrix, dtype=np.float64)
    xs = np.arange(x0, x1, dtype=np.float64)
    ys = np.arange(y0, y1, dtype=np.float64)
    gx, gy = np.meshgrid(xs, ys)
    u = (m[0, 0] * gx + m[0, 1] * gy + m[0, 2]) / size
    v = (m[1, 0] * gx + m[1, 1] * gy + m[1, 2]) / size
    r = np.hypot((u - MASK_CENTRE[0]) / MASK_AXES[0], (v - MASK_CENTRE[1]) / MASK_AXES[1])
    t = np.clip((geom.r_out - r) / geom.width, 0.0, 1.0)
    return (t * t * (3.0 - 2.0 * t)).astype(np.float32)


def face_alpha(
    matrix: np.ndarray, size: int, shape, *, min_feather_px: float = MIN_FEATHER_PX, limit_to_crop: bool = True
) -> tuple[np.ndarray, tuple[int, int, int, int] | None]:
    """Soft mask of one face: (alpha over the ROI, ROI) with alpha == 0 everywhere outside the ROI."""
    geom = mask_geometry(matrix, size, min_feather_px, limit_to_crop)
    roi = mask_roi(matrix, size, geom, shape)
    if roi is None:
        return np.zeros((0, 0), np.float32), None
    return _alpha_in_roi(matrix, size, geom, roi), roi


def full_alpha(matrix: np.ndarray, size: int, shape, **kwargs) -> np.ndarray:
    """``face_alpha`` as a full (H, W) float32 array."""
    out = np.zeros(shape[:2], dtype=np.float32)
    alpha, roi = face_alpha(matrix, size, shape, **kwargs)
    if roi is not None:
        y0, y1, x0, x1 = roi
        out[y0:y1, x0:x1] = alpha
    return out


def warp_crop_back(crop: np.ndarray, matrix: np.ndarray, roi) -> np.ndarray:
    """The crop resampled onto the photo pixels of ``roi`` (bilinear; area-reduced first when the
    crop is much larger than its footprint in the photo)."""
    y0, y1, x0, x1 = roi
    m = np.asarray(matrix, dtype=np.float64)
    scale = crop_scale(m)
    src = np.ascontiguousarray(crop)
    lin = m[:, :2].copy()
    t = m[:, :2] @ np.array([x0, y0], dtype=np.float64) + m[:, 2]  # ROI pixel -> crop pixel
    if scale > 1.5:
        n = src.shape[0]
        k = max(1, int(round(n / scale)))
        src = cv2.resize(src, (k, k), interpolation=cv2.INTER_AREA)
        f = k / n  # crop pixel q -> reduced pixel (q + 0.5) * f - 0.5
        lin, t = lin * f, t * f + 0.5 * f - 0.5
    roi_to_src = np.hstack([lin, t[:, None]])
    return cv2.warpAffine(
        src,
        roi_to_src,
        (x1 - x0, y1 - y0),
        flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
        borderMode=cv2.BORDER_REPLICATE,
    )


def _lab(rgb_u8: np.ndarray) -> np.ndarray:
    return cv2.cvtColor(rgb_u8.astype(np.float32) / 255.0, cv2.COLOR_RGB2LAB)


def match_colors(gen: np.ndarray, orig: np.ndarray, band: np.ndarray, min_pixels: int = 20) -> np.ndarray:
    """Match ``gen``'s LAB mean/std to ``orig``'s over the ``band`` pixels; returns float32 RGB 0..255."""
    if int(band.sum()) < min_pixels:
        return gen.astype(np.float32)
    g, o = _lab(gen), _lab(orig)
    gb, ob = g[band], o[band]
    mg, sg = gb.mean(0), gb.std(0)
    mo, so = ob.mean(0), ob.std(0)
    ratio = np.clip(so / np.maximum(sg, 1e-3), 0.5, 2.0)
    ratio[sg < 1e-3] = 1.0
    g = (g - mg) * ratio + mo
    g[..., 0] = np.clip(g[..., 0], 0.0, 100.0)
    rgb = cv2.cvtColor(g.astype(np.float32), cv2.COLOR_LAB2RGB)
    return np.clip(rgb * 255.0, 0.0, 255.0)


def composite(out: np.ndarray, roi, alpha: np.ndarray, new: np.ndarray) -> None:
    """In place: ``out[roi] = (1 - alpha) * out + alpha * new`` on the pixels with alpha > 0 only."""
    y0, y1, x0, x1 = roi
    sel = alpha > 0
    if not sel.any():
        return
    region = out[y0:y1, x0:x1]
    a = alpha[sel][:, None]
    mixed = region[sel].astype(np.float32) * (1.0 - a) + np.asarray(new, dtype=np.float32)[sel] * a
    region[sel] = np.clip(np.rint(mixed), 0, 255).astype(np.uint8)


def paste_face(
    out: np.ndarray,
    crop: np.ndarray,
    matrix: np.ndarray,
    *,
    color_match: bool = True,
    min_feather_px: float = MIN_FEATHER_PX,
) -> MaskGeometry:
    """Blend one generated crop into ``out`` (modified in place) under its soft mask."""
    size = crop.shape[0]
    geom = mask_geometry(matrix, size, min_feather_px, limit_to_crop=True)
    roi = mask_roi(matrix, size, geom, out.shape)
    if roi is None:
        return geom
    alpha = _alpha_in_roi(matrix, size, geom, roi)
    gen = warp_crop_back(crop, matrix, roi)
    y0, y1, x0, x1 = roi
    if color_match:
        band = (alpha > 0) & (alpha < 1)
        gen = match_colors(gen, out[y0:y1, x0:x1], band)
    composite(out, roi, alpha, gen)
    return geom


def obscure_face(
    out: np.ndarray, matrix: np.ndarray, size: int, mode: str, *, min_feather_px: float = MIN_FEATHER_PX
) -> MaskGeometry:
    """Blur, pixelate or fill one face in ``out`` (in place) under the same soft mask, sized from the
    face: Gaussian sigma = crop side / 12, pixel blocks = crop side / 10 (photo pixels); "fill" paints
    the region's mean colour, which carries nothing of the face."""
    if mode not in OBSCURE_MODES:
        raise ValueError(f"mode must be one of {', '.join(OBSCURE_MODES)}, got {mode!r}")
    geom = mask_geometry(matrix, size, min_feather_px, limit_to_crop=False)
    roi = mask_roi(matrix, size, geom, out.shape)
    if roi is None:
        return geom
    alpha = _alpha_in_roi(matrix, size, geom, roi)
    side = size / crop_scale(matrix)  # crop side in photo pixels
    y0, y1, x0, x1 = roi
    h, w = out.shape[:2]
    if mode == "blur":
        sigma = max(1.5, side / 12.0)
        pad = int(np.ceil(3 * sigma))
        py0, py1, px0, px1 = max(0, y0 - pad), min(h, y1 + pad), max(0, x0 - pad), min(w, x1 + pad)
        blurred = cv2.GaussianBlur(
            out[py0:py1, px0:px1], (0, 0), sigmaX=sigma, sigmaY=sigma, borderType=cv2.BORDER_REFLECT
        )
        new = blurred[y0 - py0 : y1 - py0, x0 - px0 : x1 - px0]
    elif mode == "fill":
        region = out[y0:y1, x0:x1]
        new = np.empty_like(region)
        new[...] = region.reshape(-1, region.shape[-1]).mean(axis=0).round().astype(region.dtype)
    else:
        block = max(2, int(round(side / 10.0)))
        region = out[y0:y1, x0:x1]
        sw, sh = max(1, int(np.ceil(region.shape[1] / block))), max(1, int(np.ceil(region.shape[0] / block)))
        small = cv2.resize(region, (sw, sh), interpolation=cv2.INTER_AREA)
        new = cv2.resize(small, (region.shape[1], region.shape[0]), interpolation=cv2.INTER_NEAREST)
    composite(out, roi, alpha, new.copy())
    return geom
