"""`revpers evaluate` / `revpers sweep` on real photos that ship in installed packages (insightface's
t1.jpg with 6 faces and Tom_Hanks_54745.png, skimage's astronaut) and on pairs built from them.
The recognizers, detector and landmark predictor are the real dlib models; the sweep runs the real
in-process anonymizer on the smoke bundle (its numbers are meaningless and every output says so)."""

from __future__ import annotations

import json
import math

import cv2
import numpy as np
import pytest

from revpers.evaluate import attributes as A
from revpers.evaluate import quality as Q
from revpers.evaluate.core import SMOKE_NOTE, Evaluator
from revpers.evaluate.identity import parse_recognizer
from revpers.evaluate.sweep import recommend
from tests.conftest import real_photo

# One grey level of error on every background pixel gives 10 log10(255^2 / 1) = 48.13 dB: a background
# above this bound changed by less than one level in the RMS sense.
ONE_LEVEL_PSNR = 10 * math.log10(255.0**2)


pytestmark = pytest.mark.slow  # end-to-end runs; left out of `make test-fast`


@pytest.fixture(scope="module")
def verifier():
    from revpers.gate.recognizers import Verifier

    return Verifier(None)  # dlib HOG detector + dlib ResNet (no bundle)


@pytest.fixture(scope="module")
def photos():
    import skimage.data

    return {
        "t1": real_photo("t1.jpg"),
        "hanks": real_photo("Tom_Hanks_54745.png"),
        "astronaut": np.ascontiguousarray(skimage.data.astronaut()),
    }


@pytest.fixture(scope="module")
def t1_faces(verifier, photos):
    faces = verifier.analyzer.detect(photos["t1"])
    assert len(faces) == 6
    return faces


def _mask_matrix(verifier, face):
    return verifier.matrix_for(face.kps) * (Q.MASK_SIZE / verifier.size)


# ---------------------------------------------------------------------------------------- identical
def test_identical_pairs_reid_100_and_attribute_differences_0(verifier, photos, smoke_bundle_dir):
    # The smoke bundle's ArcFace file stands in for a user's ONNX recognizer: its weights are random,
    # so it says nothing about identity, but identical inputs must give cosine 1 through the whole
    # extra-recognizer path (norm_crop chip, normalisation, L2, cosine, threshold).
    extra = parse_recognizer(f"onnx_contract={smoke_bundle_dir / 'face_models' / 'smoke_arcface.onnx'}:0.5")
    ev = Evaluator(verifier, extras=[extra])
    for name, rgb in photos.items():
        ev.add(name, rgb, rgb.copy())
    m = ev.metrics()
    assert m["faces"]["measured"] == 8  # 6 + 1 + 1
    assert set(m["identity"]) == {"dlib", "onnx_contract"}  # no bundle: no ArcFace
    for name, s in m["identity"].items():
        assert s["reid_rate"] == 1.0, name
    assert m["identity"]["dlib"]["quantiles"]["max"] == 0.0
    assert m["identity"]["onnx_contract"]["quantiles"]["min"] == pytest.approx(1.0, abs=1e-6)
    assert m["faces"]["attributes_measured"] == 8
    for axis in ("yaw", "pitch", "roll"):
        assert m["attributes"]["pose_degrees"][axis]["quantiles"]["max"] == 0.0
    assert m["attributes"]["expression"]["quantiles"]["max"] == 0.0
    assert m["quality"]["detection_agreement"]["rate"] == 1.0
    assert m["quality"]["background"]["identical_images"] == 3
    # sign convention on real faces: t1.jpg's faces 1 and 4 are turned toward the image's left,
    # which is positive yaw (a template with its depth reversed gives them negative yaw)
    t1 = {f["face"]: f["pose_original"]["yaw"] for f in m["per_face"] if f["image"] == "t1"}
    assert t1[1] > 15 and t1[4] > 15, t1
    assert "fid_kid_skipped" in m["quality"] and m["attributes"]["gaze"]["skipped"].startswith("not measured")


def test_aligned_mode_reads_the_whole_image_as_one_face(verifier, photos):
    """--aligned: the astronaut's face aligned to a 256 px whole-face crop; nothing is detected in
    the original, the whole image is the face. Identical: matched, nothing moved; mirrored: the
    background outside the face region is no longer the same."""
    from revpers.faces.align import align_face

    face = verifier.analyzer.detect(photos["astronaut"])[0]
    crop, _ = align_face(photos["astronaut"], face.kps, 256)
    ev = Evaluator(verifier, aligned=True)
    ev.add("same", crop, crop.copy())
    ev.add("mirrored", crop, np.ascontiguousarray(crop[:, ::-1]))
    same, mirrored = ev.faces
    assert same["box"] == [0.0, 0.0, 256.0, 256.0] and same["matches"]["dlib"] and same["scores"]["dlib"] == 0.0
    assert same["pose_difference"]["l2_rad"] == 0.0 and ev.images[0]["background_psnr_db"] == Q.PSNR_CAP
    assert mirrored["redetected"] and mirrored["scores"]["dlib"] > 0.0
    assert ev.images[1]["background_psnr_db"] < ONE_LEVEL_PSNR


# ---------------------------------------------------------------------------------------- another person
def test_another_persons_face_pasted_at_the_same_place_is_not_reidentified(verifier, photos, t1_faces):
    """Each of t1.jpg's six faces is replaced by the face of the person three places on, aligned to the
    same place (pairs 0-3, 1-4, 2-5: distances measured 0.73-0.82). Not every swap is this clear:
    face 4's face on face 3's head measured 0.579, a match at dlib's loose 0.6 (docs/evaluation.md)."""
    from revpers.faces.align import align_face
    from revpers.faces.blend import paste_face

    t1, size = photos["t1"], 256
    swapped = t1.copy()
    for i, f in enumerate(t1_faces):
        donor = t1_faces[(i + 3) % 6]
        crop, _ = align_face(t1, donor.kps, size)
        paste_face(swapped, crop, verifier.matrix_for(f.kps) * (size / verifier.size))
    ev = Evaluator(verifier)
    ev.add("t1", t1, swapped)
    m = ev.metrics()
    assert m["faces"]["measured"] == 6
    assert all(f["redetected"] for f in m["per_face"])  # the pasted faces themselves were measured
    assert m["identity"]["dlib"]["reid_rate"] == 0.0
    assert m["identity"]["dlib"]["quantiles"]["min"] > 0.6
    # the swap wrote inside the faces' regions only
    assert m["per_image"][0]["background_psnr_db"] > ONE_LEVEL_PSNR


# ---------------------------------------------------------------------------------------- mirror
def test_head_pose_recovers_a_known_rotation_and_mirrors_exactly():
    """The template projected with known angles gives those angles back; mirrored landmarks give
    yaw and roll with the opposite sign and the same pitch (symmetric template, principal point on
    the mirror axis)."""
    side = 320.0
    yaw, pitch, roll = 20.0, -10.0, 5.0
    rz = cv2.Rodrigues(np.array([0, 0, math.radians(roll)]))[0]
    ry = cv2.Rodrigues(np.array([0, math.radians(yaw), 0]))[0]
    rx = cv2.Rodrigues(np.array([math.radians(pitch), 0, 0]))[0]
    rvec = cv2.Rodrigues(rz @ ry @ rx)[0]
    pts, _ = cv2.projectPoints(A.pose_template(), rvec, np.array([0.0, 0.0, 4.0]), A.camera_matrix(side), None)
    p = A.head_pose(pts.reshape(68, 2), side)
    assert (p["yaw"], p["pitch"], p["roll"]) == pytest.approx((yaw, pitch, roll), abs=1e-3)
    assert p["reprojection_px"] < 1e-3
    q = A.head_pose(A.mirror_points(pts.reshape(68, 2), side / 2), side)
    assert (q["yaw"], q["pitch"], q["roll"]) == pytest.approx((-yaw, pitch, -roll), abs=1e-3)


def test_mirrored_photo_yaw_difference_is_twice_the_yaw(verifier, photos, t1_faces):
    """t1.jpg's faces 3 and 5 (turned about 16 and 11 degrees, little roll): a window of the photo
    centred on the face's eye midpoint, against the same window mirrored, so the face stays in place.

    Bound. The pose estimator is exactly mirror-symmetric (test above), so the only error is the
    landmark predictor's: its mirrored points are not exactly the mirror of its points. Yaw is read
    mainly from where the nose line sits between the eyes: a sideways landmark error dx changes yaw
    by about dx / (D cos yaw) radians, D being how far the nose tip stands in front of the eye
    corners (template depth times the template-to-crop scale). With dx = 4 px, 5 % of the crop's
    80 px eye distance (the per-point error order of regression-tree landmark predictors such as
    dlib's, Kazemi & Sullivan 2014), and both images contributing, the bound is 2 dx / (D cos yaw)."""
    t1 = photos["t1"]
    tpl = A.pose_template()
    depth = float(tpl[[36, 39, 42, 45], 2].mean() - tpl[30, 2])  # nose tip in front of the eye corners
    eye_tpl = float(np.linalg.norm(tpl[[42, 45]].mean(0) - tpl[[36, 39]].mean(0)))
    crop_eye = 0.25 * verifier.size  # align.py: eye distance is 25 % of the crop side
    d_px = depth * crop_eye / eye_tpl
    for idx in (3, 5):
        f = t1_faces[idx]
        cx = int(round(float(f.kps[:2, 0].mean())))
        a = min(cx, t1.shape[1] - cx, 150)
        window = np.ascontiguousarray(t1[:, cx - a : cx + a])
        ev = Evaluator(verifier)
        ev.add("window", window, np.ascontiguousarray(window[:, ::-1]))
        face = ev.metrics()["per_face"][0]
        assert face["redetected"], face
        yaw = face["pose_original"]["yaw"]
        bound = math.degrees(2 * 4.0 / (d_px * math.cos(math.radians(yaw))))
        assert abs(yaw) > bound  # turned enough that an unchanged yaw (difference 0) would fail
        assert abs(face["pose_difference"]["yaw"] - 2 * abs(yaw)) <= bound, (idx, yaw, face["pose_difference"], bound)
        assert face["pose_anonymized"]["yaw"] * yaw < 0  # turned the other way


# ---------------------------------------------------------------------------------------- blur
def test_blurred_faces_keep_the_background_and_lower_the_reid(verifier, photos, t1_faces):
    from revpers.faces.blend import obscure_face

    t1 = photos["t1"]
    blurred = t1.copy()
    for f in t1_faces:  # the project's own blur (the gate's fallback), sigma = crop side / 12
        obscure_face(blurred, _mask_matrix(verifier, f), Q.MASK_SIZE, "blur")
    same, blur = Evaluator(verifier), Evaluator(verifier)
    same.add("t1", t1, t1.copy())
    blur.add("t1", t1, blurred)
    ms, mb = same.metrics(), blur.metrics()
    assert mb["per_image"][0]["background_psnr_db"] > ONE_LEVEL_PSNR
    assert mb["per_image"][0]["background_ssim"] > 0.999
    assert mb["identity"]["dlib"]["reid_rate"] < ms["identity"]["dlib"]["reid_rate"] == 1.0
    for fs, fb in zip(ms["per_face"], mb["per_face"], strict=True):
        assert fb["scores"]["dlib"] > fs["scores"]["dlib"]
    # the bound discriminates: two grey levels added outside the faces fall below it
    region = Q.face_region(t1.shape, [_mask_matrix(verifier, f) for f in t1_faces])
    shifted = blurred.copy()
    shifted[~region] = np.clip(shifted[~region].astype(int) + 2, 0, 255).astype(np.uint8)
    assert Q.psnr(t1, shifted, ~region) < ONE_LEVEL_PSNR


# ---------------------------------------------------------------------------------------- expression
def test_expression_difference_is_the_moved_points_share():
    """Moving the 9 lower-lip points (55-59, 65-67 and 57's neighbours) down by d leaves the rigid
    points alone, so the difference is exactly moved * d / (expressive points * eye distance)."""
    pts = np.asarray(A.pose_template()[:, :2] * 100 + 160)
    moved = pts.copy()
    lower = [55, 56, 57, 58, 59, 65, 66, 67]
    d = 6.0
    moved[lower, 1] += d
    expected = len(lower) * d / (len(A.EXPRESSIVE) * A.inter_ocular(pts))
    assert A.expression_difference(pts, moved) == pytest.approx(expected, rel=1e-9)
    assert A.expression_difference(pts, pts) == pytest.approx(0.0, abs=1e-12)
    # a pure similarity change of the whole face is not an expression change
    rot = cv2.getRotationMatrix2D((150.0, 170.0), 12.0, 1.3)
    assert A.expression_difference(pts, pts @ rot[:, :2].T + rot[:, 2]) == pytest.approx(0.0, abs=1e-9)


# ---------------------------------------------------------------------------------------- FID / KID
def test_fid_and_kid_formulas():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((400, 6))
    mu = np.array([1.0, -2.0, 0.5, 0, 0, 3.0])
    assert Q.fid(x, x) == pytest.approx(0.0, abs=1e-8)
    assert Q.fid(x, x + mu) == pytest.approx(float(mu @ mu), rel=1e-6)  # same covariance: |mu|^2
    y = rng.standard_normal((400, 6))
    assert abs(Q.kid(x, y)) < 0.05 < Q.kid(x, x + mu)


def test_inception_contract_torchscript(tmp_path, verifier, photos, t1_faces):
    """A TorchScript feature model that checks the documented input contract itself."""
    import torch

    from revpers.faces.blend import obscure_face

    class Features(torch.nn.Module):
        def forward(self, x):
            assert x.shape[1:] == (3, 299, 299)
            assert float(x.min()) >= -1.0 and float(x.max()) <= 1.0
            return torch.cat([x.mean((2, 3)), x.std((2, 3)), x[:, :, ::50, ::50].flatten(1)], 1)

    path = tmp_path / "inception.pt"
    torch.jit.script(Features()).save(str(path))
    t1 = photos["t1"]
    blurred = t1.copy()
    for f in t1_faces:
        obscure_face(blurred, _mask_matrix(verifier, f), Q.MASK_SIZE, "blur")
    inc = Q.InceptionFeatures(path)
    same, blur = Evaluator(verifier, inception=inc), Evaluator(verifier, inception=inc)
    same.add("t1", t1, t1.copy())
    blur.add("t1", t1, blurred)
    ms, mb = same.metrics()["quality"], blur.metrics()["quality"]
    # identical sets: FID is 0 up to the matrix square root's error on a covariance of rank 5 in d
    # dimensions: each of its ~d null eigenvalues comes back as about sqrt(eps * lambda_max)
    feats = np.concatenate(same.features["original"])
    lam = float(np.linalg.eigvalsh(np.cov(feats, rowvar=False)).max())
    tol = 2 * feats.shape[1] * math.sqrt(np.finfo(float).eps * lam)
    assert ms["fid_kid_faces"] == 6 and abs(ms["fid"]) < tol < 0.01 * mb["fid"]
    assert mb["fid"] > 1.0 and mb["kid"] > ms["kid"]
    assert "fid_note" in mb  # 6 faces for 114-d features: flagged as biased


# ---------------------------------------------------------------------------------------- recommendation
def test_recommendation_least_aggressive_and_cheapest():
    def row(g, ip, steps, reid, seconds):
        return {
            "tag": f"g{g}_ip{ip}_s{steps}",
            "setting": {"guidance": g, "ip_scale": ip, "steps": steps},
            "reid_headline": reid,
            "cost": {"unet_samples_per_face": 4 * steps, "seconds_per_face": seconds},
        }

    rows = [
        row(-4, 1, 100, 0.30, 9),
        row(-8, 1, 100, 0.01, 9),
        row(-12, 1, 100, 0.0, 9.5),
        row(-12, 1, 25, 0.02, 2.0),
        row(-8, 1, 50, 0.03, 4.0),
        row(-12, 1, 50, 0.0, 4.1),
    ]
    rec = recommend(rows, 0.01)
    assert rec["meeting"] == ["g-8_ip1_s100", "g-12_ip1_s100", "g-12_ip1_s50"]
    assert rec["least_aggressive"]["tag"] == "g-8_ip1_s100"
    assert rec["cheapest"]["tag"] == "g-12_ip1_s50"
    none = recommend(rows, 0.0 - 1e-9)
    assert none["least_aggressive"] is None and "no setting meets" in none["note"]


# ---------------------------------------------------------------------------------------- CLI
def _write(path, rgb):
    from revpers.service.images import encode_image

    path.write_bytes(encode_image(rgb, "PNG"))


def test_cli_evaluate_folders_reports_and_errors(tmp_path, photos, capsys):
    from revpers.cli import main

    orig, anon = tmp_path / "orig", tmp_path / "anon"
    orig.mkdir(), anon.mkdir()
    _write(orig / "astronaut.png", photos["astronaut"])
    _write(anon / "astronaut.png", photos["astronaut"])
    _write(orig / "hanks.png", photos["hanks"])  # withheld by the gate: a report and no image
    (anon / "hanks.png.json").write_text(
        json.dumps({"input": str(orig / "hanks.png"), "output": None, "verdict": "rejected", "smoke": True})
    )
    _write(orig / "lonely.png", photos["hanks"])  # no partner at all
    out = tmp_path / "report"
    assert main(["evaluate", str(orig), str(anon), "-o", str(out)]) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["images"]["evaluated"] == 1 and m["images"]["withheld_names"] == ["hanks"]
    assert m["images"]["unmatched"] == ["lonely.png"]
    assert m["smoke"] is True and m["warning"] == SMOKE_NOTE  # the anonymize report said smoke
    for fn in ("table.md", "index.html"):
        assert SMOKE_NOTE in (out / fn).read_text()
    for fn in m["outputs"]["plots"] + m["outputs"]["contact_sheets"]:
        assert cv2.imread(str(out / fn)) is not None, fn
    assert {"similarity_dlib.png", "attributes.png", "background_psnr.png"} <= set(m["outputs"]["plots"])
    capsys.readouterr()

    _write(tmp_path / "small.png", photos["hanks"])
    bad = [
        (["evaluate", str(tmp_path / "nope"), str(anon), "-o", str(out)], "does not exist"),
        (["evaluate", str(orig), str(anon), "-o", str(out), "--recognizer", "x"], "NAME=PATH"),
        (
            ["evaluate", str(orig), str(anon), "-o", str(out), "--recognizer", f"a={tmp_path / 'no.onnx'}:0.3"],
            "does not exist",
        ),
        (["evaluate", str(orig / "astronaut.png"), str(tmp_path / "small.png"), "-o", str(out)], "differ in size"),
        (
            ["evaluate", str(orig), str(anon), "-o", str(out), "--inception", str(tmp_path / "small.png")],
            "neither ONNX",
        ),
    ]
    for argv, text in bad:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and text in err and "Traceback" not in err, err


def test_sweep_end_to_end_on_the_smoke_bundle(tmp_path, photos, smoke_bundle_dir, capsys):
    from revpers.cli import main

    src = tmp_path / "astronaut.png"
    _write(src, photos["astronaut"])
    out = tmp_path / "sweep"
    argv = [
        "sweep",
        str(src),
        "--models",
        str(smoke_bundle_dir),
        "--guidance",
        "-4",
        "-8",
        "--steps",
        "4",
        "2",
        "-o",
        str(out),
        "--device",
        "cpu",
        "--target-reid",
        "1",
    ]
    assert main(argv) == 0
    s = json.loads((out / "sweep.json").read_text())
    assert s["smoke"] is True and s["warning"] == SMOKE_NOTE
    assert [r["tag"] for r in s["settings"]] == ["g-4_ip1_s4", "g-4_ip1_s2", "g-8_ip1_s4", "g-8_ip1_s2"]
    for r in s["settings"]:
        n = r["setting"]["steps"]
        assert r["faces_generated"] == 1
        # per face: N inversion + N generation steps, each at CFG batch 2; the inversion's N steps
        # go in ceil(N / 10) calls (inversion batch 10)
        assert r["cost"]["unet_samples_per_face"] == 4 * n
        assert r["cost"]["unet_calls_per_face"] == math.ceil(n / 10) + n
        assert set(r["reid"]) == {"dlib"}  # the smoke ArcFace is never used as a recognizer
        sdir = out / "settings" / r["tag"]
        assert (sdir / "images" / "astronaut.png").is_file()
        assert SMOKE_NOTE in (sdir / "table.md").read_text() and SMOKE_NOTE in (sdir / "index.html").read_text()
    rec = s["recommendation"]  # target 100 %: every setting meets it
    assert rec["least_aggressive"]["tag"] == "g-4_ip1_s2" and rec["cheapest"]["tag"] == "g-4_ip1_s2"
    assert set(s["outputs"]["plots"]) == {"curve_guidance.png", "curve_steps.png", "cost_vs_reid.png"}
    for fn in s["outputs"]["plots"]:
        img = cv2.imread(str(out / fn))
        assert img is not None and img.shape[0] > 200 and img.shape[1] > 400, fn
    for fn in ("sweep.md", "index.html"):
        assert SMOKE_NOTE in (out / fn).read_text()
    assert "smoke weights: numbers meaningless" in capsys.readouterr().out

    # a setting's folder carries the anonymize reports, so evaluate pairs it and knows it was smoke
    again = tmp_path / "again"
    assert main(["evaluate", str(tmp_path), str(out / "settings" / "g-8_ip1_s2" / "images"), "-o", str(again)]) == 0
    m = json.loads((again / "metrics.json").read_text())
    assert m["images"]["evaluated"] == 1 and m["smoke"] is True
    assert m["identity"]["dlib"]["reid_rate"] == s["settings"][3]["reid"]["dlib"]

    # a bad value is refused before any model loads
    assert main(argv[:4] + ["--guidance", "99"] + argv[7:]) == 2
    assert "guidance=99.0 is out of range" in capsys.readouterr().err
