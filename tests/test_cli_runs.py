"""`revpers anonymize` over a collection, as a user runs it (in process, smoke bundle, real photos):
inputs never overwritten, the tree mirrored, files not taken and no-face images listed for review,
a clean stop on SIGINT that --resume finishes, and `revpers review`'s pictures of the run."""

import hashlib
import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from revpers.faces.samples import insightface_photo
from revpers_client.protocol import FaceVerdict
from tests.schema import validate, validate_report

pytestmark = pytest.mark.slow


def revpers(*args, **kwargs):
    return subprocess.run(
        [sys.executable, "-m", "revpers.cli", *map(str, args)], capture_output=True, text=True, timeout=900, **kwargs
    )


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def photos(tmp_path):
    src = tmp_path / "in"
    (src / "sub").mkdir(parents=True)
    shutil.copy(insightface_photo("t1.jpg"), src / "t1.jpg")
    shutil.copy(insightface_photo("Tom_Hanks_54745.png"), src / "sub" / "hanks.png")
    Image.open(insightface_photo("Tom_Hanks_54745.png")).convert("RGB").save(src / "sub" / "hanks_scan.tif")
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (96, 128, 3), dtype=np.uint8)).save(src / "noise.png")
    (src / "notes.txt").write_text("not an image")
    return src


def test_output_over_the_inputs_is_refused_before_any_work(photos, smoke_bundle_dir, tmp_path):
    before = {p: sha(p) for p in photos.rglob("*") if p.is_file()}
    link = tmp_path / "same-folder"
    link.symlink_to(photos)  # symlinks are resolved: this is the input folder too
    for out in (photos, link):
        proc = revpers("anonymize", photos, "-o", out, "--models", smoke_bundle_dir, "--steps", "2")
        assert proc.returncode == 2, proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr
    assert {p: sha(p) for p in photos.rglob("*") if p.is_file()} == before


def test_a_folder_run_mirrors_the_tree_and_lists_what_needs_review(photos, smoke_bundle_dir, tmp_path):
    out = tmp_path / "out"
    proc = revpers("anonymize", photos, "-o", out, "--models", smoke_bundle_dir, "--steps", "2", "--retries", "0")
    assert proc.returncode == 1, proc.stdout + proc.stderr  # the no-face image needs review
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.suffix in (".jpg", ".png")) == [
        "noise.png",
        "sub/hanks.png",
        "sub/hanks_scan.png",
        "t1.jpg",
    ]
    for report_file in out.rglob("*.json"):
        if report_file.name.endswith((".jpg.json", ".png.json")):
            validate_report(json.loads(report_file.read_text()))
    review = {row["input"]: row for row in json.loads((out / "review.json").read_text())}
    assert review["notes.txt"]["status"] == "not_taken" and ".txt" in review["notes.txt"]["reason"]
    assert review["noise.png"]["status"] == "review" and review["noise.png"]["verdict"] == "no_faces"
    assert set(review) == {"notes.txt", "noise.png"}  # the photos passed the gate
    summary = json.loads((out / "run-summary.json").read_text())
    validate("run-summary", summary)
    validate("audit-manifest", json.loads((out / "audit-manifest.json").read_text()))
    validate("review-list", json.loads((out / "review.json").read_text()))
    assert summary["counts"]["ok"] == 3 and summary["counts"]["review"] == 1 and summary["counts"]["not_taken"] == 1
    assert summary["smoke"] and "smoke" in summary["warning"]

    index = Path(revpers("review", out).stdout.split(": ", 1)[1].strip())
    assert index.is_file() and "SMOKE WEIGHTS" in index.read_text()
    sheet = np.asarray(Image.open(out / "review" / "sheet-001.png").convert("RGB"))
    assert tuple(sheet[5, 5]) == (150, 20, 20)  # the smoke banner across the top of every sheet
    overlay = np.asarray(Image.open(out / "review" / "overlays" / "t1.jpg.png").convert("RGB"))
    report = json.loads((out / "t1.jpg.json").read_text())
    x0, y0, x1, y1 = (int(round(v)) for v in report["faces"][2]["box"])
    green = (40, 180, 70)
    assert report["faces"][2]["verdict"] == FaceVerdict.PASSED.value
    assert tuple(overlay[(y0 + y1) // 2, x0]) == green  # the box edge, coloured by its verdict


def test_sigint_stops_cleanly_and_resume_does_only_the_rest(smoke_bundle_dir, tmp_path):
    src = tmp_path / "many"
    src.mkdir()
    base = Image.open(insightface_photo("t1.jpg")).convert("RGB")
    for k in range(6):  # six distinct photos with faces
        base.crop((k * 20, 0, base.width - (5 - k) * 20, base.height)).save(src / f"p{k}.jpg")
    out = tmp_path / "out"
    args = [
        sys.executable,
        "-m",
        "revpers.cli",
        "anonymize",
        str(src),
        "-o",
        str(out),
        "--models",
        str(smoke_bundle_dir),
        "--steps",
        "2",
        "--retries",
        "0",
        "--progress",
        "lines",
    ]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 600
    while not list(out.glob("p*.jpg.json")) and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 130, err
    assert "Traceback" not in err
    first = json.loads((out / "run-summary.json").read_text())
    done = first["counts"]["ok"] + first["counts"]["review"]
    assert first["interrupted"] == "SIGINT" and 1 <= done < 6 and first["counts"]["not_done"] == 6 - done
    again = subprocess.run(args + ["--resume"], capture_output=True, text=True, timeout=900)
    assert again.returncode in (0, 1), again.stderr
    second = json.loads((out / "run-summary.json").read_text())
    assert second["counts"]["skipped"] == done and second["counts"]["ok"] + second["counts"]["review"] == 6 - done
    assert len(list(out.glob("p*.jpg"))) == 6 and not list(out.glob("*.part"))
