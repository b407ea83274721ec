"""The gRPC client library and `revpers-client` CLI against real tritonservers on loopback (smoke
bundle): folder trees mirrored with reports, summary and audit manifest; a corrupt file failing with
the server's message; kill + --resume; two servers both receiving work (their own metrics); retries
against a server that is down, starts late or is too slow; never retrying INVALID_ARGUMENT; the
attribute prompt as echoed by the server; health."""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest
from conftest import start_triton

REPO_ROOT = Path(__file__).resolve().parent.parent

from revpers_client import attributes  # noqa: E402
from revpers_client.batch import BatchClient, Job, RetryPolicy  # noqa: E402
from revpers_client.cli import main  # noqa: E402
from revpers_client.collection import UsageError, collect  # noqa: E402
from revpers_client.core import RevpersClient, ServiceError  # noqa: E402
from revpers_client.ledger import latency_stats  # noqa: E402
from tests.schema import validate, validate_report  # noqa: E402


def plan(inputs, outdir, fmt="keep"):
    return collect(inputs, outdir, fmt).items


def insightface_image(name: str) -> Path:
    from revpers.faces.samples import insightface_photo  # test-side only: the client package never imports revpers

    return insightface_photo(name)


TOM = insightface_image("Tom_Hanks_54745.png")
T1 = insightface_image("t1.jpg")
MASK = insightface_image("mask_white.jpg")


def astronaut_jpeg() -> bytes:
    from PIL import Image
    from skimage import data

    buf = io.BytesIO()
    Image.fromarray(data.astronaut()).save(buf, "JPEG", quality=92)
    return buf.getvalue()


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def image_format(path: Path) -> str:
    from PIL import Image

    with Image.open(path) as im:
        im.load()
        return im.format


def success_count(metrics_url: str, model: str = "revpers") -> float:
    with urllib.request.urlopen(metrics_url, timeout=10) as r:
        text = r.read().decode()
    total = 0.0
    for line in text.splitlines():
        if line.startswith("nv_inference_request_success{") and f'model="{model}"' in line:
            total += float(line.rsplit(" ", 1)[1])
    return total


def run_cli(*argv) -> int:
    return main([str(a) for a in argv])


# --------------------------------------------------------------------------- no server needed


def test_attribute_prompt_template_and_bands():
    p = attributes.attribute_prompt
    assert p("male", 70) == "70-year-old man"
    assert p("female", 70, "Asian") == "70-year-old asian woman"
    assert p("male", 18) == "18-year-old man"
    assert p("male", 17) == "17-year-old boy"
    assert p("female", 3, "latino-hispanic") == "3-year-old latino-hispanic girl"
    assert p("female", 2) == "2-year-old baby-girl"
    assert p("male", 0, "black") == "0-year-old black baby-boy"
    assert p("female") == "woman"
    assert p("male", None, "white") == "white man"
    for bad_age in (-1, 121, 30.5, "abc", "3e1", True):
        with pytest.raises(attributes.AttributeValueError, match="age"):
            p("male", bad_age)
    for bad_race in ("", "two words", "a1", "-x", "x-", "a" * 41, "asian;"):
        with pytest.raises(attributes.AttributeValueError, match="race"):
            p("male", 30, bad_race)
    with pytest.raises(attributes.AttributeValueError, match="sex"):
        p("other", 30)
    with pytest.raises(attributes.AttributeValueError, match="sex is required"):
        p(None, 30)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--prompt", "an old man", "--age", "70", "--sex", "male"], "mutually exclusive"),
        (["--age", "70"], "need --sex"),
        (["--race", "asian"], "need --sex"),
        (["--age", "200", "--sex", "male"], "between 0 and 120"),
        (["--age", "7.5", "--sex", "male"], "whole number"),
        (["--race", "two words", "--sex", "male"], "one word"),
        (["--sex", "other"], "sex must be one of female, male; got 'other'"),
        (["--retries", "6"], "retries must be an integer in [0, 5], got '6'"),
        (["--retries", "-1"], "retries must be an integer in [0, 5]"),
        (["--retries", "two"], "retries must be an integer in [0, 5], got 'two'"),
        (["--concurrency", "0"], "must be >= 1"),
        (["--timeout", "-1"], "must be a number > 0"),
    ],
)
def test_cli_refuses_bad_arguments(argv, message, tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        run_cli("anonymize", TOM, "-o", tmp_path / "out", "--url", "127.0.0.1:1", *argv)
    assert info.value.code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_cli_gate_retries_limit_is_the_servers():
    from revpers.gate.policy import MAX_RETRIES  # test-side only
    from revpers_client.cli import MAX_GATE_RETRIES, build_parser

    assert MAX_GATE_RETRIES == MAX_RETRIES
    base = ["anonymize", "x.jpg", "-o", "out", "--url", "127.0.0.1:1"]
    parser = build_parser()
    assert parser.parse_args(base + ["--retries", "0"]).retries == 0
    assert parser.parse_args(base + ["--retries", str(MAX_RETRIES)]).retries == MAX_RETRIES
    assert parser.parse_args(base + ["--sex", " Female "]).sex == "female"


def test_cli_refuses_bad_url(tmp_path, capsys):
    for url in ("localhost", "grpc://localhost:8001", "localhost:99999"):
        with pytest.raises(SystemExit):
            run_cli("anonymize", TOM, "-o", tmp_path / "out", "--url", url)
        assert "HOST:PORT" in capsys.readouterr().err


def test_plan_mirrors_folders_files_and_globs(tmp_path):
    src = tmp_path / "photos"
    for rel in (
        "a/x.jpg",
        "a/b/y.PNG",
        "c/z.webp",
        "c/.hidden.jpg",
        ".cache/w.jpg",
        "notes.txt",
        "d/v.jpeg",
        "e/scan.TIF",
        "e/old.bmp",
        "e/anim.gif",
        "e/phone.heic",
        "e/noext",
    ):
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        (src / rel).write_bytes(b"x")
    out = src / "anon"  # an output folder inside the input tree is never read as input
    (out / "a").mkdir(parents=True)
    (out / "a" / "x.jpg").write_bytes(b"x")
    (out / "a" / "x.jpg.json").write_text("{}")  # with its report: an output of an earlier run
    found = collect([str(src)], out)
    assert [(i.rel, i.out_rel, i.fmt) for i in found.items] == [
        ("a/b/y.PNG", "a/b/y.PNG", "png"),
        ("a/x.jpg", "a/x.jpg", "jpeg"),
        ("c/z.webp", "c/z.webp", "webp"),
        ("d/v.jpeg", "d/v.jpeg", "jpeg"),
        ("e/anim.gif", "e/anim.png", "png"),
        ("e/old.bmp", "e/old.png", "png"),
        ("e/scan.TIF", "e/scan.png", "png"),
    ]
    # every file not taken is listed with its reason (hidden entries are not walked at all)
    assert [(n.path, n.reason) for n in found.not_taken] == [
        ("e/noext", "unsupported format (no suffix)"),
        ("e/phone.heic", "unsupported format .heic"),
        ("notes.txt", "unsupported format .txt"),
    ]
    # a file goes to OUTDIR/<name>; named explicitly, an unsupported one is listed too; naming one twice is harmless
    found = collect([str(src / "notes.txt"), str(src / "a" / "x.jpg"), str(src / "a" / "x.jpg")], out)
    assert [(i.out_rel, i.fmt) for i in found.items] == [("x.jpg", "jpeg")]
    assert [(n.path, n.reason) for n in found.not_taken] == [("notes.txt", "unsupported format .txt")]
    # globs: relative to the pattern's leading folder
    items = plan([str(src / "**" / "*.jpg")], out)
    assert [i.rel for i in items] == ["a/x.jpg"]
    items = plan([str(src / "[ac]")], out)
    assert [i.rel for i in items] == ["a/b/y.PNG", "a/x.jpg", "c/z.webp"]
    # explicit output format renames
    items = plan([str(src / "a")], out, "webp")
    assert [(i.out_rel, i.fmt) for i in items] == [("b/y.webp", "webp"), ("x.webp", "webp")]
    other = tmp_path / "other"
    other.mkdir()
    (other / "x.jpg").write_bytes(b"y")
    (other / "x.png").write_bytes(b"y")
    with pytest.raises(UsageError, match="would both be written"):  # two files named x.jpg
        plan([str(src / "a" / "x.jpg"), str(other / "x.jpg")], out)
    with pytest.raises(UsageError, match="would both be written"):  # x.jpg and x.png -> x.png
        plan([str(other)], out, "png")
    with pytest.raises(UsageError, match="no such file"):
        plan([str(tmp_path / "missing")], out)
    with pytest.raises(UsageError, match="matches nothing"):
        plan([str(tmp_path / "*.gif")], out)
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    with pytest.raises(UsageError, match="no input images"):
        plan([str(tmp_path / "empty")], out)
    with pytest.raises(UsageError, match="no input images.*notes.txt"):
        plan([str(src / "notes.txt")], out)
    assert [i.rel for i in plan([str(src / ".cache")], out)] == ["w.jpg"]  # a hidden folder named explicitly


def test_input_formats_are_the_protocols_allow_list():
    from revpers_client import collection, protocol

    assert ".heic" not in protocol.INPUT_SUFFIXES  # no HEIF decoder on the server (see protocol.py)
    for suffix in protocol.INPUT_SUFFIXES:
        assert collection.supported(Path("x" + suffix.upper())) and collection.supported(Path("x" + suffix))
    assert not collection.supported(Path("x.txt"))


def test_outputs_over_inputs_are_refused(tmp_path):
    """The check alone (the CLI runs it before contacting a server: test_output_in_the_input_folder_is_refused)."""
    from revpers_client.collection import check_outputs

    src = tmp_path / "photos"
    (src / "sub").mkdir(parents=True)
    (src / "a.jpg").write_bytes(b"a")
    (src / "sub" / "b.png").write_bytes(b"b")
    (src / "sub" / "notes.txt").write_bytes(b"n")
    for out in (src, tmp_path / "link"):  # the input folder itself, also through a symlink
        if out.name == "link":
            out.symlink_to(src)
        for fmt in ("keep", "webp"):  # also when no name collides: a second run would take the outputs
            c = collect([str(src)], out, fmt, in_place=True)
            with pytest.raises(UsageError, match="is an input folder"):
                check_outputs(c, out)
            check_outputs(c, out, in_place=True)
    # an output folder inside the input tree, over a file of that tree this tool did not write
    (src / "sub" / "a.jpg").write_bytes(b"other a")
    c = collect([str(src)], src / "sub")  # sub is not walked: a.jpg -> sub/a.jpg
    assert [i.rel for i in c.items] == ["a.jpg"]
    # ... and a photo there that this tool did not write is listed as not taken, not skipped silently
    assert [(n.path, n.reason) for n in c.not_taken] == [
        ((src / "sub").as_posix() + f"/{name}", "inside the output folder, which is not searched")
        for name in ("a.jpg", "b.png")
    ]
    with pytest.raises(UsageError, match="would overwrite the input file .*sub/a.jpg"):
        check_outputs(c, src / "sub")
    (src / "sub" / "a.jpg.json").write_text("{}")  # an output of an earlier run (its report beside it)
    check_outputs(collect([str(src)], src / "sub"), src / "sub")
    # an output path that is a symlink to an input file would write through it
    (tmp_path / "o").mkdir()
    (tmp_path / "o" / "a.jpg").symlink_to(src / "a.jpg")
    with pytest.raises(UsageError, match="would overwrite the input"):
        check_outputs(collect([str(src / "a.jpg")], tmp_path / "o"), tmp_path / "o")
    # a file not taken is protected too (here: where a report would go)
    (tmp_path / "q").mkdir()
    (tmp_path / "q" / "a.jpg.json").symlink_to(src / "sub" / "notes.txt")
    with pytest.raises(UsageError, match="a.jpg.json would overwrite the input file .*notes.txt"):
        check_outputs(collect([str(src / "sub" / "notes.txt"), str(src / "a.jpg")], tmp_path / "q"), tmp_path / "q")
    # outputs elsewhere: fine
    check_outputs(collect([str(src)], tmp_path / "anon"), tmp_path / "anon")


def test_output_in_the_input_folder_is_refused_before_any_request(tmp_path, capsys):
    """-o equal to the input folder (also through a symlink, also with another --format): exit 2 with
    one line, nothing written, every input's SHA-256 unchanged. Nothing listens on the URL: were a
    request tried, the run would end with exit 1 (no server), not 2."""
    from revpers.serving.launcher import free_port  # test-side only

    src = tmp_path / "photos"
    (src / "kids").mkdir(parents=True)
    shutil.copy(TOM, src / "tom.png")
    shutil.copy(T1, src / "kids" / "t1.jpg")
    shutil.copy(TOM, src / "kids" / "tom.png")
    (src / "notes.txt").write_text("a note")
    (tmp_path / "link").symlink_to(src)
    before = {p: sha(p) for p in src.rglob("*") if p.is_file()}
    dead = f"127.0.0.1:{free_port()}"
    for out, extra in (
        (src, []),
        (src, ["--format", "webp"]),
        (tmp_path / "link", []),
        (src / "kids", []),
    ):  # tom.png -> kids/tom.png, a photo this tool never wrote
        code = run_cli("anonymize", src, "-o", out, "--url", dead, *extra)
        err = capsys.readouterr().err
        assert code == 2, (out, extra, err)
        assert err.count("\n") == 1 and err.startswith("revpers-client: error: ") and "--in-place" in err, err
        assert {p: sha(p) for p in src.rglob("*") if p.is_file()} == before
    assert not (src / "run-summary.json").exists()


def test_existing_outputs_are_kept_unless_overwrite_or_resume(tmp_path, capsys):
    from revpers.serving.launcher import free_port  # test-side only

    src, out = tmp_path / "photos", tmp_path / "out"
    src.mkdir()
    shutil.copy(TOM, src / "tom.png")
    out.mkdir()
    (out / "tom.png").write_bytes(b"someone's file")
    dead = f"127.0.0.1:{free_port()}"
    assert run_cli("anonymize", src, "-o", out, "--url", dead) == 2
    assert "1 output(s) exist already" in capsys.readouterr().err
    assert (out / "tom.png").read_bytes() == b"someone's file"
    # with --overwrite the run starts (and, with no server, stops with exit 1: test_no_server_...)
    assert run_cli("anonymize", src, "-o", out, "--url", dead, "--overwrite", "-q") == 1
    assert (out / "tom.png").read_bytes() == b"someone's file"  # nothing was done, nothing replaced


def test_no_server_fails_fast_with_one_line(tmp_path, capsys):
    """Circuit breaker, CLI: nothing listens on either URL. The health check before the run finds no
    server: one line, exit 1 (like a failed image: the command is right, the service is not there,
    and the same command can succeed later; exit 2 is for what a user must change), the summary
    written with every image not done and not one request sent."""
    from revpers.serving.launcher import free_port  # test-side only

    src, out = tmp_path / "photos", tmp_path / "out"
    src.mkdir()
    for k in range(12):
        (src / f"tom{k}.png").write_bytes(TOM.read_bytes())
    dead = [f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"]
    code = run_cli("anonymize", src, "-o", out, "--url", dead[0], "--url", dead[1], "--progress", "none")
    cap = capsys.readouterr()
    assert code == 1
    errors = [line for line in cap.err.splitlines() if line.startswith("revpers-client: error: ")]
    assert len(errors) == 1 and "no server can serve" in errors[0] and dead[0] in errors[0], cap.err
    assert "Traceback" not in cap.err + cap.out
    summary = json.loads((out / "run-summary.json").read_text())
    assert summary["requests_sent_per_url"] == {dead[0]: 0, dead[1]: 0}
    assert summary["counts"]["not_done"] == 12 and summary["exit_code"] == 1
    assert summary["stopped"].startswith("no server can serve")


def test_circuit_breaker_stops_spending_retries_per_image():
    """Library: two servers down. Requests retry while the servers might come back (max_wait_s);
    once every server has been failing that long, the breaker opens and the remaining requests fail
    at once with ServersDown, sending nothing. Counted in attempts, not seconds."""
    from revpers.serving.launcher import free_port  # test-side only
    from revpers_client.batch import ServersDown

    dead = [f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"]
    policy = RetryPolicy(max_wait_s=0.5, backoff_s=0.05, max_backoff_s=0.1)
    with BatchClient(dead, concurrency=2, retry=policy) as bc:
        results = list(bc.map(Job(k, b"image", {}) for k in range(30)))
        sent = sum(bc.sent_per_url().values())
    tried = [r for r in results if r.attempts]
    assert len(results) == 30 and not any(r.ok for r in results)
    print(f"attempts per request: {[r.attempts for r in results]}")
    # their last error: the servers' own, or the breaker's once another request opened it
    assert all(r.error.kind in ("not_ready", "down") for r in tried)
    assert all(len(r.errors) == r.attempts and all(": UNAVAILABLE: " in e for e in r.errors) for r in tried)
    assert 1 <= len(tried) <= 2  # only the requests in flight when the servers were found down
    assert sum(r.attempts for r in tried) == sent and sent >= 2 * len(tried)  # those did retry
    spared = [r for r in results if not r.attempts]
    assert len(spared) >= 28 and all(isinstance(r.error, ServersDown) and r.error.kind == "down" for r in spared)
    assert "no server answered" in spared[0].error.message


def test_version_and_verbosity_anywhere(capsys):
    from revpers_client import __version__
    from revpers_client.cli import build_parser

    with pytest.raises(SystemExit) as info:
        run_cli("--version")
    assert info.value.code == 0 and capsys.readouterr().out.startswith(f"revpers-client {__version__}")
    pyproject = (REPO_ROOT / "client" / "pyproject.toml").read_text()
    assert re.search(rf'^version = "{re.escape(__version__)}"$', pyproject, re.M)
    parser = build_parser()
    base = ["anonymize", "x.jpg", "-o", "out", "--url", "127.0.0.1:1"]
    assert parser.parse_args(["-v"] + base).verbose == 1
    assert parser.parse_args(base + ["-v"]).verbose == 1
    assert parser.parse_args(["-q"] + base).quiet and parser.parse_args(base + ["-q"]).quiet
    a = parser.parse_args(base)
    assert a.verbose == 0 and a.quiet is False
    assert parser.parse_args(["health", "--url", "h:1", "-q"]).quiet


def test_request_params_send_face_keys_and_quality_only_when_given():
    from revpers_client import protocol
    from revpers_client.cli import build_parser

    base = ["anonymize", "x.jpg", "-o", "out", "--url", "127.0.0.1:1"]
    assert protocol.params_of(build_parser().parse_args(base)) == {"mode": "photo"}
    got = protocol.params_of(
        build_parser().parse_args(
            base + ["--on-no-face", "fail", "--det-thresh", "0.4", "--min-face", "24", "--quality", "80"]
        )
    )
    assert got == {"mode": "photo", "on_no_face": "fail", "det_thresh": 0.4, "min_face": 24, "quality": 80}
    assert set(got) <= set(protocol.PARAM_KEYS)


def test_both_anonymize_commands_offer_every_request_key():
    """PARAMS are built from the options by name (protocol.params_of): a key that either command
    lacks, or names differently, would silently be left to the server's default."""
    from revpers.cli.main import build_parser as server_parser
    from revpers.service.request import RequestOptions
    from revpers_client import protocol
    from revpers_client.cli import build_parser as client_parser

    client_args = client_parser().parse_args(["anonymize", "x.jpg", "-o", "out", "--url", "h:1"])
    local_args = server_parser().parse_args(["anonymize", "x.jpg", "-o", "out"])
    # the formats are chosen per file; the in-process command has --aligned for the mode
    assert set(protocol.PARAM_KEYS) - {"format"} <= set(vars(client_args))
    assert set(protocol.PARAM_KEYS) - {"format", "mode"} <= set(vars(local_args))
    # same options, same request (the client leaves its defaults to the server, the in-process
    # command states them: both resolve to the same options)
    extra = ["--guidance", "-8", "--steps", "30", "--seed", "3", "--retries", "2", "--on-no-face", "keep"]
    client_args = client_parser().parse_args(["anonymize", "x.jpg", "-o", "o", "--url", "h:1", *extra])
    local_args = server_parser().parse_args(["anonymize", "x.jpg", "-o", "o", *extra])
    sent = protocol.params_of(client_args)
    assert {"guidance": -8.0, "steps": 30, "seed": 3, "retries": 2, "on_no_face": "keep"}.items() <= sent.items()
    local = protocol.params_of({**vars(local_args), "mode": "photo"})
    assert RequestOptions.from_mapping(sent) == RequestOptions.from_mapping(local)


@pytest.mark.parametrize(
    "on_no_face, status, exit_code, written",
    [("review", "review", 1, True), ("keep", "ok", 0, True), ("fail", "failed", 1, False)],
)
def test_engine_no_face_policy_with_an_in_process_runner(tmp_path, on_no_face, status, exit_code, written):
    """The run engine with a ``process`` of its own (as the in-process CLI passes): a no-face answer
    is reviewed, kept or failed per --on-no-face; a passed one is ok."""
    from revpers_client.engine import RunOptions, run_collection

    src = tmp_path / "in"
    src.mkdir()
    (src / "face.png").write_bytes(b"face")
    (src / "none.png").write_bytes(b"none")
    calls = []

    def process(item, data, params):
        calls.append((item.rel, data, params))
        verdict = "passed" if data == b"face" else "no_faces"
        return b"out-" + data, {"verdict": verdict, "faces": []}

    items = collect([str(src)], tmp_path / "out").items
    summary = run_collection(
        items,
        process,
        RunOptions(tmp_path / "out", {"steps": 2}, on_no_face=on_no_face, progress="none", printed=False, tool="test"),
    )
    assert sorted(calls) == [
        ("face.png", b"face", {"steps": 2, "format": "png"}),
        ("none.png", b"none", {"steps": 2, "format": "png"}),
    ]
    assert summary.exit_code == exit_code
    entries = {e["input"]: e for e in json.loads((tmp_path / "out" / "audit-manifest.json").read_text())["files"]}
    assert entries["face.png"]["status"] == "ok" and entries["none.png"]["status"] == status
    assert (tmp_path / "out" / "none.png").exists() == written
    rows = json.loads((tmp_path / "out" / "review.json").read_text())
    assert [(r["input"], r["status"]) for r in rows] == ([] if status == "ok" else [("none.png", status)])


def test_in_place_run_and_resume_do_not_anonymize_outputs_again(tmp_path):
    """--in-place (engine with an in-process ``process``): outputs replace the inputs; the reports
    and run files written into the input folder are not taken as inputs by the next walk, and a
    resumed run skips every image instead of anonymizing its own output again."""
    from revpers_client.collection import check_outputs
    from revpers_client.engine import RunOptions, run_collection

    src = tmp_path / "photos"
    (src / "sub").mkdir(parents=True)
    (src / "a.jpg").write_bytes(b"a")
    (src / "sub" / "b.png").write_bytes(b"b")
    sent = []

    def process(item, data, params):
        sent.append(data)
        return b"anon-" + data, {"verdict": "passed"}

    def run(resume):
        c = collect([str(src)], src, in_place=True)
        check_outputs(c, src, in_place=True)
        return c, run_collection(
            c.items, process, RunOptions(src, {}, resume=resume, progress="none", printed=False, tool="test")
        )

    c, summary = run(False)
    assert summary.exit_code == 0 and sorted(sent) == [b"a", b"b"]
    assert (src / "a.jpg").read_bytes() == b"anon-a" and (src / "sub" / "b.png").read_bytes() == b"anon-b"
    c, summary = run(True)
    assert c.not_taken == [] and [i.rel for i in c.items] == ["a.jpg", "sub/b.png"]
    assert summary.counts.skipped == 2 and summary.counts.ok == 0 and sorted(sent) == [b"a", b"b"]
    assert (src / "a.jpg").read_bytes() == b"anon-a"


def test_engine_stop_leaves_the_rest_not_done_and_ends(tmp_path):
    """A ``process`` that raises StopRun (as the server runner does when every server is down): the
    images in flight finish and are recorded, the queued ones are dropped as not done, the run ends
    (it does not wait for the dropped ones) with the StopRun's exit code."""
    from revpers_client.engine import RunOptions, StopRun, run_collection

    src = tmp_path / "in"
    src.mkdir()
    for k in range(6):
        (src / f"{k}.png").write_bytes(b"%d" % k)
    release = threading.Event()

    def process(item, data, params):
        if item.rel == "0.png":
            raise StopRun("servers gone", 1)
        release.wait(2.0)  # in flight while the stop is handled
        return b"out", {"verdict": "passed"}

    items = collect([str(src)], tmp_path / "out").items
    result = {}
    t = threading.Thread(
        daemon=True,
        target=lambda: result.update(
            s=run_collection(
                items,
                process,
                RunOptions(tmp_path / "out", {}, concurrency=2, progress="none", printed=False, tool="t"),
            )
        ),
    )
    t.start()
    t.join(timeout=120)
    release.set()
    assert not t.is_alive(), "the run did not end after StopRun"
    s = result["s"]
    assert s.stopped == "servers gone" and s.exit_code == 1
    assert s.counts.ok + s.counts.not_done == 6 and s.counts.not_done >= 3 and s.counts.failed == 0


def test_unwritable_output_folder_is_one_line(tmp_path, capsys):
    from revpers.serving.launcher import free_port  # test-side only

    (tmp_path / "file").write_text("not a folder")
    code = run_cli("anonymize", TOM, "-o", tmp_path / "file" / "out", "--url", f"127.0.0.1:{free_port()}")
    err = capsys.readouterr().err
    assert (
        code == 2
        and err.startswith("revpers-client: error: cannot create the output folder")
        and "Traceback" not in err
    )


def test_security_options_are_checked(tmp_path):
    from revpers_client import protocol
    from revpers_client.core import ConfigError, Security

    key = tmp_path / "key"
    key.write_text("s3cret\n")
    sec = Security.from_options(api_key_file=key, environ={})
    assert sec.headers == {protocol.GRPC_HEADER_PREFIX + protocol.API_KEY_HEADER: "s3cret"}
    assert Security.from_options(environ={protocol.API_KEY_ENV: "fromenv"}).api_key == "fromenv"
    assert Security.from_options(environ={}).headers is None
    (tmp_path / "empty").write_text("\n")
    for kwargs, message in (
        ({"api_key_file": tmp_path / "empty"}, "is empty"),
        ({"api_key_file": tmp_path / "missing"}, "cannot read"),
        ({"ca": str(key)}, "need --tls"),
        ({"tls": True, "ca": str(tmp_path / "missing")}, "no such file"),
        ({"tls": True, "cert": str(key)}, "go together"),
    ):
        with pytest.raises(ConfigError, match=message):
            Security.from_options(environ={}, **kwargs)


def test_latency_stats():
    assert latency_stats([30.0, 10.0, 20.0, 40.0]) == {
        "n": 4,
        "mean": 25.0,
        "p50": 25.0,
        "p95": 38.5,
        "min": 10.0,
        "max": 40.0,
    }
    assert latency_stats([1.23456], ndigits=3)["p95"] == 1.235
    assert latency_stats([]) == {"n": 0, "mean": None, "p50": None, "p95": None, "min": None, "max": None}


def test_backoff_and_retryable():
    import random

    pol = RetryPolicy(max_attempts=5, backoff_s=1.0, max_backoff_s=5.0)

    rng = random.Random(0)
    for attempt, cap in ((1, 1.0), (2, 2.0), (3, 4.0), (4, 5.0), (9, 5.0)):
        waits = [pol.delay(attempt, rng) for _ in range(200)]
        assert min(waits) >= cap / 2 and max(waits) <= cap
        assert max(waits) - min(waits) > cap / 4  # jittered, not a constant
    # a server down, restarting or loading: retried (until max_wait_s after the first failure);
    # that a real INVALID_ARGUMENT answer is sent once: test_deadline_exceeded_and_invalid_argument_are_not_retried
    assert pol.retry_on == {"UNAVAILABLE", "NOT_FOUND"}
    assert RetryPolicy(retry_internal=True).retry_on == {"UNAVAILABLE", "NOT_FOUND", "INTERNAL"}
    unavailable = ServiceError("failed to connect to all addresses", "StatusCode.UNAVAILABLE")
    assert pol.retryable(unavailable)
    assert pol.retryable(ServiceError("Request for unknown model: 'revpers' is not found", "StatusCode.NOT_FOUND"))
    assert pol.retryable(ServiceError("unet: Server not ready", "StatusCode.INTERNAL"))  # a draining server
    assert not pol.retryable(ServiceError("x", "StatusCode.INTERNAL"))
    assert not pol.retryable(ServiceError("x", "CLIENT"))
    assert not pol.retryable(ServiceError("x", "StatusCode.INVALID_ARGUMENT"))
    assert RetryPolicy(retry_internal=True).retryable(ServiceError("x", "StatusCode.INTERNAL"))
    # bounded by time since the first failure, and by max_attempts when set
    wait = RetryPolicy(max_wait_s=300.0)
    assert wait.retryable(unavailable, attempts=50, waited_s=299.0)
    assert not wait.retryable(unavailable, attempts=2, waited_s=300.0)
    assert not pol.retryable(unavailable, attempts=5)
    # the deadline travels with the request (the server stops): not retried unless asked, then once
    deadline = ServiceError("Deadline Exceeded", "StatusCode.DEADLINE_EXCEEDED")
    assert deadline.kind == "deadline" and not wait.retryable(deadline)
    assert RetryPolicy(retry_deadline=True).retryable(deadline, attempts=1)
    assert not RetryPolicy(retry_deadline=True).retryable(deadline, attempts=2)
    # an API key or TLS refusal is UNAVAILABLE too, but no retry can fix it
    auth = ServiceError(
        "This protocol is restricted, expecting header 'triton-grpc-protocol-x-api-key'", "StatusCode.UNAVAILABLE"
    )
    tls = ServiceError(
        "failed to connect to all addresses; last error: UNKNOWN: ipv4:127.0.0.1:1: Ssl handshake "
        "failed: SSL_ERROR_SSL: error:1000007d:SSL routines:OPENSSL_internal:CERTIFICATE_VERIFY_FAILED",
        "StatusCode.UNAVAILABLE",
    )
    assert auth.kind == "auth" and tls.kind == "tls" and unavailable.kind == "not_ready"
    assert not wait.retryable(auth) and not wait.retryable(tls)
    with pytest.raises(ValueError):
        RetryPolicy(max_attempts=0)


def test_server_choice_least_outstanding_rotation_and_cool_down():
    from revpers_client.batch import choose_server

    free = [0.0, 0.0, 0.0]
    # least-outstanding: the fewest in flight, wherever the rotation stands
    for turn in range(3):
        assert choose_server([3, 1, 2], free, now=10.0, turn=turn) == 1
    # ties rotate from ``turn``; round-robin ignores the counts
    assert [choose_server([1, 0, 0], free, 10.0, turn) for turn in range(3)] == [1, 1, 2]
    assert [choose_server([3, 1, 2], free, 10.0, turn, "round-robin") for turn in range(3)] == [0, 1, 2]
    # a server cooling down after UNAVAILABLE is skipped even when it has the fewest in flight ...
    assert choose_server([0, 5, 7], [15.0, 0.0, 0.0], now=10.0, turn=0) == 1
    assert choose_server([0, 5, 7], [15.0, 0.0, 0.0], now=10.0, turn=0, balance="round-robin") == 1
    # ... and taken again once its cool-down is over
    assert choose_server([0, 5, 7], [15.0, 0.0, 0.0], now=15.0, turn=0) == 0
    # all cooling down: the one that comes back first
    assert choose_server([0, 0, 0], [30.0, 12.0, 20.0], now=10.0, turn=0) == 1
    # a retry avoids the server it just failed on while another is up, not when it is the only one
    assert choose_server([0, 4], [0.0, 0.0], 10.0, 0, avoid=0) == 1
    assert choose_server([0, 4], [0.0, 15.0], 10.0, 0, avoid=0) == 0
    assert choose_server([0], [0.0], 10.0, 0, avoid=0) == 0


def test_batch_client_keeps_outstanding_counts_and_cools_down_unavailable_servers():
    """BatchClient's own bookkeeping around choose_server, without sending anything (gRPC channels
    connect only when used)."""
    urls = ["127.0.0.1:1", "127.0.0.1:2", "127.0.0.1:3"]
    with BatchClient(urls) as bc:
        a, b, c = (bc._acquire() for _ in range(3))
        assert [a.url, b.url, c.url] == urls  # a tie each time: rotation
        bc._release(b, None)
        assert bc._acquire() is b  # fewest outstanding (round-robin would take urls[0])
        bc._release(a, ServiceError("down", "StatusCode.UNAVAILABLE"))
        bc._release(c, None)
        assert a.outstanding == c.outstanding == 0 and b.outstanding == 1
        assert bc._acquire() is c  # a has none in flight but is cooling down
        bc._release(c, None)
        assert bc._acquire() is c
        bc._release(b, None)
        bc._release(c, None)
        assert bc._acquire(avoid=b) is c  # a retry leaves the server it failed on
        bc._release(c, None)
        a.down_until = 0.0  # cool-down over
        assert bc._acquire() is a
        assert bc.sent_per_url() == {urls[0]: 2, urls[1]: 2, urls[2]: 4}
    with BatchClient(urls[:2], balance="round-robin") as bc:
        first = bc._acquire()
        bc._release(first, None)
        assert [bc._acquire().url for _ in range(3)] == [urls[1], urls[0], urls[1]]


def test_resume_check_reads_the_input_only_when_needed_and_hands_its_bytes_on(tmp_path):
    from revpers_client.collection import Item
    from revpers_client.core import sha256_hex
    from revpers_client.ledger import resume_check

    src, out = tmp_path / "in.png", tmp_path / "out"
    src.write_bytes(b"input bytes")
    out.mkdir()
    (out / "in.png").write_bytes(b"output bytes")
    request = {"mode": "photo", "format": "png", "steps": 3}
    report = {
        "verdict": "passed",
        "client": {
            "request": request,
            "input_sha256": sha256_hex(b"input bytes"),
            "output_sha256": sha256_hex(b"output bytes"),
        },
    }
    (out / "in.png.json").write_text(json.dumps(report))
    item = Item(src, "in.png", "in.png", "png")
    assert resume_check(out, item, request).report == report  # complete: skipped
    # another request or a changed output: redo, and the input is not read for the check
    check = resume_check(out, item, request | {"steps": 2})
    assert check.report is None and check.data is None and check.input_sha256 is None
    (out / "in.png").write_bytes(b"tampered")
    assert resume_check(out, item, request).data is None
    (out / "in.png").write_bytes(b"output bytes")
    # a changed input: redo with the bytes and digest the check read
    src.write_bytes(b"new input")
    check = resume_check(out, item, request)
    assert check.report is None and check.data == b"new input" and check.input_sha256 == sha256_hex(b"new input")
    for broken in ("", "{", "[]", '{"client": {}}'):
        (out / "in.png.json").write_text(broken)
        assert resume_check(out, item, request).report is None


def test_batch_result_rejected_means_answered_without_an_image():
    from revpers_client.batch import BatchResult

    assert BatchResult("k", image=b"", report={"verdict": "rejected", "rejected_reason": "x"}).rejected
    assert BatchResult("k", image=b"", report={"verdict": "passed"}).rejected  # no image is never usable
    assert not BatchResult("k", image=b"png", report={"verdict": "passed"}).rejected
    failed = BatchResult("k", error=ServiceError("bad", "StatusCode.INVALID_ARGUMENT"))
    assert not failed.ok and not failed.rejected


def test_client_library_does_not_need_torch():
    code = (
        "import sys; import revpers_client, revpers_client.cli, revpers_client.batch; "
        "assert 'torch' not in sys.modules and 'revpers' not in sys.modules, sorted(sys.modules)"
    )
    subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, check=True)


def test_client_distribution_installs_alone(tmp_path):
    """`pip install ./client` (README "Client"): the revpers-client distribution, whose requirements
    name no torch/diffusers/onnxruntime/revpers; installed on its own it imports and its command runs."""
    src = tmp_path / "src"
    shutil.copytree(REPO_ROOT / "client", src, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
    site = tmp_path / "site"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "--target",
            str(site),
            str(src),
        ],
        check=True,
        capture_output=True,
        timeout=300,
    )
    meta = (next(site.glob("revpers_client-*.dist-info")) / "METADATA").read_text()
    requires = sorted(line.split(":", 1)[1].strip() for line in meta.splitlines() if line.startswith("Requires-Dist:"))
    assert requires == ["numpy", "tqdm>=4.60", "tritonclient[grpc]>=2.40"]
    assert sorted(p.name for p in (site / "revpers_client").glob("*.py")) == sorted(
        p.name for p in (REPO_ROOT / "client").glob("*.py")
    )
    env = {**os.environ, "PYTHONPATH": str(site)}
    code = (
        "import sys, revpers_client, revpers_client.cli, revpers_client.batch, revpers_client.core; "
        "from revpers_client import RevpersClient; "
        f"assert revpers_client.__file__.startswith({str(site)!r}), revpers_client.__file__; "
        "assert not {'torch', 'revpers', 'diffusers', 'onnxruntime'} & set(sys.modules), sorted(sys.modules)"
    )
    subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, check=True)
    out = subprocess.run(
        [str(site / "bin" / "revpers-client"), "--help"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0 and "anonymize" in out.stdout, out.stderr


# --------------------------------------------------------------------------- real server

server_tests = pytest.mark.server


@pytest.fixture(scope="module")
def url(triton_server):
    return triton_server.urls.grpc


@pytest.fixture(scope="module")
def second(onnxruntime_repository):
    """A second tritonserver, started by the first test that needs it (the late-start retry test
    starts it while a client is already retrying against its port)."""
    from revpers.serving.launcher import TritonServer, free_ports

    pytest.importorskip("tritonclient.grpc")
    holder = {"ports": free_ports(3), "server": None}

    def ensure():
        if holder["server"] is None:
            g, h, m = holder["ports"]
            holder["server"] = TritonServer(onnxruntime_repository, grpc_port=g, http_port=h, metrics_port=m).start()
        return holder["server"]

    holder["ensure"] = ensure
    holder["url"] = f"127.0.0.1:{holder['ports'][0]}"
    yield holder
    if holder["server"] is not None:
        holder["server"].stop()


def tiff_of(path: Path) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    with Image.open(path) as im:
        im.convert("RGB").save(buf, "TIFF")
    return buf.getvalue()


def make_tree(root: Path) -> dict[str, bytes]:
    """A small tree of real photos (one a TIFF) plus a corrupt JPEG and a non-image file."""
    files = {
        "scans/tom.tif": tiff_of(TOM),  # 1 face; TIFF in, PNG out
        "family/t1.jpg": T1.read_bytes(),  # 6 faces
        "family/kids/tom.png": TOM.read_bytes(),  # 1 face
        "space/astronaut.jpg": astronaut_jpeg(),  # 1 face, and a low-score 2nd detection
        "masks/mask_white.jpg": MASK.read_bytes(),  # no face found
        "space/broken.jpg": T1.read_bytes()[:20000],  # truncated JPEG
    }
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    (root / "README.txt").write_text("not an image; folders only take .jpg/.jpeg/.png/.webp\n")
    return files


@server_tests
def test_tree_is_mirrored_and_corrupt_file_fails_with_server_message(url, tmp_path, capsys):
    """Photos, a TIFF, a text file, a no-face image and a corrupt JPEG: outputs mirror the tree, the
    text file and the no-face image are in the review list with their reasons, exit 1."""
    src, out = tmp_path / "photos", tmp_path / "out"
    files = make_tree(src)
    t0 = time.perf_counter()
    # --no-verify: this test is about the tree, the counts and the corrupt file. With the gate on, a
    # smoke-noise face can still match after its blur fallback and the image is rejected (that path:
    # test_gate_rejection_reaches_the_client_as_a_failure_with_its_report).
    code = run_cli(
        "anonymize",
        src,
        "-o",
        out,
        "--url",
        url,
        "--steps",
        2,
        "--concurrency",
        3,
        "--seed",
        5,
        "--progress",
        "lines",
        "--no-verify",
    )
    wall = time.perf_counter() - t0
    captured = capsys.readouterr()
    assert code == 1, captured
    summary = json.loads((out / "run-summary.json").read_text())
    print(
        f"tree of {len(files)} files in {wall:.1f} s; summary counts {summary['counts']}, "
        f"latency {summary['latency_ms']}"
    )
    # --no-verify: nothing is released as passed, so every image answered is "review"
    assert summary["counts"] == {
        "inputs": 6,
        "ok": 0,
        "review": 5,
        "failed": 1,
        "skipped": 0,
        "not_done": 0,
        "not_taken": 1,
    }
    assert summary["exit_code"] == 1 and summary["smoke"] is True and summary["interrupted"] is None
    assert summary["not_taken"] == [{"path": "README.txt", "reason": "unsupported format .txt"}]
    # the failure carries exactly what the server says about those bytes
    with pytest.raises(ServiceError) as info:
        RevpersClient(url).anonymize(files["space/broken.jpg"], steps=2)
    assert info.value.code == "INVALID_ARGUMENT"
    [failure] = summary["failures"]
    assert failure["input"] == "space/broken.jpg" and failure["status"] == "INVALID_ARGUMENT"
    assert failure["message"] == info.value.message and "truncated" in failure["message"]
    assert failure["attempts"] == 1  # never retried
    assert "FAILED space/broken.jpg: INVALID_ARGUMENT" in captured.out
    assert "[6/6]" in captured.err
    assert "not taken: README.txt: unsupported format .txt" in captured.out
    # outputs mirror the tree in the input's format (TIFF -> PNG), each with its report beside it
    out_of = {k: ("scans/tom.png" if k == "scans/tom.tif" else k) for k in files}
    produced = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    good = sorted(k for k in files if k != "space/broken.jpg")
    assert produced == sorted(
        ["audit-manifest.json", "run-summary.json", "review.csv", "review.json"]
        + [out_of[g] for g in good]
        + [out_of[g] + ".json" for g in good]
    )
    faces = 0
    faces_in = {
        "family/t1.jpg": 6,
        "family/kids/tom.png": 1,
        "space/astronaut.jpg": 2,
        "masks/mask_white.jpg": 0,
        "scans/tom.tif": 1,
    }
    assert sorted(faces_in) == good
    for rel in good:
        fmt = image_format(out / out_of[rel])
        assert fmt == ("PNG" if out_of[rel].endswith(".png") else "JPEG"), (rel, fmt)
        report = json.loads((out / (out_of[rel] + ".json")).read_text())
        validate_report(report)  # the server's report with the client's block, as the schema publishes it
        assert report["params"]["steps"] == 2 and report["params"]["seed"] == 5
        assert report["client"]["input_sha256"] == hashlib.sha256(files[rel]).hexdigest()
        assert report["client"]["output_sha256"] == sha(out / out_of[rel])
        # what the server did to each face (a re-encoded image differs from its input in any case)
        assert report["faces_found"] == len(report["faces"]) == faces_in[rel], rel
        if faces_in[rel]:
            assert report["verdict"] == "unverified"
            assert all(f["action"] == "anonymized" and f["verdict"] == "unverified" for f in report["faces"]), rel
        else:
            assert report["verdict"] == "no_faces" and "no face found" in report["note"]
        faces += len(report["faces"])
    assert summary["faces"] == faces >= 9
    assert summary["faces_by_verdict"] == {"unverified": faces}
    assert summary["faces_by_action"] == {"anonymized": faces}
    assert summary["images_by_verdict"] == {"unverified": 4, "no_faces": 1}  # mask_white.jpg: no face found
    lat = summary["latency_ms"]
    assert lat["n"] == 5 and 0 < lat["p50"] <= lat["p95"] <= lat["max"]
    assert summary["throughput_images_per_s"] > 0
    # the review list: every image not released as passed, the failure and the file not taken, with reasons
    rows = json.loads((out / "review.json").read_text())
    validate("run-summary", summary)
    validate("audit-manifest", json.loads((out / "audit-manifest.json").read_text()))
    validate("review-list", rows)
    assert summary["review_list"] == {"csv": "review.csv", "json": "review.json", "rows": len(rows)}
    by_input = {r["input"]: r for r in rows}
    assert sorted(by_input) == sorted(list(files) + ["README.txt"])
    assert by_input["README.txt"] == {
        "input": "README.txt",
        "status": "not_taken",
        "verdict": None,
        "output": None,
        "reason": "unsupported format .txt",
    }
    assert by_input["masks/mask_white.jpg"] == {
        "input": "masks/mask_white.jpg",
        "status": "review",
        "verdict": "no_faces",
        "output": "masks/mask_white.jpg",
        "reason": "no face found: check that no face was missed",
    }
    assert by_input["space/broken.jpg"]["status"] == "failed"
    assert by_input["space/broken.jpg"]["reason"].startswith("INVALID_ARGUMENT: ")
    assert by_input["scans/tom.tif"] == {
        "input": "scans/tom.tif",
        "status": "review",
        "verdict": "unverified",
        "output": "scans/tom.png",
        "reason": "verdict unverified",
    }
    import csv

    with open(out / "review.csv", newline="") as fh:
        assert list(csv.DictReader(fh)) == [{k: "" if v is None else v for k, v in r.items()} for r in rows]
    # the audit manifest: sorted by input path, hashes of the real bytes, no times
    manifest = json.loads((out / "audit-manifest.json").read_text())
    entries = manifest["files"]
    assert [r["input"] for r in entries] == sorted(files)
    for r in entries:
        assert r["input_sha256"] == hashlib.sha256(files[r["input"]]).hexdigest()
        if r["input"] == "space/broken.jpg":
            assert r["status"] == "failed" and r["output_sha256"] is None
            assert r["error"]["status"] == "INVALID_ARGUMENT"
        else:
            assert r["status"] == "review" and r["output_sha256"] == sha(out / r["output"])
        assert "audit" in r
    assert not re.search(r"_ms|_at\"|wall", (out / "audit-manifest.json").read_text())
    # a second run into the same folder is refused (outputs exist), before any request
    assert run_cli("anonymize", src, "-o", out, "--url", url, "--steps", 2, "--progress", "none") == 2
    assert "exist already" in capsys.readouterr().err
    # the gate on (the default): a no-face image alone still exits 1 (--on-no-face review), listed
    nf = tmp_path / "noface"
    assert run_cli("anonymize", src / "masks", "-o", nf, "--url", url, "--steps", 2, "--progress", "none") == 1
    [row] = json.loads((nf / "review.json").read_text())
    assert row["input"] == "mask_white.jpg" and row["verdict"] == "no_faces" and row["status"] == "review"
    assert json.loads((nf / "run-summary.json").read_text())["counts"]["review"] == 1


@server_tests
def test_attribute_flags_reach_the_server_as_the_documented_prompt(url, tmp_path):
    for flags, want in (
        (["--age", 70, "--sex", "male"], "70-year-old man"),
        (["--age", 8, "--sex", "female", "--race", "Asian"], "8-year-old asian girl"),
    ):
        out = tmp_path / want.replace(" ", "_")
        code = run_cli(
            "anonymize", TOM, "-o", out, "--url", url, "--mode", "aligned", "--steps", 2, *flags, "--progress", "none"
        )
        assert code == 0
        report = json.loads((out / "Tom_Hanks_54745.png.json").read_text())
        assert report["params"]["prompt"] == want  # as the server parsed and used it


@server_tests
def test_kill_then_resume_finishes_without_redoing_or_partial_files(url, tmp_path):
    src, out = tmp_path / "photos", tmp_path / "out"
    n = 10
    for k in range(n):
        (src / f"part{k % 2}").mkdir(parents=True, exist_ok=True)
        (src / f"part{k % 2}" / f"face{k:02d}.png").write_bytes(TOM.read_bytes())
    cmd = [
        sys.executable,
        "-m",
        "revpers_client.cli",
        "anonymize",
        str(src),
        "-o",
        str(out),
        "--url",
        url,
        "--concurrency",
        "1",
        "--steps",
        "3",
        "--progress",
        "lines",
    ]

    def reports():
        return sorted(p for p in out.rglob("*.png.json"))

    proc = subprocess.Popen(cmd, cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        while len(reports()) < 3 and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
    log = proc.stdout.read().decode()
    assert proc.returncode == -signal.SIGKILL, log
    before = {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in reports()}
    images_before = {
        p.with_suffix(""): (p.with_suffix("").stat().st_ino, p.with_suffix("").stat().st_mtime_ns) for p in before
    }
    assert 3 <= len(before) < n, f"kill landed at {len(before)} of {n} outputs; log:\n{log}"
    assert not (out / "run-summary.json").exists()
    # every report written before the kill describes a whole image (reports are written last)
    for rp in before:
        assert json.loads(rp.read_text())["client"]["output_sha256"] == sha(rp.with_suffix(""))
    # what a crash can leave: a temporary file, and an image whose report was never written
    # (here made by hand so that the case is always exercised, whatever instant the kill hit)
    todo = sorted(p for p in src.rglob("*.png") if out / p.relative_to(src) not in images_before)
    victim = out / todo[0].relative_to(src)
    victim.parent.mkdir(parents=True, exist_ok=True)
    victim.write_bytes(TOM.read_bytes()[:500])
    (victim.parent / ("." + victim.name + ".part")).write_bytes(b"half")
    parts_after_kill = sorted(p.name for p in out.rglob("*.part"))

    t0 = time.perf_counter()
    resumed = subprocess.run(cmd + ["--resume"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    print(
        f"killed after {len(before)} of {n}; .part files left by the kill: {parts_after_kill}; "
        f"resume took {time.perf_counter() - t0:.1f} s"
    )
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    summary = json.loads((out / "run-summary.json").read_text())
    assert summary["counts"] == {
        "inputs": n,
        "ok": n - len(before),
        "review": 0,
        "failed": 0,
        "skipped": len(before),
        "not_done": 0,
        "not_taken": 0,
    }
    assert f"{len(before)} skipped" in resumed.stdout
    for p, stamp in {**before, **images_before}.items():  # not redone: same inode, same mtime
        assert (p.stat().st_ino, p.stat().st_mtime_ns) == stamp, p
    assert not list(out.rglob("*.part"))
    assert image_format(victim) == "PNG"
    for img in src.rglob("*.png"):
        o = out / img.relative_to(src)
        assert json.loads(Path(str(o) + ".json").read_text())["client"]["output_sha256"] == sha(o)
    manifest = json.loads((out / "audit-manifest.json").read_text())
    assert len(manifest["files"]) == n and all(r["status"] == "ok" for r in manifest["files"])
    assert all(r["output_sha256"] == sha(out / r["output"]) for r in manifest["files"])
    # the manifest is deterministic: a fresh uninterrupted run writes the same bytes
    fresh = tmp_path / "fresh"
    cmd_fresh = [fresh if a == str(out) else a for a in cmd]
    assert subprocess.run([str(a) for a in cmd_fresh], cwd=REPO_ROOT, capture_output=True, timeout=300).returncode == 0
    assert (fresh / "audit-manifest.json").read_bytes() == (out / "audit-manifest.json").read_bytes()
    # a second resume has nothing to do
    again = subprocess.run(cmd + ["--resume"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert again.returncode == 0
    assert json.loads((out / "run-summary.json").read_text())["counts"]["skipped"] == n
    # a changed input is redone, and its report records the new bytes' digest
    changed_src = sorted(src.rglob("*.png"))[0]
    changed_src.write_bytes(TOM.read_bytes() + b"\0")  # trailing byte after IEND: same image, new SHA-256
    redo = subprocess.run(cmd + ["--resume"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert redo.returncode == 0, redo.stdout + redo.stderr
    assert json.loads((out / "run-summary.json").read_text())["counts"] == {
        "inputs": n,
        "ok": 1,
        "review": 0,
        "failed": 0,
        "skipped": n - 1,
        "not_done": 0,
        "not_taken": 0,
    }
    redone = json.loads(Path(str(out / changed_src.relative_to(src)) + ".json").read_text())
    assert redone["client"]["input_sha256"] == sha(changed_src) == redone["audit"]["input_sha256"]
    # a changed parameter is not "complete" for --resume: everything is redone
    changed = subprocess.run(
        cmd[:-4] + ["--steps", "2", "--resume", "--concurrency", "2", "--progress", "none"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert changed.returncode == 0, changed.stderr
    assert json.loads((out / "run-summary.json").read_text())["counts"]["ok"] == n


@server_tests
@pytest.mark.parametrize("signame, code", [("SIGINT", 130), ("SIGTERM", 143)])
def test_signal_stops_cleanly_with_summary_and_resume_finishes_the_rest(url, tmp_path, signame, code):
    src, out = tmp_path / "photos", tmp_path / "out"
    src.mkdir()
    for k in range(8):
        (src / f"tom{k}.png").write_bytes(TOM.read_bytes())
    cmd = [
        sys.executable,
        "-m",
        "revpers_client.cli",
        "anonymize",
        str(src),
        "-o",
        str(out),
        "--url",
        url,
        "--concurrency",
        "1",
        "--steps",
        "3",
        "--mode",
        "aligned",
        "--progress",
        "lines",
    ]
    proc = subprocess.Popen(cmd, cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 120
    while not list(out.glob("*.png.json")) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    proc.send_signal(getattr(signal, signame))
    log = proc.communicate(timeout=60)[0]
    assert proc.returncode == code, log
    assert "Traceback" not in log
    summary = json.loads((out / "run-summary.json").read_text())
    done = sorted(p.name for p in out.glob("*.png.json"))
    stamps = {n: (out / n).stat().st_mtime_ns for n in done}
    assert summary["interrupted"] == signame and summary["exit_code"] == code
    assert summary["counts"]["ok"] == len(done) and summary["counts"]["not_done"] == 8 - len(done) > 0
    assert len(json.loads((out / "audit-manifest.json").read_text())["files"]) == len(done)
    not_done = [r for r in json.loads((out / "review.json").read_text()) if r["status"] == "not_done"]
    assert len(not_done) == 8 - len(done)
    assert not list(out.rglob("*.part"))
    # --resume finishes only the rest
    resumed = subprocess.run(cmd + ["--resume"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    counts = json.loads((out / "run-summary.json").read_text())["counts"]
    assert counts["skipped"] == len(done) and counts["ok"] == 8 - len(done) and counts["not_done"] == 0
    assert all((out / n).stat().st_mtime_ns == stamps[n] for n in done)  # not rewritten
    assert json.loads((out / "review.json").read_text()) == []


@server_tests
def test_retries_until_a_late_server_starts(second):
    """Nothing listens on the URL yet; the server starts while the client is retrying."""
    data = TOM.read_bytes()
    client = BatchClient(
        [second["url"]], retry=RetryPolicy(max_attempts=200, backoff_s=0.5, max_backoff_s=2.0), timeout=60
    )
    result = {}
    t = threading.Thread(target=lambda: result.update(r=client.run(Job("tom", data, {"mode": "aligned", "steps": 2}))))
    t.start()
    time.sleep(2.0)
    t0 = time.perf_counter()
    second["ensure"]()
    started = time.perf_counter() - t0
    t.join(timeout=240)
    client.close()
    res = result["r"]
    print(
        f"server started in {started:.1f} s; request succeeded after {res.attempts} attempts "
        f"({res.latency_s:.1f} s in all)"
    )
    assert res.ok, res.errors
    assert res.attempts >= 2
    assert all(": UNAVAILABLE: " in e for e in res.errors)
    assert res.report["params"]["steps"] == 2


@server_tests
def test_two_servers_both_receive_work(url, triton_server, second, tmp_path):
    srv2 = second["ensure"]()
    src = tmp_path / "photos"
    src.mkdir()
    for k in range(8):
        (src / f"tom{k}.png").write_bytes(TOM.read_bytes())
    before = (success_count(triton_server.urls.metrics), success_count(srv2.urls.metrics))
    t0 = time.perf_counter()
    code = run_cli(
        "anonymize",
        src,
        "-o",
        tmp_path / "out",
        "--url",
        url,
        "--url",
        srv2.urls.grpc,
        "--concurrency",
        4,
        "--steps",
        3,
        "--mode",
        "aligned",
        "--progress",
        "none",
    )
    wall = time.perf_counter() - t0
    assert code == 0
    after = (success_count(triton_server.urls.metrics), success_count(srv2.urls.metrics))
    got = (after[0] - before[0], after[1] - before[1])
    summary = json.loads((tmp_path / "out" / "run-summary.json").read_text())
    print(
        f"8 images over 2 servers in {wall:.1f} s: server-side successes {got}, "
        f"client-side {summary['requests_sent_per_url']}"
    )
    assert got[0] >= 1 and got[1] >= 1 and sum(got) == 8  # the servers' own counters
    assert summary["requests_sent_per_url"] == {url: got[0], srv2.urls.grpc: got[1]}


@server_tests
def test_dead_server_in_the_list_is_retried_elsewhere(url):
    from revpers.serving.launcher import free_port

    dead = f"127.0.0.1:{free_port()}"
    data = TOM.read_bytes()
    with BatchClient(
        [dead, url], concurrency=2, retry=RetryPolicy(max_attempts=3, backoff_s=0.05), balance="round-robin"
    ) as bc:
        results = list(bc.map(Job(k, data, {"mode": "aligned", "steps": 2}) for k in range(4)))
        sent = bc.sent_per_url()
    assert all(r.ok for r in results), [r.errors for r in results]
    assert all(r.url == url for r in results)
    assert sent[dead] >= 1 and sum(r.attempts for r in results) == 4 + sent[dead]
    assert any(": UNAVAILABLE: " in e for r in results for e in r.errors)


@server_tests
def test_deadline_exceeded_and_invalid_argument_are_not_retried(url):
    """DEADLINE_EXCEEDED is sent once (the deadline travels with the request, so the server is not
    left working on a copy), or twice when asked; INVALID_ARGUMENT once."""
    data = TOM.read_bytes()
    with BatchClient([url], timeout=0.05, retry=RetryPolicy(backoff_s=0.05)) as bc:
        slow = bc.run(Job("slow", data, {"mode": "aligned", "steps": 8}))
    with BatchClient([url], timeout=0.05, retry=RetryPolicy(backoff_s=0.05, retry_deadline=True)) as bc:
        slow_again = bc.run(Job("slow", data, {"mode": "aligned", "steps": 8}))
    # the server is still busy with the two abandoned requests: give these a normal deadline
    with BatchClient([url], timeout=60, retry=RetryPolicy(max_attempts=4, backoff_s=0.05)) as bc:
        bad = bc.run(Job("bad", data[:300], {"mode": "aligned", "steps": 2}))
        bad_param = bc.run(Job("bad", data, {"mode": "aligned", "steps": 0}))
    assert slow.error.code == "DEADLINE_EXCEEDED" and slow.attempts == 1, slow.errors
    assert slow_again.error.code == "DEADLINE_EXCEEDED" and slow_again.attempts == 2, slow_again.errors
    assert bad.error.code == "INVALID_ARGUMENT" and bad.attempts == 1
    assert bad_param.error.code == "INVALID_ARGUMENT" and bad_param.attempts == 1
    assert "steps" in bad_param.error.message
    with pytest.raises(ServiceError) as info:
        BatchClient([url], retry=RetryPolicy(max_attempts=3)).anonymize(data, stepz=2)
    assert info.value.code == "INVALID_ARGUMENT" and "stepz" in str(info.value)


@server_tests
def test_health(url, capsys):
    from revpers.serving.launcher import free_port

    assert run_cli("health", "--url", url) == 0
    text = capsys.readouterr().out
    assert "healthy" in text and re.search(r"model revpers\s+version 1\s+READY", text)
    assert run_cli("health", "--url", url, "--json") == 0
    info = json.loads(capsys.readouterr().out)
    [srv] = info["servers"]
    assert info["healthy"] and srv["live"] and srv["ready"] and srv["model_ready"]
    assert srv["server"]["name"] == "triton" and srv["server"]["version"]
    assert {m["name"] for m in srv["models"]} >= {"revpers", "unet", "vae_encoder", "vae_decoder"}
    assert srv["model_versions"] == ["1"]
    dead = f"127.0.0.1:{free_port()}"
    assert run_cli("health", "--url", url, "--url", dead, "--json", "--timeout", "2") == 1
    info = json.loads(capsys.readouterr().out)
    assert not info["healthy"] and "UNAVAILABLE" in info["servers"][1]["error"]


@server_tests
def test_gate_rejection_reaches_the_client_as_a_failure_with_its_report(
    onnx_artifacts, smoke_bundle_dir, tmp_path, capsys
):
    """A server whose bundle says every face still matches (dlib threshold 1.99: any distance the
    descriptor gives is below it) must reject the image after the retries: the client writes no
    image (and removes one an earlier --no-verify run wrote there), keeps the report (why, per-face
    attempts, audit), counts a failure and exits 1. Gate flags travel as PARAMS: the server's own
    records show the policy and per-attempt guidance it used. The library says ``rejected``."""
    from revpers.serving.repository import build_repository

    bundle = tmp_path / "strict-bundle"
    shutil.copytree(smoke_bundle_dir, bundle)
    manifest = json.loads((bundle / "manifest.json").read_text())
    (bundle / "manifest.json").write_text(json.dumps(manifest | {"verify": {"dlib_threshold": 1.99}}))
    repo = build_repository(onnx_artifacts[0], tmp_path / "repo", "onnxruntime", bundle=bundle)
    srv = start_triton(repo)
    out = tmp_path / "out"
    image, report_path = out / "Tom_Hanks_54745.png", out / "Tom_Hanks_54745.png.json"
    try:
        # gate off: an image is written
        # (exit 1: an unverified image is released but listed for review)
        assert (
            run_cli(
                "anonymize", TOM, "-o", out, "--url", srv.urls.grpc, "--steps", 2, "--no-verify", "--progress", "none"
            )
            == 1
        )
        assert image.exists() and json.loads(report_path.read_text())["verdict"] == "unverified"
        # gate on, same OUTDIR: rejected, and that earlier image must not stay beside the new report
        code = run_cli(
            "anonymize",
            TOM,
            "-o",
            out,
            "--url",
            srv.urls.grpc,
            "--overwrite",
            "--steps",
            2,
            "--retries",
            1,
            "--retry-mode",
            "guidance",
            "--guidance-step",
            3,
            "--fallback",
            "reject",
            "--progress",
            "none",
        )
        # a report that cannot be written (a folder in its way) is logged and listed, not swallowed
        blocked = tmp_path / "blocked"
        (blocked / "Tom_Hanks_54745.png.json").mkdir(parents=True)
        blocked_code = run_cli(
            "anonymize",
            TOM,
            "-o",
            blocked,
            "--url",
            srv.urls.grpc,
            "--steps",
            2,
            "--retries",
            0,
            "--fallback",
            "reject",
            "--progress",
            "lines",
        )
        with BatchClient([srv.urls.grpc]) as bc:
            res = bc.run(Job("tom", TOM.read_bytes(), {"steps": 2, "retries": 0, "fallback": "reject"}))
            kept = bc.run(Job("tom", TOM.read_bytes(), {"steps": 2, "verify": False}))
    finally:
        srv.stop()
    assert code == 1
    assert not image.exists()
    assert sorted(p.name for p in out.iterdir()) == [
        "Tom_Hanks_54745.png.json",
        "audit-manifest.json",
        "review.csv",
        "review.json",
        "run-summary.json",
    ]
    [row] = json.loads((out / "review.json").read_text())
    assert row["input"] == "Tom_Hanks_54745.png" and row["status"] == "rejected" and row["output"] is None
    assert row["verdict"] == "rejected" and row["reason"].startswith("REJECTED: ")
    report = json.loads(report_path.read_text())
    assert report["verdict"] == "rejected" and report["rejected_reason"]
    assert report["client"]["output"] is None and report["client"]["output_sha256"] is None
    policy = report["audit"]["verify_policy"]  # what the server used, not the client's echo
    assert policy["fallback"] == "reject" and policy["retries"] == 1
    assert policy["retry_mode"] == "guidance" and policy["guidance_step"] == 3
    [face] = report["faces"]
    assert face["action"] == "rejected" and face["verdict"] == "rejected"
    assert len(face["attempts"]) == 2 and all(a["dlib_match"] for a in face["attempts"])  # first try + 1 retry
    # guidance mode: the server's default guidance -10, then one --guidance-step stronger; same seed
    assert [a["guidance"] for a in face["attempts"]] == [-10.0, -13.0]
    assert len({a["seed"] for a in face["attempts"]}) == 1
    summary = json.loads((out / "run-summary.json").read_text())
    assert summary["counts"]["failed"] == 1 and summary["failures"][0]["status"] == "REJECTED"
    assert summary["failures"][0]["message"] == report["rejected_reason"]
    assert summary["write_errors"] == []
    assert summary["images_by_verdict"] == {"rejected": 1} and summary["faces_by_verdict"] == {"rejected": 1}
    [entry] = json.loads((out / "audit-manifest.json").read_text())["files"]
    assert entry["status"] == "rejected" and entry["output_sha256"] is None
    assert entry["error"] == {"status": "REJECTED", "message": report["rejected_reason"]}
    assert entry["audit"]["verdict"] == "rejected"
    assert blocked_code == 1
    blocked_summary = json.loads((blocked / "run-summary.json").read_text())
    [write_error] = blocked_summary["write_errors"]
    assert write_error.startswith("Tom_Hanks_54745.png: cannot write its report: ")
    assert "cannot write its report" in blocked_summary["failures"][0]["message"]
    assert blocked_summary["failures"][0]["status"] == "REJECTED"
    assert "ERROR Tom_Hanks_54745.png: cannot write its report" in capsys.readouterr().err
    # the library: a rejection is an answer (ok) without an image, and says so
    assert res.ok and res.rejected and res.image == b"" and res.report["verdict"] == "rejected"
    assert kept.ok and not kept.rejected and kept.image


def make_certs(d: Path) -> dict[str, Path]:
    """A CA, a server certificate for 127.0.0.1/localhost signed by it, and an unrelated CA
    (openssl; the reference's recipe: triton-ops.md section 7)."""

    def ossl(*args):
        subprocess.run(["openssl", *args], cwd=d, check=True, capture_output=True, timeout=60)

    ossl(
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
        "-days",
        "2",
        "-subj",
        "/CN=revpers test CA",
    )
    ossl(
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "other.key",
        "-out",
        "other.pem",
        "-days",
        "2",
        "-subj",
        "/CN=another CA",
    )
    ossl(
        "req", "-newkey", "rsa:2048", "-nodes", "-keyout", "server.key", "-out", "server.csr", "-subj", "/CN=localhost"
    )
    (d / "ext.cnf").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\n")
    ossl(
        "x509",
        "-req",
        "-in",
        "server.csr",
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-out",
        "server.pem",
        "-days",
        "2",
        "-extfile",
        "ext.cnf",
    )
    return {n: d / n for n in ("ca.pem", "other.pem", "server.pem", "server.key")}


@server_tests
def test_tls_and_api_key(onnxruntime_repository, tmp_path, capsys, monkeypatch):
    """A server with gRPC TLS and an API key on inference (tritonserver's own options). Without the
    key: one clear line, exit 2, after ONE request (not retried: the refusal is UNAVAILABLE, which
    would otherwise be retried for --max-wait). A wrong CA: one line about TLS, exit 2. A plaintext
    client: no server can serve, with a hint. With CA and key (file or environment): exit 0;
    `health` honours TLS and the key."""
    from revpers.serving.launcher import TritonServer, free_ports
    from revpers_client import protocol

    if shutil.which("openssl") is None:
        pytest.skip("openssl is needed to make test certificates")
    certs = make_certs(tmp_path)
    key = tmp_path / "api.key"
    key.write_text("s3cret\n")
    (tmp_path / "wrong.key").write_text("guess\n")
    g, h, m = free_ports(3)
    srv = TritonServer(
        onnxruntime_repository,
        grpc_port=g,
        http_port=h,
        metrics_port=m,
        extra_args=[
            "--grpc-use-ssl=true",
            f"--grpc-server-cert={certs['server.pem']}",
            f"--grpc-server-key={certs['server.key']}",
            f"--grpc-restricted-protocol=inference:{protocol.API_KEY_HEADER}=s3cret",
        ],
    ).start()
    src = tmp_path / "photos"
    src.mkdir()
    for k in range(3):
        (src / f"tom{k}.png").write_bytes(TOM.read_bytes())
    url = srv.urls.grpc
    common = ["--url", url, "--mode", "aligned", "--steps", 2, "--concurrency", 1, "--progress", "none"]
    tls = ["--tls", "--ca", certs["ca.pem"]]
    monkeypatch.delenv(protocol.API_KEY_ENV, raising=False)

    def run(out, *extra):
        code = run_cli("anonymize", src, "-o", tmp_path / out, *common, *extra)
        cap = capsys.readouterr()
        errors = [line for line in cap.err.splitlines() if line.startswith("revpers-client: error: ")]
        assert "Traceback" not in cap.err + cap.out
        summary = json.loads((tmp_path / out / "run-summary.json").read_text())
        return code, errors, summary

    try:
        code, errors, summary = run("nokey", *tls)
        assert code == 2 and len(errors) == 1 and "requires an API key" in errors[0], errors
        assert summary["requests_sent_per_url"] == {url: 1} and summary["counts"]["not_done"] == 3
        code, errors, summary = run("wrongkey", *tls, "--api-key-file", tmp_path / "wrong.key")
        assert code == 2 and "requires an API key" in errors[0] and summary["requests_sent_per_url"] == {url: 1}
        code, errors, summary = run("wrongca", "--tls", "--ca", certs["other.pem"], "--api-key-file", key)
        assert code == 2 and len(errors) == 1 and "TLS was refused" in errors[0], errors
        assert summary["requests_sent_per_url"] == {url: 0}
        code, errors, summary = run("plain", "--api-key-file", key)
        assert code == 1 and len(errors) == 1 and "add --tls" in errors[0], errors
        assert summary["requests_sent_per_url"] == {url: 0}
        code, errors, summary = run("ok", *tls, "--api-key-file", key)
        assert code == 0, errors
        assert summary["counts"]["ok"] == 3 and summary["requests_sent_per_url"] == {url: 3}
        monkeypatch.setenv(protocol.API_KEY_ENV, "s3cret")
        code, errors, summary = run("env", *tls)
        assert code == 0 and summary["counts"]["ok"] == 3
        assert run_cli("health", "--url", url, *tls) == 0
        assert "healthy" in capsys.readouterr().out
        assert run_cli("health", "--url", url) == 1  # plaintext: not reachable
        assert "NOT HEALTHY" in capsys.readouterr().out
    finally:
        srv.stop()


@server_tests
def test_client_run_across_a_server_restart_finishes_with_default_options(onnxruntime_repository, tmp_path):
    """The server is stopped in the middle of a run and started again on the same ports: with default
    options (--max-wait 300) the run waits for it and ends with 0 failures. The errors seen while it
    was away are counted as retries."""
    from revpers.serving.launcher import TritonServer, free_ports

    g, h, m = free_ports(3)

    def server():
        return TritonServer(onnxruntime_repository, grpc_port=g, http_port=h, metrics_port=m).start()

    srv = server()
    src, out = tmp_path / "photos", tmp_path / "out"
    src.mkdir()
    n = 10
    for k in range(n):
        (src / f"tom{k}.png").write_bytes(TOM.read_bytes())
    cmd = [
        sys.executable,
        "-m",
        "revpers_client.cli",
        "anonymize",
        str(src),
        "-o",
        str(out),
        "--url",
        srv.urls.grpc,
        "--concurrency",
        "2",
        "--steps",
        "3",
        "--mode",
        "aligned",
        "--progress",
        "lines",
        "-v",
    ]
    proc = subprocess.Popen(cmd, cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 120
        while len(list(out.glob("*.png.json"))) < 2 and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        t0 = time.perf_counter()
        srv.stop()
        done_before = len(list(out.glob("*.png.json")))
        srv = server()
        print(f"restart took {time.perf_counter() - t0:.1f} s; {done_before} of {n} done before it")
        log = proc.communicate(timeout=400)[0]
    finally:
        if proc.poll() is None:
            proc.kill()
        srv.stop()
    assert proc.returncode == 0, log
    summary = json.loads((out / "run-summary.json").read_text())
    print(f"retries {summary['retries']}, requests {summary['requests_sent_per_url']}")
    assert done_before < n  # the restart happened during the run
    assert summary["counts"]["ok"] == n and summary["counts"]["failed"] == 0
    assert summary["retries"] >= 1 and "retry " in log
