"""`revpers` as a user runs it: smoke-model, anonymize (aligned and photo), reconstruct, errors."""

import io
import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from tests.conftest import real_photo
from tests.schema import validate_report

pytestmark = pytest.mark.slow  # end-to-end runs; left out of `make test-fast`


def revpers(*args, check=False):
    proc = subprocess.run(
        [sys.executable, "-m", "revpers.cli", *map(str, args)], capture_output=True, text=True, timeout=600
    )
    if check and proc.returncode:
        raise AssertionError(proc.stdout + proc.stderr)
    return proc


def test_smoke_model_is_deterministic_for_a_seed(tmp_path):
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    for d, seed in ((a, 1), (b, 1), (c, 2)):
        revpers("smoke-model", d, "--seed", seed, check=True)
    unet = "sdxl/unet/diffusion_pytorch_model.safetensors"
    assert (a / unet).read_bytes() == (b / unet).read_bytes()
    assert (a / unet).read_bytes() != (c / unet).read_bytes()
    assert json.loads((a / "manifest.json").read_text())["smoke"] is True
    assert revpers("smoke-model", a).returncode == 2  # refuses to overwrite without --force


def test_anonymize_aligned_writes_image_and_report_and_converts_modes(tmp_path, smoke_bundle_dir):
    photo = real_photo()
    inputs = []
    for mode in ("RGB", "L", "RGBA", "I;16"):
        img = Image.fromarray(photo).convert("L" if mode == "I;16" else mode)
        if mode == "I;16":
            img = Image.fromarray((np.asarray(img).astype(np.uint16) * 257))
        path = tmp_path / f"face_{mode.replace(';', '')}.png"
        img.save(path)
        inputs.append(path)
    out = tmp_path / "out"
    proc = revpers("anonymize", *inputs, "-o", out, "--models", smoke_bundle_dir, "--aligned", "--steps", 6)
    assert proc.returncode == 0, proc.stderr
    assert "SMOKE WEIGHTS" in proc.stdout
    for path in inputs:
        result = out / path.name
        with Image.open(result) as img:
            assert img.mode == "RGB" and img.size == (photo.shape[1], photo.shape[0])
            assert not img.getexif()
        report = json.loads((out / (path.name + ".json")).read_text())
        validate_report(report)
        assert report["smoke"] is True and "noise" in report["warning"]
        assert report["params"]["steps"] == 6 and report["params"]["guidance"] == -10.0
        assert {"inversion", "generation", "vae_encode", "vae_decode", "decode", "encode"} <= set(report["timings_ms"])
        assert report["models"]["manifest_sha256"]


def test_anonymize_photo_mode_reports_faces(tmp_path, smoke_bundle_dir):
    from revpers.faces.samples import demo_photos

    out = tmp_path / "out"
    t1 = demo_photos()[0]
    proc = revpers("anonymize", t1, "-o", out, "--models", smoke_bundle_dir, "--steps", 4)
    assert proc.returncode == 0, proc.stderr
    report = json.loads((out / "t1.jpg.json").read_text())
    validate_report(report)
    assert report["mode"] == "photo" and report["faces_found"] == 6
    assert report["generator_batches"] == [6]
    assert all(f["action"] == "anonymized" for f in report["faces"])


def test_reconstruct_reports_small_error(smoke_bundle_dir, tmp_path):
    path = tmp_path / "face.png"
    Image.fromarray(real_photo()).save(path)
    proc = revpers("reconstruct", path, "--models", smoke_bundle_dir, "--tolerance", "1e-4")
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout[: proc.stdout.rindex("}") + 1])
    assert result["latent_max_abs_error"] <= 1e-4 and result["steps"] == 100


@pytest.mark.parametrize(
    "content,expect",
    [(b"", "empty input"), (b"hello, not an image\n", "not a recognised image"), ("truncated", "corrupt or truncated")],
)
def test_bad_images_get_clear_errors_and_the_rest_still_runs(tmp_path, smoke_bundle_dir, content, expect):
    if content == "truncated":
        buf = io.BytesIO()
        Image.fromarray(real_photo()).save(buf, format="JPEG")
        content = buf.getvalue()[: len(buf.getvalue()) // 2]
    bad, good = tmp_path / "bad.jpg", tmp_path / "good.png"
    bad.write_bytes(content)
    Image.fromarray(real_photo()).save(good)
    proc = revpers(
        "anonymize", bad, good, "-o", tmp_path / "o", "--models", smoke_bundle_dir, "--aligned", "--steps", 2
    )
    assert proc.returncode == 1
    said = proc.stdout + proc.stderr  # the run's summary lists each failure with the server's own message
    assert expect in said and "bad.jpg" in said and "Traceback" not in said
    assert (tmp_path / "o" / "good.png").is_file() and not (tmp_path / "o" / "bad.jpg").exists()


def test_missing_bundle_and_bad_parameters(tmp_path, smoke_bundle_dir):
    img = tmp_path / "x.png"
    Image.fromarray(real_photo()).save(img)
    proc = revpers("anonymize", img, "-o", tmp_path / "o", "--models", tmp_path / "nope")
    assert proc.returncode == 2 and "does not exist" in proc.stderr
    proc = revpers("anonymize", img, "-o", tmp_path / "o", "--models", smoke_bundle_dir, "--skip", "1.5")
    assert proc.returncode == 2 and "skip=1.5 is out of range" in proc.stderr
    broken = tmp_path / "broken"
    revpers("smoke-model", broken, check=True)
    (broken / "ip_adapter" / "ip-adapter-faceid_sdxl.bin").unlink()
    proc = revpers("anonymize", img, "-o", tmp_path / "o", "--models", broken)
    assert proc.returncode == 2 and "ip-adapter-faceid_sdxl.bin" in proc.stderr


def test_verify_with_unloadable_face_models_exits_2(tmp_path, smoke_bundle_dir):
    """A bundle whose face models cannot be loaded is a bad bundle: exit 2 with the reason, no traceback
    (exit 1 would say "a face still matches")."""
    img = tmp_path / "x.png"
    Image.fromarray(real_photo()).save(img)
    broken = tmp_path / "broken"
    broken.mkdir()
    for rel in ("sdxl", "ip_adapter", "face_models"):
        (broken / rel).symlink_to(smoke_bundle_dir / rel)
    manifest = json.loads((smoke_bundle_dir / "manifest.json").read_text())
    manifest["faces"]["detector"] = "haar"
    (broken / "manifest.json").write_text(json.dumps(manifest))
    proc = revpers("verify", img, img, "--models", broken)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "unknown face detector 'haar'" in proc.stderr and "Traceback" not in proc.stderr
