"""The identity gate's policy: what to do when an output face still matches its input face, the
operating points of the recognizers, and the verdict names (the Enums of revpers_client.protocol).
How the gate measures and decides is in docs/verification.md."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from revpers.core.params import ParameterError, Params, coerce_number, given_values
from revpers_client.protocol import MAX_GATE_RETRIES, FaceVerdict, ImageVerdict

VERIFY_SIZE = 320  # side of the whole-face crop both recognizers read (eye distance 80 px)
DLIB_THRESHOLD = 0.6  # Euclidean distance; dlib's documented operating point (99.38 % on LFW)
ARCFACE_THRESHOLD = 0.28  # cosine; FAR 0.1 % on LFW for an insightface ArcFace (docs/verification.md)
ROUND = 4  # digits kept in reports and audit records
SEED_STRIDE = 1_000_003  # retry a's seed is the face's seed + a * SEED_STRIDE (mod 2**63)
MAX_RETRIES = MAX_GATE_RETRIES
RETRY_MODES = ("seed", "guidance", "both")
FALLBACKS = ("blur", "pixelate", "fill", "reject")
LOCATE_TOLERANCE = 0.1  # a re-detected face must have its 5 points within this fraction of the crop

# per-face verdicts (report["faces"][i]["verdict"]); see FaceVerdict for what each means
PASSED = FaceVerdict.PASSED
FALLBACK_VERDICT = {
    "blur": FaceVerdict.FALLBACK_BLURRED,
    "pixelate": FaceVerdict.FALLBACK_PIXELATED,
    "fill": FaceVerdict.FALLBACK_FILLED,
}
REJECTED = FaceVerdict.REJECTED
FAILED = FaceVerdict.FAILED
NOT_GENERATED = FaceVerdict.NOT_GENERATED
LEFT = FaceVerdict.LEFT
UNVERIFIED = FaceVerdict.UNVERIFIED
FACE_VERDICTS = tuple(v.value for v in FaceVerdict)
IMAGE_VERDICTS = tuple(v.value for v in ImageVerdict)


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
        if (
            isinstance(self.guidance_step, bool)
            or not isinstance(self.guidance_step, (int, float))
            or not math.isfinite(self.guidance_step)
            or not 0 < self.guidance_step <= 20
        ):
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
