"""Typed records and their published JSON Schemas (docs/schemas/), on a real photo and the smoke bundle."""

import json
import subprocess
import sys
from io import BytesIO
from pathlib import Path

import jsonschema
import numpy as np
import pytest
from PIL import Image

from revpers.core.errors import ParameterError
from revpers.faces.samples import insightface_photo
from revpers.service.anonymizer import Anonymizer
from revpers.service.images import read_file
from revpers.service.records import FaceReport, ImageReport
from revpers.service.request import RequestOptions, anonymize_bytes, parse_params
from revpers_client.protocol import FaceVerdict, ImageVerdict
from tests.schema import validate, validate_report

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def anonymizer(smoke_bundle, torch_models):
    return Anonymizer(smoke_bundle, models=torch_models)


@pytest.fixture(scope="module")
def photo_response(anonymizer):
    options = RequestOptions.from_mapping({"steps": 4, "retries": 0, "format": "png"})
    return anonymize_bytes(anonymizer, read_file(insightface_photo("Tom_Hanks_54745.png")), options)


def test_published_schemas_match_the_record_types():
    """docs/schemas/ is generated from the dataclasses; a field added without regenerating fails here."""
    out = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "schemas.py"), "--check"], capture_output=True, text=True, cwd=ROOT
    )
    assert out.returncode == 0, out.stdout + out.stderr


def test_a_served_photo_report_validates_and_round_trips(photo_response):
    report = photo_response.report
    assert isinstance(report, ImageReport) and isinstance(report.verdict, ImageVerdict)
    assert report.faces and all(isinstance(f, FaceReport) and isinstance(f.verdict, FaceVerdict) for f in report.faces)
    data = json.loads(report.to_json())
    validate_report(data)
    validate("audit-record", data["audit"])
    assert ImageReport.from_dict(data).to_dict() == data
    assert report["verdict"] is report.verdict  # read by key or by attribute alike


def test_the_schema_refuses_what_no_record_writes(photo_response):
    data = photo_response.report.to_dict()
    for broken in (
        {**data, "surprise": 1},
        {**data, "verdict": "probably_fine"},
        {k: v for k, v in data.items() if k != "audit"},
        {**data, "faces": [{**data["faces"][0], "verdict": "ok"}]},
    ):
        with pytest.raises(jsonschema.ValidationError):
            validate_report(broken)


def test_no_face_photo_is_marked_for_review_and_fail_withholds_it(anonymizer):
    rng = np.random.default_rng(0)
    buf = BytesIO()
    Image.fromarray(rng.integers(0, 255, (96, 128, 3), dtype=np.uint8)).save(buf, "PNG")
    data = buf.getvalue()
    review = anonymize_bytes(anonymizer, data, RequestOptions.from_mapping({"steps": 4}))
    assert review.report.verdict == ImageVerdict.NO_FACES and review.image and "no face" in review.report.review
    failed = anonymize_bytes(anonymizer, data, RequestOptions.from_mapping({"steps": 4, "on_no_face": "fail"}))
    assert failed.withheld and failed.report.output_sha256 is None
    kept = anonymize_bytes(anonymizer, data, RequestOptions.from_mapping({"steps": 4, "on_no_face": "keep"}))
    assert kept.image and kept.report.review is None
    for r in (review, failed, kept):
        validate_report(r.report)


@pytest.mark.parametrize(
    "raw, says",
    [
        ("[" * 100_000 + "]" * 100_000, "limit is"),  # the case: refused on its size, before parsing
        ('{"steps": ' + "[" * 30 + "]" * 30 + "}", "nested"),
        ('{"guidance": 1' + "0" * 400 + "}", "guidance"),
        ('{"steps": 1' + "0" * 5000 + "}", "not valid JSON"),
        ('{"steps": 4, "colour": "red"}', "unknown parameter"),
        ("[1, 2]", "JSON object"),
    ],
)
def test_malformed_params_are_parameter_errors(raw, says):
    with pytest.raises(ParameterError, match=says):
        RequestOptions.from_mapping(parse_params(raw.encode()))
