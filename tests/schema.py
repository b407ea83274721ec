"""Validation of the JSON that the CLI, the server and the client write, against the published
schemas in docs/schemas/ (generated from the record types by tools/schemas.py)."""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

import jsonschema

SCHEMAS = Path(__file__).resolve().parent.parent / "docs" / "schemas"


@lru_cache(maxsize=None)
def validator(name: str) -> jsonschema.protocols.Validator:
    schema = json.loads((SCHEMAS / f"{name}.schema.json").read_text())
    cls = jsonschema.validators.validator_for(schema)
    cls.check_schema(schema)
    return cls(schema)


def validate(name: str, instance) -> None:
    """Raise jsonschema.ValidationError when ``instance`` (a record or its JSON form) does not match
    the published schema ``docs/schemas/<name>.schema.json``."""
    data = instance.to_dict() if hasattr(instance, "to_dict") else instance
    validator(name).validate(json.loads(json.dumps(data)))


def validate_report(report) -> None:
    """An image report (with its audit record) as written by any writer."""
    validate("image-report", report)
