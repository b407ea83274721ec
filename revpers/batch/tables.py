"""The tables of a batch run: one row per image (written by Ray, the checkpointed sink), the audit
table with one row per face, the review list and the run summary, all derived from the image rows.

Image row statuses (the same words as revpers-client's ledger): ``ok`` (released as passed),
``review`` (released, but a person should look: verdict not ``passed``, or no face found),
``rejected`` (the identity gate withheld the image), ``failed`` (an error, or no face under
``on_no_face=fail``), ``not_done`` (not processed: the run stopped first; never written, so a
re-run does it).
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
from collections import Counter

import pyarrow as pa
import pyarrow.compute as pc

from revpers_client.protocol import ImageVerdict

OK, REVIEW, REJECTED, FAILED, NOT_DONE, NOT_TAKEN = "ok", "review", "rejected", "failed", "not_done", "not_taken"
REVIEW_FIELDS = ("input", "status", "verdict", "output", "reason")  # as revpers_client.ledger.ReviewRow

# one face's verdict, as the report's faces[] hold it: in the images table (nested) and the audit table
FACE_VERDICT_FIELDS = [
    ("action", pa.string()),
    ("verdict", pa.string()),
    ("arcface_cosine", pa.float64()),
    ("dlib_distance", pa.float64()),
    ("passed", pa.bool_()),
    ("seed", pa.int64()),
    ("attempts", pa.int32()),
    ("guidance", pa.float64()),
    ("reason", pa.string()),
]
FACE_TYPE = pa.struct([("index", pa.int32()), ("box", pa.list_(pa.float64())), *FACE_VERDICT_FIELDS])

IMAGE_SCHEMA = pa.schema(
    [
        ("path", pa.string()),  # the input's filesystem path: Ray's checkpoint id (unique per run)
        ("rel", pa.string()),  # relative to the input root; mirrored under OUTPUT
        ("output", pa.string()),  # the image written, relative to OUTPUT (null when withheld or failed)
        ("status", pa.string()),
        ("verdict", pa.string()),
        ("reason", pa.string()),
        ("input_sha256", pa.string()),
        ("output_sha256", pa.string()),
        ("params_sha256", pa.string()),
        ("bundle_sha256", pa.string()),  # the bundle that made it (from the report: the server's in server mode)
        ("key", pa.string()),  # sha256(input_sha256:params_sha256:bundle_sha256)
        ("dlib_model_sha256", pa.string()),
        ("arcface_model_sha256", pa.string()),
        ("smoke", pa.bool_()),
        ("requests", pa.int32()),  # requests sent for this image (server mode retries included)
        ("seconds", pa.float64()),
        ("worker", pa.string()),  # host:pid of the actor that did it
        ("run_id", pa.string()),  # the run (invocation) that did it
        ("faces", pa.list_(FACE_TYPE)),
    ]
)

AUDIT_SCHEMA = pa.schema(
    [
        ("path", pa.string()),
        ("input_sha256", pa.string()),
        ("key", pa.string()),
        ("image_verdict", pa.string()),
        ("face_index", pa.int32()),
        ("box", pa.list_(pa.float64())),
        *FACE_VERDICT_FIELDS,
        ("params_sha256", pa.string()),
        ("bundle_sha256", pa.string()),
        ("dlib_model_sha256", pa.string()),
        ("arcface_model_sha256", pa.string()),
    ]
)


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def canonical(obj) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)


def row_key(input_sha256: str | None, params_sha256: str, bundle_sha256: str | None) -> str | None:
    if input_sha256 is None:
        return None
    return sha256_text(f"{input_sha256}:{params_sha256}:{bundle_sha256}")


def face_rows(report: dict) -> list[dict]:
    """The per-face columns of a report (photo or aligned mode)."""
    rows = []
    for f in report.get("faces") or []:
        v = f.get("verification") or {}
        attempts = f.get("attempts") or []
        rows.append(
            {
                "index": f.get("index"),
                "box": [float(x) for x in f.get("box") or []],
                "action": f.get("action"),
                "verdict": str(f.get("verdict")),
                "arcface_cosine": v.get("arcface_cosine"),
                "dlib_distance": v.get("dlib_distance"),
                "passed": v.get("passed"),
                "seed": f.get("seed_used"),
                "attempts": len(attempts),
                "guidance": attempts[-1].get("guidance") if attempts else None,
                "reason": f.get("reason"),
            }
        )
    return rows


def image_status(report: dict, released: bool) -> tuple[str, str | None]:
    """(status, reason) of an image the service answered for."""
    verdict = str(report.get("verdict"))
    if verdict == ImageVerdict.REJECTED.value:
        return REJECTED, report.get("rejected_reason") or "the identity gate withheld the image"
    if not released:
        return FAILED, report.get("review") or "no image was released"
    if report.get("review"):
        return REVIEW, report["review"]
    return OK, None


def model_hashes(report: dict) -> dict:
    audit = report.get("audit") or {}
    rec = ((report.get("verification") or {}).get("recognizers")) or {}
    return {
        "bundle_sha256": (audit.get("bundle") or {}).get("manifest_sha256"),
        "dlib_model_sha256": (rec.get("dlib") or {}).get("model_sha256"),
        "arcface_model_sha256": (rec.get("arcface") or {}).get("model_sha256"),
    }


def audit_table(images: pa.Table) -> pa.Table:
    """One row per face of the images done, sorted by input path and face index."""
    images = images.filter(pc.greater(pc.list_value_length(images["faces"]), 0))
    if images.num_rows == 0:
        return AUDIT_SCHEMA.empty_table()
    parents = pc.list_parent_indices(images["faces"])
    faces = pc.list_flatten(images["faces"])
    cols = {}
    for name in (
        "path",
        "input_sha256",
        "key",
        "params_sha256",
        "bundle_sha256",
        "dlib_model_sha256",
        "arcface_model_sha256",
    ):
        cols[name] = pc.take(images[name], parents)
    cols["path"] = pc.take(images["rel"], parents)
    cols["image_verdict"] = pc.take(images["verdict"], parents)
    for field in FACE_TYPE:
        cols["face_index" if field.name == "index" else field.name] = pc.struct_field(faces, field.name)
    table = pa.table({f.name: cols[f.name] for f in AUDIT_SCHEMA}, schema=AUDIT_SCHEMA)
    return table.sort_by([("path", "ascending"), ("face_index", "ascending")])


def review_rows(images: pa.Table, not_taken: list, not_done: list[str]) -> list[dict]:
    """Every input not released as passed: review, rejected and failed images, files not taken,
    inputs not done; sorted by path."""
    rows = [
        {
            "input": r["rel"],
            "status": r["status"],
            "verdict": r["verdict"],
            "output": r["output"],
            "reason": r["reason"],
        }
        for r in images.select(["rel", "status", "verdict", "output", "reason"]).to_pylist()
        if r["status"] != OK
    ]
    rows += [
        {"input": n.path, "status": NOT_TAKEN, "verdict": None, "output": None, "reason": n.reason} for n in not_taken
    ]
    rows += [
        {
            "input": rel,
            "status": NOT_DONE,
            "verdict": None,
            "output": None,
            "reason": "not processed: the run stopped first; run it again to continue",
        }
        for rel in not_done
    ]
    return sorted(rows, key=lambda r: (r["input"], r["status"]))


def review_csv(rows: list[dict]) -> bytes:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=REVIEW_FIELDS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue().encode()


def counts(images: pa.Table) -> dict:
    return dict(sorted(Counter(images["status"].to_pylist()).items()))
