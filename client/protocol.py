"""The wire contract between a revpers server and its clients, with no dependencies.

Both sides import this one module: the server (``revpers.serving``, ``revpers.service``) and the
client (``revpers_client``). It names the Triton model and its tensors, the keys a request's PARAMS
may carry, the verdicts a report can hold, the image formats accepted, and the limits a server
enforces by default. Nothing here imports anything outside the standard library.
"""

from __future__ import annotations

from enum import Enum

MODEL = "revpers"  # the BLS model clients call

# Tensors of the `revpers` model: each a BYTES tensor of shape [1, 1] per request.
INPUT_IMAGE = "IMAGE"  # encoded image bytes
INPUT_PARAMS = "PARAMS"  # JSON object of the keys below; optional
OUTPUT_IMAGE = "IMAGE"  # encoded anonymized image; empty when the image was withheld
OUTPUT_REPORT = "REPORT"  # JSON report (docs/schemas/image-report.schema.json)

# PARAMS keys, by what reads them on the server.
REQUEST_KEYS = ("mode",)  # "photo" (every face of a photo; default) or "aligned" (the image is one face)
MODES = ("photo", "aligned")
METHOD_KEYS = ("guidance", "ip_scale", "id_scale", "steps", "skip", "seed", "prompt")
GATE_KEYS = ("verify", "retries", "retry_mode", "guidance_step", "fallback")
OUTPUT_KEYS = ("format", "quality")
FACE_KEYS = ("det_thresh", "min_face", "on_no_face")
PARAM_KEYS = REQUEST_KEYS + METHOD_KEYS + GATE_KEYS + OUTPUT_KEYS + FACE_KEYS


def params_of(values, keys=PARAM_KEYS) -> dict:
    """The PARAMS object of ``values`` (a mapping, or an argparse namespace whose options are named
    after the keys): every one of ``keys`` but "format" (set per file) whose value is not None;
    the keys left out are the server's defaults."""
    values = values if isinstance(values, dict) else vars(values)
    return {k: values[k] for k in keys if k != "format" and values.get(k) is not None}


class FaceVerdict(str, Enum):
    """What happened to one face (``report["faces"][i]["verdict"]``)."""

    PASSED = "passed"  # generated, and no recognizer matches the input face
    FALLBACK_BLURRED = "fallback_blurred"  # the gate failed every attempt; the face was blurred
    FALLBACK_PIXELATED = "fallback_pixelated"  # ... pixelated
    FALLBACK_FILLED = "fallback_filled"  # ... filled with a solid colour
    REJECTED = "rejected"  # the gate failed every attempt and the policy withholds the image
    FAILED = "failed"  # the final pixels still match (e.g. a fallback a recognizer still matches)
    NOT_GENERATED = "not_generated"  # blurred/pixelated by the face-size policy; not gated
    LEFT = "left"  # left unchanged by the face-size policy ("leave"); not gated
    UNVERIFIED = "unverified"  # verification switched off


class ImageVerdict(str, Enum):
    """The verdict of a whole image (``report["verdict"]``)."""

    PASSED = "passed"  # every face generated and passed the gate
    FALLBACK = "fallback"  # at least one face was obscured by the fallback, none failed
    PARTIAL = "partial"  # some face is left, failed, or otherwise not released as passed
    NOT_GATED = "not_gated"  # the face-size policy obscured every face, so none went through the gate
    REJECTED = "rejected"  # withheld: no image is returned
    NO_FACES = "no_faces"  # the detector found no face
    UNVERIFIED = "unverified"  # the gate was switched off


class OnNoFace(str, Enum):
    """What to do with an image in which the detector found no face."""

    REVIEW = "review"  # release it, and list it for review (not counted as passed)
    FAIL = "fail"  # withhold it, as a failure
    KEEP = "keep"  # release it as it is, counted as passed


# Verdicts an image can be released with, unreviewed.
RELEASED_AS_PASSED = frozenset({ImageVerdict.PASSED.value})

# Encoded formats accepted as input, by file suffix (shared by both CLIs and the server). HEIC/HEIF
# is not listed: the server's decoder (Pillow) cannot read it without pillow-heif, which the server
# does not register today; add ".heic"/".heif" here together with that decoder and a test.
INPUT_SUFFIXES = {
    ".jpg": "JPEG",
    ".jpeg": "JPEG",
    ".png": "PNG",
    ".webp": "WEBP",
    ".bmp": "BMP",
    ".tif": "TIFF",
    ".tiff": "TIFF",
    ".gif": "GIF",
}
# Formats an output can be written in: name -> file suffix.
OUTPUT_FORMATS = {"jpeg": ".jpg", "png": ".png", "webp": ".webp"}
QUALITY_RANGE = (1, 100)  # PARAMS "quality" (JPEG/WebP encoder quality)

# Limits a server enforces by default (the serve command can lower or raise them).
MAX_GATE_RETRIES = 5
MAX_STEPS = 250  # 2.5x the method's default; the method itself allows up to 1000 (in process)
MAX_FACES = 64  # faces detected in one photo
MAX_PIXELS = 64_000_000  # about 8000 x 8000; larger images are refused before decoding
MAX_REQUEST_BYTES = 64 * 1024 * 1024
MAX_PARAMS_BYTES = 64 * 1024

REPORT_FORMAT = "revpers-report"
REPORT_VERSION = 2

# Authentication: tritonserver's restricted-protocol feature. The server is started with
# --grpc-restricted-protocol=inference:<API_KEY_HEADER>=<key>; a gRPC client sends the metadata
# header GRPC_HEADER_PREFIX + API_KEY_HEADER. Admin APIs (model config, repository control,
# statistics, trace, logging) are restricted to ADMIN_KEY_HEADER.
API_KEY_HEADER = "x-api-key"
ADMIN_KEY_HEADER = "x-admin-key"
GRPC_HEADER_PREFIX = "triton-grpc-protocol-"
API_KEY_ENV = "REVPERS_API_KEY"
# What tritonserver answers (status UNAVAILABLE) to a request without the right key: not retryable.
RESTRICTED_MESSAGE = "This protocol is restricted"
ADMIN_KEY_ENV = "REVPERS_ADMIN_KEY"
