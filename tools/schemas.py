"""Write the published JSON Schemas of the typed records to docs/schemas/ (``--check``: exit 1 when
the committed files differ from what the records say). The records are plain dataclasses; pydantic
(a development dependency) turns their fields into JSON Schema.

    python tools/schemas.py          # regenerate
    python tools/schemas.py --check  # what the tests and `make lint` run
"""

from __future__ import annotations

import dataclasses
import json
import sys
import typing
from pathlib import Path

from pydantic import ConfigDict, TypeAdapter

from revpers.gate.audit import AuditRecord, BundleRef
from revpers.service.records import FaceReport, ImageReport
from revpers_client.ledger import AuditManifest, ReviewRow, RunSummary

OUT = Path(__file__).resolve().parent.parent / "docs" / "schemas"
RECORDS = {
    "image-report": ImageReport,
    "audit-record": AuditRecord,
    "run-summary": RunSummary,
    "audit-manifest": AuditManifest,
    "review-list": list[ReviewRow],
}
NESTED = {"FaceReport": FaceReport, "AuditRecord": AuditRecord, "BundleRef": BundleRef}


def schema(record_type) -> dict:
    """The JSON Schema of a record type: every field as declared, no property it does not declare."""
    for cls in _dataclasses(record_type):
        cls.__pydantic_config__ = ConfigDict(extra="forbid")
    s = TypeAdapter(record_type).json_schema(mode="serialization")
    s["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    s["$id"] = f"https://revpers.invalid/schemas/{getattr(record_type, '__name__', 'list')}.schema.json"
    _drop_omitted(s, record_type)
    for name, sub in s.get("$defs", {}).items():
        nested = NESTED.get(name)
        if nested is not None:
            _drop_omitted(sub, nested)
    return s


def _dataclasses(t) -> list:
    """Every dataclass reachable from a record type's fields (so each refuses unknown properties)."""
    seen, todo = [], [t]
    while todo:
        t = todo.pop()
        todo.extend(typing.get_args(t))
        if dataclasses.is_dataclass(t) and t not in seen:
            seen.append(t)
            todo.extend(typing.get_type_hints(t).values())
    return seen


def _drop_omitted(s: dict, record_type) -> None:
    """Optional fields a record leaves out of its JSON while unset are not required."""
    optional = set(getattr(record_type, "OMIT_NONE", ()))
    s["required"] = [name for name in s.get("required", []) if name not in optional]


def render(record_type) -> str:
    return json.dumps(schema(record_type), indent=2, sort_keys=True) + "\n"


def main(argv: list[str]) -> int:
    check = "--check" in argv
    stale = []
    for name, record_type in RECORDS.items():
        path = OUT / f"{name}.schema.json"
        text = render(record_type)
        if check:
            if not path.is_file() or path.read_text() != text:
                stale.append(str(path))
        else:
            OUT.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
            print(f"wrote {path}")
    for p in stale:
        print(f"{p} is out of date: run python tools/schemas.py")
    return 1 if stale else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
