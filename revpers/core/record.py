"""The base of every typed record that crosses a boundary (reports, audit records, summaries):
a dataclass that reads like the JSON it serializes to."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from enum import Enum
from typing import Any, ClassVar


def plain(value):
    if isinstance(value, Record):
        return value.to_dict()
    if isinstance(value, Enum):
        return value.value
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    return value


class Record(Mapping):
    """Base of the records: read access by key as well as by attribute, ``to_dict``/``from_dict``.

    ``OMIT_NONE`` names the optional fields left out of the JSON while unset."""

    OMIT_NONE: ClassVar[frozenset[str]] = frozenset()

    def _present(self) -> list[str]:
        return [
            f.name for f in dataclasses.fields(self) if not (f.name in self.OMIT_NONE and getattr(self, f.name) is None)
        ]

    def __getitem__(self, key: str):
        if key in self._present():
            return getattr(self, key)
        raise KeyError(key)

    def __iter__(self):
        return iter(self._present())

    def __len__(self) -> int:
        return len(self._present())

    def __setitem__(self, key: str, value) -> None:
        if key not in {f.name for f in dataclasses.fields(self)}:
            raise KeyError(f"{type(self).__name__} has no field {key!r}")
        setattr(self, key, value)

    def to_dict(self) -> dict:
        return {name: plain(getattr(self, name)) for name in self._present()}

    def to_json(self, **kwargs) -> str:
        return json.dumps(self.to_dict(), **kwargs)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]):
        """The record from its JSON form; unknown keys are refused."""
        return cls(**checked_fields(cls, data))


def checked_fields(cls, data: Mapping[str, Any]) -> dict:
    """``data`` as keyword arguments of the dataclass ``cls``, refusing keys it has no field for."""
    unknown = set(data) - {f.name for f in dataclasses.fields(cls)}
    if unknown:
        raise ValueError(f"{cls.__name__}: unknown field(s) {', '.join(sorted(unknown))}")
    return dict(data)
