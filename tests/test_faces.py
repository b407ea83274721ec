"""revpers.faces on real photos that ship inside installed packages, with the real dlib detector.

Photos: insightface's ``data/images/t1.jpg`` (6 people), ``skimage.data.astronaut()`` (1 face),
``skimage.data.coffee()`` (no face). The recognizer is a tiny random ArcFace-contract ONNX built
here (the identity values do not matter for these tests, only the contract). The generator is
replaced by a deterministic test double that inverts the crops and records its calls: the
generator is not what is tested here, the face handling around it is.
"""

from __future__ import annotations

import importlib.util
import io
import pathlib
import threading
import time

import cv2
import numpy as np
import pytest
from PIL import Image

from revpers.faces import (
    DETECTED_IN_CROP,
    TEMPLATE_FALLBACK,
    FaceModelError,
    FacePolicy,
    align_face,
    alignment_matrix,
    anonymize_photo,
    crop_scale,
    face_mask,
    identity_from_crop,
    load_face_analyzer,
    template_points,
    union_mask,
)
from revpers.faces.align import TEMPLATE_UNIT, crop_footprint, template_face, transform_points
from revpers.faces.analysis import DlibAnalyzer, _rotated_canvas, buffalo_pack_from_env, face_recognition_models_dir
from revpers.service.images import decode_image, encode_image, read_image

skimage_data = pytest.importorskip("skimage.data")

STEP_LIMIT = 0.1  # largest allowed alpha difference between neighbouring pixels
# the six people of t1.jpg (box centres, looked up by eye on the photo): left to right
T1_FACES = [(117, 336), (319, 223), (515, 362), (786, 417), (935, 141), (1166, 336)]


def _package_file(package: str, *parts: str) -> pathlib.Path:
    spec = importlib.util.find_spec(package)
    assert spec is not None and spec.submodule_search_locations, f"{package} is not installed"
    return pathlib.Path(list(spec.submodule_search_locations)[0]).joinpath(*parts)


# ------------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> pathlib.Path:
    """A bundle-like folder with a tiny random ArcFace-contract recognizer: input (N, 3, 112, 112),
    one (N, 512) output, dynamic batch axis."""
    torch = pytest.importorskip("torch")
    root = tmp_path_factory.mktemp("face_models")

    class TinyArcFace(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.net = torch.nn.Sequential(
                torch.nn.Conv2d(3, 8, 4, stride=4),
                torch.nn.ReLU(),
                torch.nn.Conv2d(8, 16, 4, stride=4),
                torch.nn.ReLU(),
                torch.nn.Flatten(),
                torch.nn.Linear(16 * 7 * 7, 512),
            )

        def forward(self, x):
            return self.net(x)

    torch.manual_seed(0)
    path = root / "tiny_arcface.onnx"
    torch.onnx.export(
        TinyArcFace().eval(),
        torch.zeros(1, 3, 112, 112),
        str(path),
        input_names=["data"],
        output_names=["fc1"],
        dynamic_axes={"data": {0: "batch"}, "fc1": {0: "batch"}},
        dynamo=False,
    )
    return root


@pytest.fixture(scope="module")
def analyzer(model_dir):
    return load_face_analyzer({"detector": "dlib", "recognizer": "tiny_arcface.onnx"}, model_dir)


@pytest.fixture(scope="module")
def t1() -> np.ndarray:
    return read_image(_package_file("insightface", "data", "images", "t1.jpg"))


@pytest.fixture(scope="module")
def astronaut() -> np.ndarray:
    return np.ascontiguousarray(skimage_data.astronaut())


class InvertingGenerator:
    """Test double of the generator: returns 255 - crop and records every call."""

    def __init__(self):
        self.calls: list[tuple[int, tuple]] = []
        self.identities: list[np.ndarray] = []

    def __call__(self, crops, identities):
        self.calls.append((len(crops), tuple(np.asarray(identities).shape)))
        self.identities.append(np.asarray(identities))
        for c in crops:
            assert c.dtype == np.uint8 and c.ndim == 3 and c.shape[0] == c.shape[1]
        return [255 - c for c in crops]


def _max_step(alpha: np.ndarray) -> float:
    return float(max(np.abs(np.diff(alpha, axis=0)).max(initial=0), np.abs(np.diff(alpha, axis=1)).max(initial=0)))


def _centre(box) -> np.ndarray:
    box = np.asarray(box, dtype=np.float64)
    return (box[:2] + box[2:]) / 2


@pytest.fixture(scope="module")
def t1_run(t1, analyzer):
    gen = InvertingGenerator()
    t0 = time.perf_counter()
    out, reports = anonymize_photo(t1, analyzer, gen, 256, FacePolicy())
    print(f"\nanonymize_photo(t1.jpg, native 256, dlib): {time.perf_counter() - t0:.2f} s")
    return out, reports, gen


# ------------------------------------------------------------------------------------------ detection
def test_detection_finds_every_face_of_t1_and_times_512px(analyzer, t1, astronaut):
    faces = analyzer.detect(t1)
    assert len(faces) == 6
    centres = np.array([_centre(f.box) for f in faces])
    for expected in T1_FACES:  # each person found once, at the right place
        assert np.min(np.linalg.norm(centres - expected, axis=1)) < 30, expected
    for f in faces:
        assert f.box.dtype == np.float32 and f.box.shape == (4,)
        assert f.kps.dtype == np.float32 and f.kps.shape == (5, 2)
        # insightface order: image-left eye, image-right eye, nose, image-left / right mouth corner
        assert f.kps[0, 0] < f.kps[2, 0] < f.kps[1, 0]
        assert f.kps[3, 0] < f.kps[4, 0]
        assert max(f.kps[0, 1], f.kps[1, 1]) < f.kps[2, 1] < min(f.kps[3, 1], f.kps[4, 1])

    analyzer.detect(astronaut)
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        faces = analyzer.detect(astronaut)
        times.append(time.perf_counter() - t0)
    print(f"\ndlib detect() on astronaut 512x512: {min(times) * 1e3:.0f} ms (best of 3, all passes)")
    assert len(faces) == 1  # the time is printed, not asserted: it is the machine's (and its load's), not the code's


def test_eye_centres_agree_with_dlibs_own_5_point_model(analyzer, astronaut):
    import dlib

    face = analyzer.detect(astronaut)[0]
    sp5 = dlib.shape_predictor(str(face_recognition_models_dir() / "shape_predictor_5_face_landmarks.dat"))
    x1, y1, x2, y2 = (int(round(v)) for v in face.box)
    parts = sp5(astronaut, dlib.rectangle(x1, y1, x2 - 1, y2 - 1)).parts()
    pts = np.array([(p.x, p.y) for p in parts], dtype=np.float64)
    eyes = sorted([pts[0:2].mean(0), pts[2:4].mean(0)], key=lambda p: p[0])  # image-left first
    assert np.linalg.norm(face.kps[0] - eyes[0]) < 4.0
    assert np.linalg.norm(face.kps[1] - eyes[1]) < 4.0


def test_tilted_heads_are_found_by_the_rotated_passes(analyzer, t1):
    rotated, m = _rotated_canvas(t1, 30.0)
    expected = [transform_points(np.array(c, dtype=np.float64), m)[0] for c in T1_FACES]

    def found(faces):
        centres = np.array([_centre(f.box) for f in faces]) if faces else np.zeros((0, 2))
        return sum(bool(len(centres)) and np.min(np.linalg.norm(centres - e, axis=1)) < 35 for e in expected)

    upright_only = DlibAnalyzer(analyzer.recognizer, rotations=())
    assert found(upright_only.detect(rotated)) <= 4  # the frontal HOG model alone loses tilted faces
    assert found(analyzer.detect(rotated)) == 6


def test_a_small_images_detection_does_not_wait_for_a_large_ones_in_another_thread(analyzer, t1):
    """The BLS detects faces in its request threads: a no-face image's detection, started while a
    6-face photo's runs in another thread, ends first (each thread has its own HOG detector and
    dlib releases the GIL; behind one lock it would end after the photo's). Same results as alone."""
    small = np.dstack([*np.meshgrid(np.arange(320) % 256, np.arange(256) % 256), np.full((256, 320), 128)])
    small = small.astype(np.uint8)
    alone = (len(analyzer.detect(t1)), len(analyzer.detect(small)))
    started, ended, found = threading.Event(), {}, {}

    def run(name, img, signal_start=None):
        if signal_start is not None:
            signal_start.set()
        found[name] = len(analyzer.detect(img))
        ended[name] = time.monotonic()

    photo = threading.Thread(target=run, args=("photo", t1, started))
    photo.start()
    started.wait(10)
    time.sleep(0.05)  # the photo's detection (about 0.6 s here) is under way
    run("small", small)
    photo.join(60)
    assert (found["photo"], found["small"]) == alone == (6, 0)
    assert ended["small"] < ended["photo"], f"the small image ended {ended['small'] - ended['photo']:.3f} s after"


def test_embed_follows_the_arcface_contract(analyzer, model_dir, astronaut):
    import onnxruntime
    from insightface.utils import face_align

    faces = analyzer.detect(astronaut)
    emb = analyzer.embed(astronaut, faces)
    assert emb.shape == (1, 512) and emb.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    # reference: norm_crop on the BGR image, the network sees RGB scaled by (x - 127.5) / 127.5
    chip = face_align.norm_crop(cv2.cvtColor(astronaut, cv2.COLOR_RGB2BGR), faces[0].kps, 112)
    blob = ((chip[..., ::-1].astype(np.float32) - 127.5) / 127.5).transpose(2, 0, 1)[None]
    sess = onnxruntime.InferenceSession(str(model_dir / "tiny_arcface.onnx"), providers=["CPUExecutionProvider"])
    ref = sess.run(None, {"data": np.ascontiguousarray(blob)})[0]
    ref = ref / np.linalg.norm(ref, axis=1, keepdims=True)
    np.testing.assert_allclose(emb, ref, atol=1e-4)
    assert analyzer.embed(astronaut, []).shape == (0, 512)


# ------------------------------------------------------------------------------------------ photo driver
def test_every_t1_face_reported_and_anonymized_in_one_batch(t1_run, t1):
    out, reports, gen = t1_run
    assert len(reports) == 6
    assert gen.calls == [(6, (6, 512))]  # one generator call, all six faces
    np.testing.assert_allclose(np.linalg.norm(gen.identities[0], axis=1), 1.0, atol=1e-5)
    centres = np.array([_centre(r["box"]) for r in reports])
    for expected in T1_FACES:
        assert np.min(np.linalg.norm(centres - expected, axis=1)) < 30
    for i, rep in enumerate(reports):
        assert rep["index"] == i
        assert rep["action"] == "anonymized"
        assert rep["identity_source"] in (DETECTED_IN_CROP, TEMPLATE_FALLBACK)
        assert rep["crop_size"] == 256 and rep["scale"] > 1.0
        assert np.asarray(rep["landmarks"]).shape == (5, 2) and len(rep["box"]) == 4
        assert isinstance(rep["score"], float) and rep["reason"]
        nose = np.round(rep["landmarks"][2]).astype(int)
        assert np.abs(out[nose[1], nose[0]].astype(int) - t1[nose[1], nose[0]].astype(int)).sum() > 0
    assert sum(r["identity_source"] == DETECTED_IN_CROP for r in reports) >= 5


def test_pixels_outside_the_face_masks_are_untouched(t1_run, t1):
    out, reports, _ = t1_run
    union = union_mask(reports, t1.shape)
    outside = union == 0
    assert np.array_equal(out[outside], t1[outside])
    changed = np.any(out != t1, axis=2)
    assert changed.sum() > 6 * 1000  # the faces really were replaced
    assert not np.any(changed & outside)
    # the masks are face-sized: inside each crop square, well short of filling it
    for rep in reports:
        alpha = face_mask(rep, t1.shape)
        square = np.zeros(t1.shape[:2], np.uint8)
        cv2.fillConvexPoly(square, np.round(crop_footprint(np.asarray(rep["matrix"]), 256)).astype(np.int32), 1)
        assert not np.any((alpha > 0) & (square == 0))
        assert 0.2 * square.sum() < (alpha > 0).sum() < 0.7 * square.sum()


def test_alpha_is_soft_zero_outside_and_one_at_the_face_centre(t1_run, t1):
    _, reports, _ = t1_run
    for rep in reports:
        alpha = face_mask(rep, t1.shape)
        for x, y in np.round(rep["landmarks"]).astype(int):  # eyes, nose, mouth corners fully replaced
            assert alpha[y, x] == 1.0
        assert alpha[0].max() == 0 and alpha[-1].max() == 0  # (no t1 face touches the top or bottom)
        assert _max_step(alpha) < STEP_LIMIT
        assert 0 < (alpha[(alpha > 0) & (alpha < 1)]).size  # there is a feather band
    assert _max_step(union_mask(reports, t1.shape)) < STEP_LIMIT


def test_alpha_stays_soft_for_small_and_large_crops(analyzer, t1):
    """The feather is at least 20 photo pixels whatever the magnification."""
    face = analyzer.detect(t1)[0]
    for size, shrink in ((64, 1.0), (1024, 1.0), (1024, 0.5)):
        kps = face.kps * shrink
        m = alignment_matrix(kps, size)
        alpha = face_mask({"action": "anonymized", "matrix": m.tolist(), "crop_size": size}, t1.shape)
        assert alpha[int(kps[2, 1]), int(kps[2, 0])] == 1.0
        assert _max_step(alpha) < STEP_LIMIT, (size, shrink)


def test_face_at_the_image_border_is_pasted_inside_the_photo_only(analyzer, astronaut):
    img = np.ascontiguousarray(astronaut[:, 190:])  # her face is now cut by the left edge
    gen = InvertingGenerator()
    out, reports = anonymize_photo(img, analyzer, gen, 256, FacePolicy())
    assert len(reports) == 1 and reports[0]["action"] == "anonymized"
    footprint = crop_footprint(np.asarray(reports[0]["matrix"]), 256)
    assert footprint[:, 0].min() < 0  # the crop reaches past the left edge
    union = union_mask(reports, img.shape)
    assert union[:, 0].max() > 0.5  # the mask is cut by the border, not shrunk
    assert np.array_equal(out[union == 0], img[union == 0])
    assert gen.calls == [(1, (1, 512))]


def test_face_free_image_is_returned_unchanged(analyzer):
    gen = InvertingGenerator()
    coffee = np.ascontiguousarray(skimage_data.coffee())
    gradient = np.dstack([*np.meshgrid(np.arange(300) % 256, np.arange(200) % 256), np.full((200, 300), 128)]).astype(
        np.uint8
    )
    for img in (coffee, gradient):
        before = img.copy()
        out, reports = anonymize_photo(img, analyzer, gen, 256, FacePolicy())
        assert reports == []
        assert out is img and np.array_equal(out, before)
    assert gen.calls == []


def test_tiny_faces_in_a_downscaled_photo_are_blurred_by_default(analyzer, t1):
    small = cv2.resize(t1, None, fx=0.4, fy=0.4, interpolation=cv2.INTER_AREA)
    gen = InvertingGenerator()
    out, reports = anonymize_photo(small, analyzer, gen, 1024, FacePolicy())  # SDXL size: min 48 px
    assert len(reports) == 6  # found by the upsampled pass (HOG alone stops at ~80 px)
    assert all(r["action"] == "blurred" and "minimum" in r["reason"] for r in reports)
    assert all(r["identity_source"] is None for r in reports)
    assert gen.calls == []
    union = union_mask(reports, small.shape)
    assert np.array_equal(out[union == 0], small[union == 0])
    assert _max_step(union) < STEP_LIMIT
    for rep in reports:  # the face is really blurred: far less fine detail around the nose
        x, y = np.round(rep["landmarks"][2]).astype(int)
        before = cv2.Laplacian(cv2.cvtColor(small[y - 8 : y + 9, x - 8 : x + 9], cv2.COLOR_RGB2GRAY), cv2.CV_64F).var()
        after = cv2.Laplacian(cv2.cvtColor(out[y - 8 : y + 9, x - 8 : x + 9], cv2.COLOR_RGB2GRAY), cv2.CV_64F).var()
        assert after < 0.35 * before


def test_too_small_policy_leave_changes_nothing(analyzer, t1):
    gen = InvertingGenerator()
    out, reports = anonymize_photo(t1, analyzer, gen, 256, FacePolicy(min_face_px=400, small_action="leave"))
    assert len(reports) == 6 and all(r["action"] == "left" for r in reports)
    assert np.array_equal(out, t1)
    assert gen.calls == []


def test_too_small_policy_pixelate_changes_only_masked_pixels(analyzer, t1):
    gen = InvertingGenerator()
    out, reports = anonymize_photo(t1, analyzer, gen, 256, FacePolicy(min_face_px=400, small_action="pixelate"))
    assert [r["action"] for r in reports] == ["pixelated"] * 6
    assert gen.calls == []
    union = union_mask(reports, t1.shape)
    assert np.array_equal(out[union == 0], t1[union == 0])
    for rep in reports:  # blocky inside: most horizontal neighbours equal in the fully masked core
        alpha = face_mask(rep, t1.shape)
        core = (alpha[:, 1:] == 1) & (alpha[:, :-1] == 1)
        same_out = np.all(out[:, 1:] == out[:, :-1], axis=2)[core].mean()
        same_in = np.all(t1[:, 1:] == t1[:, :-1], axis=2)[core].mean()
        assert same_out > 0.7 and same_in < 0.3


def test_mixed_sizes_one_batch_with_only_the_large_faces(analyzer, t1):
    gen = InvertingGenerator()
    policy = FacePolicy(min_face_px=100, small_action="blur")  # one face of t1 has a ~88 px box
    out, reports = anonymize_photo(t1, analyzer, gen, 256, policy)
    small = [r for r in reports if max(r["box"][2] - r["box"][0], r["box"][3] - r["box"][1]) < 100]
    assert len(small) >= 1
    assert all(r["action"] == "blurred" for r in small)
    n_anon = sum(r["action"] == "anonymized" for r in reports)
    assert n_anon == 6 - len(small) >= 1
    assert gen.calls == [(n_anon, (n_anon, 512))]


def test_max_upscale_limits_what_goes_to_the_generator(analyzer, astronaut):
    gen = InvertingGenerator()
    out, reports = anonymize_photo(astronaut, analyzer, gen, 1024, FacePolicy(max_upscale=2.0, small_action="leave"))
    assert len(reports) == 1 and reports[0]["scale"] > 2.0
    assert reports[0]["action"] == "left" and "upscale" in reports[0]["reason"]
    assert gen.calls == [] and np.array_equal(out, astronaut)


def test_color_matching_removes_a_colour_cast_of_the_generator(analyzer, astronaut):
    def cast(crops, identities):
        return [np.clip(c.astype(int) + [40, 0, -30], 0, 255).astype(np.uint8) for c in crops]

    out_on, reports = anonymize_photo(astronaut, analyzer, cast, 256, FacePolicy(color_match=True))
    out_off, _ = anonymize_photo(astronaut, analyzer, cast, 256, FacePolicy(color_match=False))
    inside = face_mask(reports[0], astronaut.shape) > 0.5
    err_on = np.abs(out_on.astype(int) - astronaut)[inside].mean()
    err_off = np.abs(out_off.astype(int) - astronaut)[inside].mean()
    assert err_on < 0.3 * err_off


def test_generator_contract_is_checked(analyzer, astronaut):
    with pytest.raises(ValueError, match="returned 0 images for 1 faces"):
        anonymize_photo(astronaut, analyzer, lambda crops, ids: [], 128, FacePolicy())
    with pytest.raises(ValueError, match="uint8"):
        anonymize_photo(
            astronaut, analyzer, lambda crops, ids: [c.astype(np.float32) for c in crops], 128, FacePolicy()
        )
    with pytest.raises(ValueError, match="small_action"):
        FacePolicy(small_action="smudge")


# ------------------------------------------------------------------------------------------ EXIF
def _jpeg(rgb: np.ndarray, transpose=None, orientation: int | None = None) -> bytes:
    img = Image.fromarray(rgb)
    if transpose is not None:
        img = img.transpose(transpose)
    exif = Image.Exif()
    if orientation:
        exif[0x0112] = orientation
    exif[0x010F] = "TestCam"  # Make, to see that metadata does not survive
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=95, exif=exif.tobytes())
    return buf.getvalue()


def _iou(a, b) -> float:
    x1, y1, x2, y2 = max(a[0], b[0]), max(a[1], b[1]), min(a[2], b[2]), min(a[3], b[3])
    inter = max(0, x2 - x1) * max(0, y2 - y1)
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


@pytest.fixture(scope="module")
def t1_jpeg_faces(analyzer, t1):
    """Faces of t1 after a JPEG round trip without an orientation tag (the reference)."""
    return analyzer.detect(decode_image(_jpeg(t1)))


@pytest.mark.parametrize(
    "orientation, stored_as",
    [(6, Image.Transpose.ROTATE_90), (3, Image.Transpose.ROTATE_180), (8, Image.Transpose.ROTATE_270)],
)
def test_exif_rotated_copy_gives_the_same_faces_and_output_has_no_exif(
    analyzer, t1, t1_jpeg_faces, orientation, stored_as
):
    reference = t1_jpeg_faces
    data = _jpeg(t1, stored_as, orientation)  # pixels stored rotated, the tag says how to show them
    raw = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
    assert raw.shape != t1.shape or orientation == 3
    assert len(analyzer.detect(np.ascontiguousarray(raw))) < 6  # ignoring the tag would lose faces

    rgb = decode_image(data)
    assert rgb.shape == t1.shape
    faces = analyzer.detect(rgb)
    assert len(faces) == len(reference) == 6
    for f, r in zip(faces, reference):
        assert _iou(f.box, r.box) > 0.6
        assert np.abs(f.kps - r.kps).max() < 4.0

    if orientation != 6:
        return  # the output side is the same for every orientation
    out, reports = anonymize_photo(rgb, analyzer, InvertingGenerator(), 128, FacePolicy())
    assert len(reports) == 6
    for fmt in ("JPEG", "PNG", "WEBP"):
        encoded = encode_image(out, fmt)
        with Image.open(io.BytesIO(encoded)) as img:
            assert "exif" not in img.info
            assert len(img.getexif()) == 0


# ------------------------------------------------------------------------------------------ alignment
def test_template_numbers_are_the_documented_framing():
    pts = template_points(1000)
    eyes_mid = pts[:2].mean(0)
    assert np.allclose(eyes_mid, [500, 400], atol=0.01)
    assert np.linalg.norm(pts[1] - pts[0]) == pytest.approx(250, abs=0.01)
    assert 530 < pts[2, 1] < 560 and 680 < pts[3:, 1].mean() < 700
    assert np.allclose(TEMPLATE_UNIT * 64, template_points(64), atol=1e-5)


@pytest.mark.parametrize("size", [64, 1024])
def test_landmarks_land_on_the_template(size):
    rng = np.random.default_rng(0)
    tmpl = template_points(size).astype(np.float64)
    for _ in range(5):  # a face = the template moved by a random similarity
        angle, scale = rng.uniform(-np.pi, np.pi), rng.uniform(0.05, 3.0)
        rot = scale * np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
        kps = tmpl @ rot.T + rng.uniform(-500, 2000, 2)
        m = alignment_matrix(kps, size)
        assert np.abs(transform_points(kps, m) - tmpl).max() < 1.0
        assert crop_scale(m) == pytest.approx(1 / scale, rel=1e-6)
    # real landmarks are no exact similarity of the template, but land close to it
    noisy = tmpl + rng.normal(0, 0.01 * size, tmpl.shape)
    m = alignment_matrix(noisy, size)
    assert np.abs(transform_points(noisy, m) - tmpl).max() < 0.05 * size


def test_align_face_returns_the_crop_and_matrix(astronaut, analyzer):
    face = analyzer.detect(astronaut)[0]
    for size in (64, 256, 1024):
        crop, m = align_face(astronaut, face.kps, size)
        assert crop.shape == (size, size, 3) and crop.dtype == np.uint8
        assert m.shape == (2, 3)
        assert np.abs(transform_points(face.kps, m) - template_points(size)).max() < 0.05 * size
        # the crop samples the photo through m: the nose pixel matches (within interpolation)
        nx, ny = np.round(template_points(size)[2]).astype(int)
        px, py = transform_points(np.array([[nx, ny]], float), cv2.invertAffineTransform(m))[0]
        assert np.abs(crop[ny, nx].astype(int) - astronaut[int(round(py)), int(round(px))]).max() < 40


def test_crops_of_the_same_face_at_different_rotations_agree(analyzer, t1):
    size = 128
    ref_faces = analyzer.detect(t1)
    ref_crops = [align_face(t1, f.kps, size)[0].astype(np.float32) for f in ref_faces]
    weight = (
        face_mask({"action": "anonymized", "matrix": [[1, 0, 0], [0, 1, 0]], "crop_size": size}, (size, size)) > 0.5
    )
    for angle in (-25.0, 25.0):
        rotated, m = _rotated_canvas(t1, angle)
        faces = analyzer.detect(rotated)
        for ref_face, ref_crop in zip(ref_faces, ref_crops):
            where = transform_points(_centre(ref_face.box)[None], m)[0]
            face = min(faces, key=lambda f: np.linalg.norm(_centre(f.box) - where))
            assert np.linalg.norm(_centre(face.box) - where) < 35
            back = transform_points(face.kps, cv2.invertAffineTransform(m))
            assert np.abs(back - ref_face.kps).max() < 3.0, angle  # landmarks agree in the photo frame
            crop = align_face(rotated, face.kps, size)[0].astype(np.float32)
            same = np.abs(crop - ref_crop)[weight].mean()
            others = min(np.abs(crop - c)[weight].mean() for c in ref_crops if c is not ref_crop)
            assert same < 8, (angle, same)  # grey levels, mean over the face
            assert same < 0.3 * others


# ------------------------------------------------------------------------------------------ identity
def test_identity_from_crop_detects_in_the_aligned_crop(analyzer, astronaut):
    face = analyzer.detect(astronaut)[0]
    crop, _ = align_face(astronaut, face.kps, 256)
    emb, source = identity_from_crop(analyzer, crop)
    assert source == DETECTED_IN_CROP
    assert emb.shape == (512,) and abs(np.linalg.norm(emb) - 1) < 1e-5
    in_crop = max(analyzer.detect_in_crop(crop), key=lambda f: f.area)
    assert np.abs(in_crop.kps - template_points(256)).max() < 0.06 * 256  # the face is where alignment put it
    np.testing.assert_allclose(emb, analyzer.embed(crop, [in_crop])[0], atol=1e-6)
    fallback = analyzer.embed(crop, [template_face(256)])[0]
    assert not np.allclose(emb, fallback, atol=1e-6)  # the detected landmarks were used, not the template


def test_identity_from_crop_falls_back_to_the_template_landmarks(analyzer):
    crop = np.ascontiguousarray(cv2.resize(skimage_data.coffee(), (256, 256)))
    emb, source = identity_from_crop(analyzer, crop)
    assert source == TEMPLATE_FALLBACK
    np.testing.assert_allclose(emb, analyzer.embed(crop, [template_face(256)])[0], atol=1e-6)
    assert abs(np.linalg.norm(emb) - 1) < 1e-5


# ------------------------------------------------------------------------------------------ loader
def test_loader_refuses_bad_specs_without_downloading(model_dir, tmp_path):
    with pytest.raises(FaceModelError, match="unknown face detector"):
        load_face_analyzer({"detector": "haar", "recognizer": "tiny_arcface.onnx"}, model_dir)
    with pytest.raises(FaceModelError, match="does not exist"):
        load_face_analyzer({"detector": "dlib", "recognizer": "missing.onnx"}, model_dir)
    with pytest.raises(FaceModelError, match="never downloaded"):
        load_face_analyzer(
            {"detector": "insightface", "pack": "face_models/buffalo_l", "recognizer": "tiny_arcface.onnx"}, model_dir
        )


def test_insightface_buffalo_l_backend():
    pack = buffalo_pack_from_env()
    if pack is None:
        pytest.skip(
            "no insightface buffalo_l pack here (it cannot be downloaded in this environment); "
            "set REVPERS_BUFFALO_L=/path/to/buffalo_l (det_10g.onnx + w600k_r50.onnx) to run this"
        )
    an = load_face_analyzer(
        {"detector": "insightface", "pack": str(pack), "recognizer": str(pack / "w600k_r50.onnx")}, pathlib.Path("/")
    )
    t1 = read_image(_package_file("insightface", "data", "images", "t1.jpg"))
    faces = an.detect(t1)
    assert len(faces) == 6
    emb = an.embed(t1, faces)
    assert emb.shape == (6, 512)
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    crop, _ = align_face(t1, faces[0].kps, 1024)
    emb0, source = identity_from_crop(an, crop)
    assert source == DETECTED_IN_CROP
    assert float(emb0 @ emb[0]) > 0.5  # same person from the photo and from the aligned crop


def _fake_scrfd(path: pathlib.Path) -> None:
    """An ONNX file with SCRFD's interface (input 1x3x640x640; scores, boxes and 5-point keypoints
    for strides 8/16/32 with 2 anchors) whose outputs are fixed: one detection with score 0.9 at
    stride-32 cell (row 5, col 7) and a weak one (0.05) at cell (row 15, col 15). It exercises the
    production backend's code path; it is not a detector."""
    torch = pytest.importorskip("torch")
    outs = {}
    for s in (8, 16, 32):
        n = (640 // s) ** 2 * 2
        outs[s] = [torch.zeros(n, 1), torch.ones(n, 4), torch.zeros(n, 10)]
    strong, weak = (5 * 20 + 7) * 2, (15 * 20 + 15) * 2
    outs[32][0][strong, 0], outs[32][0][weak, 0] = 0.9, 0.05
    outs[32][1][strong] = torch.tensor([2.0, 2.0, 2.0, 2.0])
    outs[32][2][strong] = torch.tensor([-0.8, -0.5, 0.8, -0.5, 0.0, 0.2, -0.6, 1.0, 0.6, 1.0])

    class FixedOutputs(torch.nn.Module):
        def __init__(self):
            super().__init__()
            for s in (8, 16, 32):
                for k, t in zip("sbk", outs[s]):
                    self.register_buffer(f"{k}{s}", t)

        def forward(self, x):
            z = x.mean() * 0.0
            return tuple(getattr(self, f"{k}{s}") + z for k in "sbk" for s in (8, 16, 32))

    names = [f"{k}{s}" for k in ("score", "bbox", "kps") for s in (8, 16, 32)]
    torch.onnx.export(
        FixedOutputs().eval(),
        torch.zeros(1, 3, 640, 640),
        str(path),
        input_names=["input.1"],
        output_names=names,
        dynamo=False,
    )


def test_insightface_backend_code_path_with_an_scrfd_shaped_model(model_dir, t1, tmp_path):
    pack = tmp_path / "face_models" / "fake_pack"
    pack.mkdir(parents=True)
    _fake_scrfd(pack / "det_10g.onnx")
    (pack / "w600k_r50.onnx").write_bytes((model_dir / "tiny_arcface.onnx").read_bytes())
    spec = {
        "detector": "insightface",
        "pack": "face_models/fake_pack",
        "recognizer": "face_models/fake_pack/w600k_r50.onnx",
    }
    an = load_face_analyzer(spec, tmp_path)
    assert an.name == "insightface"
    faces = an.detect(t1)  # 1280 px wide -> det scale 0.5 into the 640 input
    assert len(faces) == 1  # the 0.05 candidate is below det_thresh 0.1
    f = faces[0]
    assert f.score == pytest.approx(0.9)
    # anchor centre (7, 5) * 32 = (224, 160); distances 2 * 32; then / 0.5 into the photo
    np.testing.assert_allclose(f.box, [320, 192, 576, 448], atol=1e-3)
    np.testing.assert_allclose(f.kps[0], [(224 - 0.8 * 32) * 2, (160 - 0.5 * 32) * 2], atol=1e-3)
    emb = an.embed(t1, faces)
    assert emb.shape == (1, 512) and abs(np.linalg.norm(emb[0]) - 1) < 1e-5
    assert len(load_face_analyzer(spec, tmp_path, det_thresh=0.01).detect(t1)) == 2
