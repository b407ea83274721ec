"""The BLS model against a real tritonserver with configured limits (issue 14): requests over a
limit or malformed are INVALID_ARGUMENT with a message and no server internals, a cancelled request
stops within one UNet call, revpers's own metrics count exactly what was served, each request is one
JSON log line, a drain file turns new requests away with UNAVAILABLE, and reports name the bundle
without its path.

The repository has TWO BLS instances (the `revpers repository` default): every metric is made by
both stubs, and the tests sum over them."""

from __future__ import annotations

import json
import re
import time
import urllib.request

import numpy as np
import pytest
from conftest import real_photo, start_triton

pytestmark = pytest.mark.server

grpcclient = pytest.importorskip("tritonclient.grpc")
from tritonclient.utils import InferenceServerException  # noqa: E402

MODEL = "revpers"
LEAKS = ("Traceback", "/work", "site-packages", 'File "', '.py"', "/tmp")  # nothing of the server's insides


@pytest.fixture(scope="module")
def drain_file(tmp_path_factory):
    return tmp_path_factory.mktemp("drain") / "draining"


@pytest.fixture(scope="module")
def server(onnx_artifacts, smoke_bundle_dir, tmp_path_factory, drain_file):
    from revpers.service.request import Limits
    from revpers.serving.repository import build_repository

    limits = Limits(
        max_pixels=1_200_000, max_faces=3, max_retries=2
    )  # t1.jpg: 1280x886  # bytes and steps: the defaults
    repo = build_repository(
        onnx_artifacts[0],
        tmp_path_factory.mktemp("limits-repo") / "repo",
        "onnxruntime",
        bundle=smoke_bundle_dir,
        bls_instances=2,
        limits=limits,
    )
    srv = start_triton(repo, env={"REVPERS_DRAIN_FILE": str(drain_file)})
    try:
        yield srv
    finally:
        srv.stop()


@pytest.fixture(scope="module")
def client(server):
    c = grpcclient.InferenceServerClient(server.urls.grpc)
    yield c
    c.close()


def png(rgb: np.ndarray) -> bytes:
    from revpers.service.images import encode_image

    return encode_image(rgb, "PNG")


def inputs(data: bytes, params: dict | bytes | None):
    i1 = grpcclient.InferInput("IMAGE", [1, 1], "BYTES")
    i1.set_data_from_numpy(np.array([[data]], dtype=np.object_))
    out = [i1]
    if params is not None:
        raw = params if isinstance(params, bytes) else json.dumps(params).encode()
        i2 = grpcclient.InferInput("PARAMS", [1, 1], "BYTES")
        i2.set_data_from_numpy(np.array([[raw]], dtype=np.object_))
        out.append(i2)
    return out


def infer(client, data: bytes, params=None, request_id: str = "") -> tuple[bytes, dict]:
    r = client.infer(MODEL, inputs(data, params), request_id=request_id)
    return bytes(r.as_numpy("IMAGE")[0, 0]), json.loads(r.as_numpy("REPORT")[0, 0])


def refused(client, data: bytes, params=None) -> InferenceServerException:
    with pytest.raises(InferenceServerException) as info:
        infer(client, data, params)
    return info.value


def no_face_image() -> bytes:
    """Smooth colour gradients: nothing a face detector takes for a face."""
    y, x = np.mgrid[0:256, 0:320]
    return png(np.stack([x * 255 // 319, y * 255 // 255, (x + y) * 255 // 574], -1).astype(np.uint8))


# ---------------------------------------------------------------------------------------------- metrics
_LINE = re.compile(r"^(\w+)(?:\{(.*)\})? ([-+0-9.eE]+|[+-]?Inf|NaN)$")


def scrape(url: str) -> list[tuple[str, dict, float]]:
    with urllib.request.urlopen(url, timeout=10) as r:
        text = r.read().decode()
    rows = []
    for line in text.splitlines():
        m = _LINE.match(line)
        if m:
            rows.append((m.group(1), dict(re.findall(r'(\w+)="([^"]*)"', m.group(2) or "")), float(m.group(3))))
    return rows


def value(rows, name: str, **labels) -> float:
    """A metric summed over every series whose labels include ``labels`` (e.g. over BLS instances)."""
    return sum(v for n, lab, v in rows if n == name and all(lab.get(k) == w for k, w in labels.items()))


def series(rows, name: str, label: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for n, lab, v in rows:
        if n == name and label in lab:
            out[lab[label]] = out.get(lab[label], 0.0) + v
    return out


def wait_for(condition, what: str, timeout: float = 60.0):
    """Poll until ``condition()`` is truthy (a wait for the server, not a timing assertion)."""
    t_end = time.monotonic() + timeout
    while time.monotonic() < t_end:
        got = condition()
        if got:
            return got
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def scrape_when(url: str, condition, what: str, timeout: float = 60.0):
    """The first scrape whose rows satisfy ``condition(rows)``."""
    return wait_for(lambda: (lambda rows: rows if condition(rows) else None)(scrape(url)), what, timeout)  # noqa: PLC3002


def log_lines(server) -> list[dict]:
    """The per-request JSON lines the BLS wrote to the server log."""
    text = server.log_path.read_text(errors="replace")
    lines = []
    for line in text.splitlines():
        at = line.find('{"event":"request"')
        if at >= 0:
            lines.append(json.loads(line[at:]))
    return lines


# ---------------------------------------------------------------------------------------------- tests
def _malformed_cases():
    good = png(real_photo())
    return [
        (
            "200 MB image",
            b"\x89PNG\r\n\x1a\n" + bytes(200 * 1024 * 1024),
            {"steps": 2},
            r"IMAGE: 209715208 bytes; this server's limit is 67108864 bytes",
        ),
        (
            "too many pixels",
            png(np.zeros((1000, 1300, 3), np.uint8)),
            {"steps": 2},
            r"IMAGE: image is 1300x1000 = 1300000 pixels; the limit is 1200000 pixels",
        ),
        (
            "Pillow's bomb limit",
            _png_header(100000, 100000),
            {"steps": 2},
            r"IMAGE: image is 10000000000 pixels; the limit is 1200000 pixels",
        ),
        ("too many faces", png(real_photo("t1.jpg")), {"steps": 2}, r"6 faces found; this server's limit is 3"),
        ("steps over the limit", good, {"steps": 300, "skip": 0.0}, r"steps=300 is above this server's limit of 250"),
        ("retries over the limit", good, {"steps": 2, "retries": 3}, r"retries=3 is above this server's limit of 2"),
        (
            "JSON nested 100,000 deep",
            good,
            b'{"steps": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
            r"PARAMS is 200011 bytes; the limit is",
        ),
        (
            "JSON nested 30,000 deep",
            good,
            b'{"steps": ' + b"[" * 30_000 + b"]" * 30_000 + b"}",
            r"PARAMS is nested 30001 levels deep",
        ),
        (
            "400-digit guidance",
            good,
            b'{"guidance": ' + b"9" * 400 + b"}",
            r"guidance must be finite, got an integer of about 400 digits",
        ),
        ("5000-digit steps", good, b'{"steps": ' + b"9" * 5000 + b"}", r"PARAMS is not valid JSON"),
        ("400-digit steps", good, b'{"steps": ' + b"9" * 400 + b"}", r"steps=an integer of about 400 digits is out"),
    ]


def _png_header(w: int, h: int) -> bytes:
    import struct
    import zlib

    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
        + chunk(b"IDAT", zlib.compress(b"\x00" * 4))
        + chunk(b"IEND", b"")
    )


def test_over_the_limits_and_malformed_are_invalid_argument_without_internals(server, client):
    before = scrape(server.urls.metrics)
    seen = []
    for label, data, params, pattern in _malformed_cases():
        err = refused(client, data, params)
        message = err.message()
        seen.append(f"{label}: {err.status()} {message[:110]}")
        assert err.status() == "StatusCode.INVALID_ARGUMENT", (label, err.status(), message)
        assert re.search(pattern, message), (label, message)
        assert not [leak for leak in LEAKS if leak in message], (label, message)
    print("\n".join(seen))
    after = scrape(server.urls.metrics)
    n = len(_malformed_cases())
    # every refused request counted once, as invalid, and as nothing else
    assert (
        value(after, "revpers_requests_total", outcome="invalid")
        - value(before, "revpers_requests_total", outcome="invalid")
        == n
    )
    assert value(after, "revpers_requests_total") - value(before, "revpers_requests_total") == n
    assert value(after, "revpers_unet_calls_total") == value(before, "revpers_unet_calls_total")
    # the 200 MB one was refused by its size, before decoding: its log line has the bytes and no faces
    big = [line for line in log_lines(server) if line["bytes"] == 209715208]
    assert big and big[-1]["outcome"] == "invalid" and big[-1]["error"] == "limit" and big[-1]["faces"] is None
    assert client.is_server_ready() and client.is_model_ready(MODEL)


def test_metrics_count_exactly_what_was_served(server, client, smoke_bundle_dir):
    """/metrics before and after: one ok aligned face (gate off), one invalid request, one photo
    with no face. Each revpers counter moves by exactly that; UNet calls and samples agree with
    Triton's own count for the `unet` model; each request is one JSON log line."""
    from revpers.models.bundle import load_bundle

    before = scrape(server.urls.metrics)
    tag = f"m{time.time_ns()}"
    face_bytes, noface_bytes = png(real_photo()), no_face_image()
    image, ok = infer(client, face_bytes, {"mode": "aligned", "steps": 3, "verify": False}, request_id=f"{tag}-ok")
    err = refused(client, face_bytes, {"steps": "abc"})
    assert err.status() == "StatusCode.INVALID_ARGUMENT"
    _, noface = infer(client, noface_bytes, {"steps": 3}, request_id=f"{tag}-noface")
    assert ok["verdict"] == "unverified" and noface["verdict"] == "no_faces" and image
    after = scrape_when(
        server.urls.metrics,
        lambda rows: value(rows, "revpers_requests_in_flight") == 0,
        "requests in flight to reach 0",
    )

    def delta(name, **labels):
        return value(after, name, **labels) - value(before, name, **labels)

    outcomes = series(after, "revpers_requests_total", "outcome")
    assert set(outcomes) == {"ok", "rejected", "invalid", "cancelled", "unavailable", "error"}
    assert {o: delta("revpers_requests_total", outcome=o) for o in outcomes} == {
        "ok": 2,
        "rejected": 0,
        "invalid": 1,
        "cancelled": 0,
        "unavailable": 0,
        "error": 0,
    }
    verdicts = series(after, "revpers_faces_total", "verdict")
    assert {v: delta("revpers_faces_total", verdict=v) for v in verdicts} == {
        v: (1 if v == "unverified" else 0) for v in verdicts
    }
    assert delta("revpers_no_face_images_total") == 1
    assert delta("revpers_gate_retries_total") == 0 and delta("revpers_gate_fallbacks_total") == 0
    calls = delta("revpers_unet_calls_total")
    assert calls > 0 and calls == delta("nv_inference_request_success", model="unet")  # Triton counted the same
    assert delta("revpers_unet_batch_size_count") == calls
    assert delta("revpers_unet_batch_size_sum") == delta("nv_inference_count", model="unet")  # samples
    assert delta("revpers_request_duration_seconds_count") == 3
    stages = {s for r in (ok, noface) for s in r["timings_ms"]}
    assert stages >= {"decode", "encode", "inversion", "generation", "detect"}
    for stage in stages:
        assert delta("revpers_stage_duration_seconds_count", stage=stage) == sum(
            stage in r["timings_ms"] for r in (ok, noface)
        ), stage

    lines = {line["request_id"]: line for line in log_lines(server) if line["request_id"].startswith(tag)}
    assert lines[f"{tag}-ok"] | {"ms": None} == {
        "event": "request",
        "request_id": f"{tag}-ok",
        "outcome": "ok",
        "bytes": len(face_bytes),
        "faces": 1,
        "verdict": "unverified",
        "ms": None,
    }
    assert lines[f"{tag}-noface"]["faces"] == 0 and lines[f"{tag}-noface"]["verdict"] == "no_faces"

    # reports name the bundle by name and manifest hash; nothing in them holds its path
    bundle = load_bundle(smoke_bundle_dir)
    assert ok["models"]["manifest_sha256"] == bundle.digest() and ok["models"]["name"]
    assert "path" not in ok["models"]
    for report in (ok, noface):
        text = json.dumps(report)
        assert str(smoke_bundle_dir) not in text and str(bundle.root) not in text
        assert str(bundle.root.parent) not in text


def test_cancelled_request_stops_within_one_unet_call(server, client):
    """A long request (250 steps, skip 0: 25 inversion + 250 generation UNet calls) is cancelled by
    its client once it is under way; the server stops it at its next UNet call. Measured as UNet calls
    made after the cancel (revpers_unet_calls_total, this being the only request)."""
    from revpers.core.schedule import timesteps

    params = {"mode": "aligned", "steps": 250, "skip": 0.0, "verify": False}
    inversion_batch = int(
        json.loads(
            client.get_model_config(MODEL, as_json=True)["config"]["parameters"]["inversion_batch"]["string_value"]
        )
    )
    n = len(timesteps(250, 0.0))
    full = -(-n // inversion_batch) + n  # the UNet calls of the whole request
    url = server.urls.metrics
    start = scrape(url)
    calls0, cancelled0 = (
        value(start, "revpers_unet_calls_total"),
        value(start, "revpers_requests_total", outcome="cancelled"),
    )
    answers = []
    ctx = client.async_infer(
        MODEL,
        inputs(png(real_photo()), params),
        lambda result, error: answers.append((result, error)),
        request_id="cancel-me",
    )
    wait_for(lambda: value(scrape(url), "revpers_unet_calls_total") - calls0 >= 20, "20 UNet calls", 120)
    at_cancel = value(scrape(url), "revpers_unet_calls_total") - calls0
    ctx.cancel()
    t_cancel = time.perf_counter()
    done = scrape_when(
        url,
        lambda rows: value(rows, "revpers_requests_total", outcome="cancelled") > cancelled0,
        "the request to be counted as cancelled",
        120,
    )
    stopped_s = time.perf_counter() - t_cancel
    total = value(done, "revpers_unet_calls_total") - calls0
    after = total - at_cancel
    line = [x for x in log_lines(server) if x["request_id"] == "cancel-me"][-1]
    print(
        f"cancel: {at_cancel:.0f} UNet calls before the cancel, {after:.0f} after; {total:.0f} of {full} made; "
        f"counted as cancelled {stopped_s * 1e3:.0f} ms after the cancel; log line {line}"
    )
    assert line["outcome"] == "cancelled" and line["error"] == "cancelled"
    # at most: one call started between the scrape and the cancel, the call running at the cancel,
    # and one started before is_cancelled() turned true (2-5 ms); the rest (over 200 calls) never ran
    assert after <= 3
    assert total < full - 200
    # the client learns of it from its own side (this tritonclient calls back with CANCELLED)
    assert all(result is None and "CANCELLED" in str(error.status()) for result, error in answers), answers
    assert client.is_model_ready(MODEL)


def test_drain_file_turns_new_requests_away(server, client, drain_file):
    data = png(real_photo())
    before = scrape(server.urls.metrics)
    drain_file.write_text("")
    try:
        err = refused(client, data, {"mode": "aligned", "steps": 2})
    finally:
        drain_file.unlink()
    assert err.status() == "StatusCode.UNAVAILABLE" and "server is draining" in err.message()
    after = scrape(server.urls.metrics)
    assert (
        value(after, "revpers_requests_total", outcome="unavailable")
        - value(before, "revpers_requests_total", outcome="unavailable")
        == 1
    )
    image, report = infer(client, data, {"mode": "aligned", "steps": 2})  # the file gone, it serves again
    assert image and report["faces"]
