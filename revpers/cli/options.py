"""Command-line options shared by the subcommands: the method's parameters and the gate's policy."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from revpers.core.params import Params
from revpers.gate.policy import FALLBACKS, MAX_RETRIES, RETRY_MODES, VerifyPolicy
from revpers.service.request import Limits
from revpers_client.protocol import GATE_KEYS, METHOD_KEYS, params_of

DEFAULT_MODELS = Path(os.environ.get("REVPERS_MODELS", "models"))


def add_param_arguments(p: argparse.ArgumentParser) -> None:
    d = Params()
    p.add_argument(
        "--guidance", type=float, default=d.guidance, help=f"CFG scale w (negative anonymizes; default {d.guidance})"
    )
    p.add_argument("--ip-scale", type=float, default=d.ip_scale, help=f"IP-Adapter scale (default {d.ip_scale})")
    p.add_argument(
        "--id-scale", type=float, default=d.id_scale, help=f"identity embedding scale (default {d.id_scale})"
    )
    p.add_argument("--steps", type=int, default=d.steps, help=f"solver steps N (default {d.steps})")
    p.add_argument("--skip", type=float, default=d.skip, help=f"fraction of the schedule skipped (default {d.skip})")
    p.add_argument("--seed", type=int, default=d.seed, help=f"noise seed (default {d.seed})")
    p.add_argument("--prompt", default=None, help="attribute prompt, e.g. 'an old man' (generation uncond branch only)")


def add_verify_arguments(p: argparse.ArgumentParser) -> None:
    d = VerifyPolicy()
    g = p.add_argument_group("identity verification gate (docs/verification.md)")
    g.add_argument(
        "--no-verify",
        dest="verify",
        action="store_false",
        help="skip the gate: generated faces are not checked and get verdict 'unverified' (so does "
        "the image); faces the size policy obscured or left keep 'not_generated'/'left', and a "
        "photo with no face is 'no_faces'",
    )
    g.add_argument(
        "--retries",
        type=int,
        default=d.retries,
        help=f"extra attempts for faces that still match their input (0-{MAX_RETRIES}; default {d.retries})",
    )
    g.add_argument(
        "--retry-mode",
        choices=RETRY_MODES,
        default=d.retry_mode,
        help=f"new seed, stronger guidance (guidance - attempt x step), or both (default {d.retry_mode})",
    )
    g.add_argument(
        "--guidance-step",
        type=float,
        default=d.guidance_step,
        help=f"guidance change per retry, in (0, 20] (default {d.guidance_step})",
    )
    g.add_argument(
        "--fallback",
        choices=FALLBACKS,
        default=d.fallback,
        help=f"after the last failed attempt: obscure the face, starting with this mode and "
        f"escalating (blur, pixelate, fill) while a recognizer still matches it, or reject the "
        f"image (no image written; exit 1) (default {d.fallback})",
    )


def verify_policy_from_args(args):
    return VerifyPolicy.from_mapping(params_of(args, GATE_KEYS))


def params_from_args(args):
    return Params.from_mapping(params_of(args, METHOD_KEYS))


def add_limit_arguments(p: argparse.ArgumentParser) -> None:
    """What one request may cost on the server (written into the BLS model's config)."""
    d = Limits()
    lo, hi = Limits.BOUNDS["max_steps"]
    g = p.add_argument_group("request limits (each refused request gets INVALID_ARGUMENT with the limit named)")
    g.add_argument(
        "--max-request-bytes",
        type=int,
        default=d.max_bytes,
        metavar="BYTES",
        help=f"largest encoded image, checked before decoding (default {d.max_bytes})",
    )
    g.add_argument(
        "--max-pixels",
        type=int,
        default=d.max_pixels,
        help=f"largest width x height, read from the image header before decoding (default {d.max_pixels}; "
        f"at most {Limits.BOUNDS['max_pixels'][1]}, Pillow's own limit)",
    )
    g.add_argument(
        "--max-faces", type=int, default=d.max_faces, help=f"most faces detected in one photo (default {d.max_faces})"
    )
    g.add_argument(
        "--max-steps", type=int, default=d.max_steps, help=f"largest PARAMS steps ({lo}-{hi}; default {d.max_steps})"
    )
    g.add_argument(
        "--max-retries",
        type=int,
        default=d.max_retries,
        help=f"largest PARAMS retries ({'-'.join(map(str, Limits.BOUNDS['max_retries']))}; default {d.max_retries})",
    )


def limits_from_args(args) -> Limits:
    return Limits(
        max_bytes=args.max_request_bytes,
        max_pixels=args.max_pixels,
        max_faces=args.max_faces,
        max_steps=args.max_steps,
        max_retries=args.max_retries,
    )
