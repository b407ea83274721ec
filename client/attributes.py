"""Structured attribute control: age / sex / race -> the attribute prompt.

The method's authors built their attribute prompts from dataset metadata with the template

    "{age}-year-old {race} {man|woman|boy|girl|baby-boy|baby-girl}"

and the prompt replaces the unconditional text of generation (the server's ``prompt`` parameter).
:func:`attribute_prompt` renders exactly that template. The noun comes from sex and age:

    age 0-2    baby-boy / baby-girl
    age 3-17   boy / girl
    age 18+    man / woman   (also when no age is given)

``sex`` is required (it picks the noun); ``age`` (integer, 0-120) and ``race`` (one word of ASCII
letters and hyphens, e.g. ``asian``, ``latino-hispanic``; lower-cased) are optional, and a part
that is not given is left out with its space: ``--sex female --race black`` -> ``"black woman"``,
``--age 70 --sex male`` -> ``"70-year-old man"``.
"""

from __future__ import annotations

import re

SEXES = ("female", "male")
AGE_RANGE = (0, 120)
BABY_MAX_AGE = 2  # 0..2: baby-boy / baby-girl
CHILD_MAX_AGE = 17  # 3..17: boy / girl; 18 and over: man / woman
_RACE = re.compile(r"[A-Za-z]+(?:-[A-Za-z]+)*")
_NOUNS = {"male": ("baby-boy", "boy", "man"), "female": ("baby-girl", "girl", "woman")}


class AttributeValueError(ValueError):
    """Invalid attribute value (the message says which and why)."""


def parse_age(value) -> int:
    """An age as given on a command line or in JSON: an integer in ``AGE_RANGE``."""
    if isinstance(value, bool):
        raise AttributeValueError(f"age must be an integer, got {value!r}")
    if isinstance(value, str):
        text = value.strip()
        if not re.fullmatch(r"[0-9]+", text):
            raise AttributeValueError(f"age must be a whole number of years, got {value!r}")
        value = int(text)
    if isinstance(value, float):
        if not value.is_integer():
            raise AttributeValueError(f"age must be a whole number of years, got {value!r}")
        value = int(value)
    if not isinstance(value, int):
        raise AttributeValueError(f"age must be an integer, got {type(value).__name__}")
    lo, hi = AGE_RANGE
    if not lo <= value <= hi:
        raise AttributeValueError(f"age must be between {lo} and {hi}, got {value}")
    return value


def parse_race(value: str) -> str:
    if not isinstance(value, str) or not _RACE.fullmatch(value.strip()) or len(value.strip()) > 40:
        raise AttributeValueError(
            f"race must be one word of letters and hyphens (at most 40 characters), "
            f"e.g. 'asian' or 'latino-hispanic'; got {value!r}"
        )
    return value.strip().lower()


def parse_sex(value: str) -> str:
    v = str(value).strip().lower()
    if v not in SEXES:
        raise AttributeValueError(f"sex must be one of {', '.join(SEXES)}; got {value!r}")
    return v


def noun(sex: str, age: int | None) -> str:
    baby, child, adult = _NOUNS[parse_sex(sex)]
    if age is None or age > CHILD_MAX_AGE:
        return adult
    return baby if age <= BABY_MAX_AGE else child


def attribute_prompt(sex: str, age: int | None = None, race: str | None = None) -> str:
    """``"{age}-year-old {race} {noun}"`` with the parts not given left out (see module docstring)."""
    if sex is None:
        raise AttributeValueError(
            "sex is required for an attribute prompt (it picks man/woman/boy/girl/baby-boy/baby-girl)"
        )
    age = None if age is None else parse_age(age)
    parts = []
    if age is not None:
        parts.append(f"{age}-year-old")
    if race is not None:
        parts.append(parse_race(race))
    parts.append(noun(sex, age))
    return " ".join(parts)
