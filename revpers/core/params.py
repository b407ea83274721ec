"""The method's parameters (algorithm.md defaults) and the validation of untrusted values.

Every value that comes from a user (command line, JSON, a Triton request) goes through
``Params.from_mapping`` or ``coerce_number``: unknown keys, wrong types, non-finite numbers and
out-of-range values are refused with a ParameterError naming the parameter.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from revpers.core.errors import ParameterError
from revpers.core.schedule import timesteps

__all__ = ["Params", "ParameterError", "coerce_number", "given_values"]


def given_values(values: dict, known, what: str = "parameter(s)") -> dict:
    """The entries of untrusted ``values`` that are set (not None), after refusing any key not in
    ``known`` with a ParameterError naming them (``what``: how to call them)."""
    unknown = set(values) - set(known)
    if unknown:
        raise ParameterError(f"unknown {what}: {', '.join(sorted(unknown))}")
    return {k: v for k, v in values.items() if v is not None}


def coerce_number(name: str, raw, kind: type) -> int | float:
    """An int or float parameter from untrusted input (JSON numbers or numeric strings). Booleans,
    non-integral values for integers and non-finite values are refused with a ParameterError."""
    what = "an integer" if kind is int else "a number"
    if isinstance(raw, bool) or (kind is int and isinstance(raw, float) and not raw.is_integer()):
        raise ParameterError(f"{name} must be {what}, got {_shown(raw)}")
    try:
        value = kind(raw) if not isinstance(raw, str) else kind(float(raw) if kind is float else int(raw))
    except (TypeError, ValueError):  # ValueError includes ints of more digits than Python converts
        raise ParameterError(f"{name} must be {what}, got {_shown(raw)}") from None
    except OverflowError:  # an integer too large for a float (float(10**400)), or int(inf)
        raise ParameterError(f"{name} must be finite, got {_shown(raw)}") from None
    if isinstance(value, float) and not math.isfinite(value):
        raise ParameterError(f"{name} must be finite, got {_shown(raw)}")
    return value


def _shown(raw, limit: int = 40) -> str:
    """A user's value for an error message, cut short (a 400-digit number is not echoed whole)."""
    if isinstance(raw, int) and not isinstance(raw, bool) and raw.bit_length() > 128:
        # str() of a huge int is slow, and refused past 4300 digits: give its size instead
        return f"an integer of about {int((raw.bit_length() - 1) * math.log10(2)) + 1} digits"
    text = repr(raw)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


@dataclass(frozen=True)
class Params:
    """Method parameters; defaults are algorithm.md's."""

    guidance: float = -10.0
    ip_scale: float = 1.0
    id_scale: float = 1.0
    steps: int = 100
    skip: float = 0.7
    seed: int = 0
    prompt: str | None = None

    LIMITS = {
        "guidance": (-50.0, 50.0),
        "ip_scale": (0.0, 5.0),
        "id_scale": (0.0, 5.0),
        "steps": (1, 1000),
        "skip": (0.0, 0.99),
        "seed": (0, 2**63 - 1),
    }

    @classmethod
    def from_mapping(cls, values: dict) -> "Params":
        """Validated construction from untrusted input (CLI, JSON, Triton request)."""
        kwargs = {}
        for name, raw in given_values(values, cls.__dataclass_fields__).items():
            default = cls.__dataclass_fields__[name].default
            if name == "prompt":
                if not isinstance(raw, str):
                    raise ParameterError(f"prompt must be a string, got {type(raw).__name__}")
                if len(raw) > 1000:
                    raise ParameterError("prompt is longer than 1000 characters")
                kwargs[name] = raw.strip() or None
                continue
            value = coerce_number(name, raw, type(default))
            lo, hi = cls.LIMITS[name]
            if not lo <= value <= hi:
                raise ParameterError(f"{name}={_shown(value)} is out of range [{lo}, {hi}]")
            kwargs[name] = value
        params = cls(**kwargs)
        try:
            timesteps(params.steps, params.skip)
        except ValueError as exc:
            raise ParameterError(str(exc)) from None
        return params

    def as_dict(self) -> dict:
        return asdict(self)
