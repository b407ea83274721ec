"""The one request boundary: encoded image bytes and untrusted options in, encoded image bytes and a
typed report out. The command line, the Triton model and batch jobs all call ``anonymize_bytes``.

Order of work: options are validated first (cheap, before any decoding), then the byte size, then
the image header (pixel count) before the pixels are decoded; only then do the models run.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field, replace

from revpers.core.errors import Cancelled, LimitError, ParameterError
from revpers.core.params import Params, coerce_number
from revpers.faces.photo import FacePolicy
from revpers.gate.audit import add_byte_hashes, bytes_sha256
from revpers.gate.policy import MAX_RETRIES, VerifyPolicy
from revpers.service.anonymizer import Anonymizer
from revpers.service.images import MIN_SIDE, PILLOW_PIXEL_LIMIT, decode_image, encode_image
from revpers.service.records import ImageReport
from revpers_client.protocol import (
    FACE_KEYS,
    GATE_KEYS,
    MAX_FACES,
    MAX_GATE_RETRIES,
    MAX_PARAMS_BYTES,
    MAX_PIXELS,
    MAX_REQUEST_BYTES,
    MAX_STEPS,
    METHOD_KEYS,
    OUTPUT_FORMATS,
    OUTPUT_KEYS,
    ImageVerdict,
    OnNoFace,
)

MODES = ("photo", "aligned")
MAX_JSON_DEPTH = 4  # PARAMS is a flat object; anything nested deeper is refused before parsing


@dataclass(frozen=True)
class Limits:
    """What one request may cost. Defaults are protocol's; ``revpers repository --max-*`` writes
    others into the BLS model's config (``as_parameters``), which reads them back (``from_parameters``).

    max_bytes: the encoded image, checked before decoding; max_pixels: width x height, checked from
    the image header before decoding; max_faces: faces detected in a photo, checked before any is
    aligned or generated; max_steps and max_retries: the PARAMS ``steps`` and ``retries``.
    """

    max_bytes: int = MAX_REQUEST_BYTES
    max_pixels: int = MAX_PIXELS
    max_faces: int = MAX_FACES
    max_steps: int = MAX_STEPS
    max_retries: int = MAX_GATE_RETRIES

    # what a server may be configured with: up to the method's own ranges, gRPC's 2 GiB message
    # ceiling and Pillow's decompression-bomb limit (it refuses larger images by itself); steps and
    # retries not below their defaults, which a request that leaves them unset gets
    BOUNDS = {
        "max_bytes": (1, 2**31 - 1),
        "max_pixels": (MIN_SIDE * MIN_SIDE, PILLOW_PIXEL_LIMIT or 2**62),
        "max_faces": (1, 10_000),
        "max_steps": (Params().steps, Params.LIMITS["steps"][1]),
        "max_retries": (VerifyPolicy().retries, MAX_RETRIES),
    }

    def __post_init__(self):
        for name, (lo, hi) in self.BOUNDS.items():
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
                raise ParameterError(f"{name} must be an integer in [{lo}, {hi}], got {value!r}")

    @classmethod
    def from_parameters(cls, values: dict) -> "Limits":
        """From a model config's parameters (strings): its keys named like the fields; other keys are
        not limits and are ignored, absent limits keep their defaults."""
        return cls(**{k: coerce_number(k, values[k], int) for k in cls.BOUNDS if values.get(k) not in (None, "")})

    @classmethod
    def in_process(cls) -> "Limits":
        """For the command line on the user's own machine: steps up to the method's own ceiling
        (the server default protects a shared server, not the user's time)."""
        return cls(max_steps=cls.BOUNDS["max_steps"][1])

    def as_parameters(self) -> dict[str, str]:
        return {name: str(getattr(self, name)) for name in self.BOUNDS}

    def check(self, options: "RequestOptions") -> None:
        if options.params.steps > self.max_steps:
            raise LimitError(f"steps={options.params.steps} is above this server's limit of {self.max_steps}")
        if options.verify.retries > self.max_retries:
            raise LimitError(f"retries={options.verify.retries} is above this server's limit of {self.max_retries}")


@dataclass(frozen=True)
class RequestOptions:
    """A request's options, validated. ``format`` None keeps PNG (lossless) for the output."""

    params: Params = field(default_factory=Params)
    verify: VerifyPolicy = field(default_factory=VerifyPolicy)
    mode: str = "photo"
    format: str = "png"
    quality: int = 95
    on_no_face: OnNoFace = OnNoFace.REVIEW
    min_face: float | None = None  # detector box side (photo px) below which the face-size policy applies
    det_thresh: float | None = None  # drop detections scoring below this (raise-only, see FacePolicy)

    @classmethod
    def from_mapping(cls, values: dict) -> "RequestOptions":
        """From untrusted input (PARAMS JSON, command-line values); unknown keys are refused."""
        if not isinstance(values, dict):
            raise ParameterError("PARAMS must be a JSON object")
        values = dict(values)
        mode = values.pop("mode", "photo")
        if mode not in MODES:
            raise ParameterError(f"mode must be 'photo' or 'aligned', got {mode!r}")
        known = set(METHOD_KEYS) | set(GATE_KEYS) | set(OUTPUT_KEYS) | set(FACE_KEYS)
        unknown = set(values) - known
        if unknown:
            raise ParameterError(f"unknown parameter(s): {', '.join(sorted(map(str, unknown)))}")
        fmt, quality = _output_options(values)
        on_no_face, min_face, det_thresh = _face_options(values)
        return cls(
            params=Params.from_mapping({k: values[k] for k in METHOD_KEYS if k in values}),
            verify=VerifyPolicy.from_mapping({k: values[k] for k in GATE_KEYS if k in values}),
            mode=mode,
            format=fmt,
            quality=quality,
            on_no_face=on_no_face,
            min_face=min_face,
            det_thresh=det_thresh,
        )

    def face_policy(self) -> FacePolicy:
        return FacePolicy(min_face_px=self.min_face) if self.min_face is not None else FacePolicy()


def _output_options(values: dict) -> tuple[str, int]:
    fmt = str(values.get("format") or "png").lower()
    fmt = "jpeg" if fmt == "jpg" else fmt
    if fmt not in OUTPUT_FORMATS:
        raise ParameterError(f"format must be one of {', '.join(OUTPUT_FORMATS)}, got {values.get('format')!r}")
    quality = values.get("quality")
    quality = 95 if quality is None else coerce_number("quality", quality, int)
    if not 1 <= quality <= 100:
        raise ParameterError(f"quality must be in [1, 100], got {quality}")
    return fmt, quality


def _face_options(values: dict) -> tuple[OnNoFace, float | None, float | None]:
    try:
        on_no_face = OnNoFace(values.get("on_no_face") or OnNoFace.REVIEW.value)
    except ValueError:
        raise ParameterError(
            f"on_no_face must be one of {', '.join(v.value for v in OnNoFace)}, got {values.get('on_no_face')!r}"
        ) from None
    bounded = {}
    for key, (lo, hi, unit) in {"min_face": (1.0, 10_000.0, " px"), "det_thresh": (0.0, 1.0, "")}.items():
        value = values.get(key)
        if value is not None:
            value = coerce_number(key, value, float)
            if not lo <= value <= hi:
                raise ParameterError(f"{key} must be in [{lo:g}, {hi:g}]{unit}, got {value}")
        bounded[key] = value
    return on_no_face, bounded["min_face"], bounded["det_thresh"]


def parse_params(raw: bytes | str | None) -> dict:
    """The PARAMS JSON object of a request, refused with a ParameterError when it is too large, not
    JSON, nested or not an object (never an exception the caller did not ask for)."""
    if raw is None or raw in (b"", ""):
        return {}
    if len(raw) > MAX_PARAMS_BYTES:
        raise LimitError(f"PARAMS is {len(raw)} bytes; the limit is {MAX_PARAMS_BYTES}")
    text = raw.decode("utf-8") if isinstance(raw, (bytes, bytearray)) else str(raw)
    depth = deepest = 0
    for ch in text:  # a cheap bound on nesting before the parser recurses into it
        if ch in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif ch in "]}":
            depth -= 1
    if deepest > MAX_JSON_DEPTH:
        raise ParameterError(f"PARAMS is nested {deepest} levels deep; it must be a flat JSON object")
    try:
        values = json.loads(text)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError, and int-digit limits, are ValueErrors
        raise ParameterError(f"PARAMS is not valid JSON: {exc}") from None
    if not isinstance(values, dict):
        raise ParameterError("PARAMS must be a JSON object")
    return values


@dataclass
class Response:
    """What a request gives back: the encoded image (``b""`` when withheld) and the report."""

    image: bytes
    report: ImageReport

    @property
    def withheld(self) -> bool:
        return not self.image


def anonymize_bytes(
    anonymizer: Anonymizer,
    data: bytes,
    options: RequestOptions,
    *,
    name: str = "input",
    limits: Limits = Limits(),
    cancelled=None,
) -> Response:
    """Anonymize one encoded image.

    The image is withheld (``b""``) when the gate rejected it (verdict ``rejected``) or when no face
    was found and ``options.on_no_face`` is ``fail``. A photo with no face and ``on_no_face`` review
    (the default) is released unchanged in content but marked ``review`` in its report.
    ``cancelled``: a callable polled once before any work and then before every UNet call; when it
    returns True the work stops with ``revpers.core.errors.Cancelled``.
    """
    t0 = time.perf_counter()
    if cancelled is not None and cancelled():  # e.g. its deadline passed while it waited in the queue
        raise Cancelled("request cancelled before its work started")
    limits.check(options)
    if len(data) > limits.max_bytes:
        raise LimitError(f"{name}: {len(data)} bytes; this server's limit is {limits.max_bytes} bytes")
    rgb = decode_image(data, name=name, max_pixels=limits.max_pixels)
    decode_ms = (time.perf_counter() - t0) * 1e3
    if options.mode == "aligned":
        result = anonymizer.anonymize_aligned(rgb, options.params, verify=options.verify, cancelled=cancelled)
    else:
        policy = options.face_policy()
        if options.det_thresh is not None:
            policy = replace(policy, min_score=options.det_thresh)
        result = anonymizer.anonymize_photo(
            rgb, options.params, policy=policy, verify=options.verify, max_faces=limits.max_faces, cancelled=cancelled
        )
    report = result.report
    t1 = time.perf_counter()
    image = result.image
    if report.verdict == ImageVerdict.NO_FACES:
        if options.on_no_face == OnNoFace.FAIL:
            image = None
            report.review = "no face found; withheld (on_no_face=fail)"
        elif options.on_no_face == OnNoFace.REVIEW:
            report.review = "no face found: check that no face was missed before release"
    elif report.verdict != ImageVerdict.PASSED:
        report.review = f"verdict {report.verdict.value}: not every face was released as passed"
    out = encode_image(image, options.format, options.quality) if image is not None else b""
    add_byte_hashes(report.audit, data, out)
    report.input_sha256, report.output_sha256 = bytes_sha256(data), bytes_sha256(out) if out else None
    report.timings_ms.update({"decode": round(decode_ms, 3), "encode": round((time.perf_counter() - t1) * 1e3, 3)})
    return Response(out, report)
