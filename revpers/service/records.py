"""Typed records that cross a boundary: the per-image report and its faces (the audit record it
carries is ``revpers.gate.audit.AuditRecord``).

Each is a dataclass (its fields are the schema; ``docs/schemas/*.schema.json`` is generated from
them by ``python -m revpers.service.schemas`` and checked by the tests). Records read like the JSON
they serialize to (``report["verdict"]`` and ``report.verdict`` are the same), so code that reads
reports does not care whether it holds the record or its JSON. Optional fields that are unset are
left out of the JSON.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

from revpers.core.record import Record, checked_fields
from revpers.gate.audit import AuditRecord, BundleRef
from revpers_client.protocol import REPORT_FORMAT, REPORT_VERSION, FaceVerdict, ImageVerdict


@dataclass(eq=False)
class FaceReport(Record):
    """One face of an image: where it was, what was done to it and what the gate measured."""

    OMIT_NONE: ClassVar[frozenset[str]] = frozenset(
        {"score", "landmarks", "crop_size", "scale", "matrix", "reason", "verification", "fallback_checks"}
    )

    index: int
    box: list[float]
    action: str  # anonymized, blurred, pixelated, filled, left, rejected
    verdict: FaceVerdict
    identity_source: str | None = None
    seed_used: int | None = None
    attempts: list[dict] = field(default_factory=list)  # {"seed", "guidance", ...} per generator attempt
    verification: dict | None = None  # the gate's measurement of the released pixels (recognizer similarities)
    fallback_checks: list[dict] | None = None  # the gate's check after each fallback rung (blur, pixelate, fill)
    reason: str | None = None
    score: float | None = None
    landmarks: list[list[float]] | None = None
    crop_size: int | None = None
    scale: float | None = None
    matrix: list[list[float]] | None = None


@dataclass(eq=False)
class ImageReport(Record):
    """The report of one image: what the service did, with which settings, and its verdict."""

    OMIT_NONE: ClassVar[frozenset[str]] = frozenset(
        {
            "warning",
            "faces_found",
            "policy",
            "total_ms",
            "note",
            "rejected_reason",
            "resized",
            "faces_in_batch",
            "seed_used",
            "identity_source",
            "batch_total_ms",
            "server_total_ms",
            "server_interval",
            "input",
            "output",
            "request_id",
            "review",
            "client",
            "input_sha256",
            "output_sha256",
        }
    )

    revpers_version: str
    mode: str  # "photo" or "aligned"
    params: dict
    models: dict
    smoke: bool
    device: str
    unet_dtype: str
    inversion_batch: int
    input_size: list[int]
    generator_size: int
    faces: list[FaceReport]
    generator_batches: list[int]  # faces per generator call, one entry per gate attempt
    verdict: ImageVerdict
    verification: dict
    timings_ms: dict[str, float]
    audit: AuditRecord
    format: str = REPORT_FORMAT
    version: int = REPORT_VERSION
    warning: str | None = None  # set for smoke bundles: the output is noise
    faces_found: int | None = None
    policy: dict | None = None
    total_ms: float | None = None
    note: str | None = None
    rejected_reason: str | None = None
    review: str | None = None  # why a person should look at this image before release
    resized: bool | None = None
    faces_in_batch: int | None = None
    seed_used: int | None = None
    identity_source: str | None = None
    batch_total_ms: float | None = None
    server_total_ms: float | None = None
    server_interval: dict | None = None  # {"pid", "start_ns", "end_ns"} (monotonic clock) of a served request
    request_id: str | None = None
    input: str | None = None
    output: str | None = None
    input_sha256: str | None = None
    output_sha256: str | None = None
    client: dict | None = None  # added by revpers-client: its own view of the request

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "ImageReport":
        d = dict(data)
        d["faces"] = [FaceReport.from_dict(f) for f in d.get("faces", [])]
        audit = dict(d["audit"])
        audit["bundle"] = BundleRef.from_dict(audit["bundle"])
        d["audit"] = AuditRecord.from_dict(audit)
        d["verdict"] = ImageVerdict(d["verdict"])
        return cls(**checked_fields(cls, d))


__all__ = ["AuditRecord", "BundleRef", "FaceReport", "FaceVerdict", "ImageReport", "ImageVerdict", "Record"]
