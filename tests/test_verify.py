"""The identity verification gate (revpers.gate.verify) and the audit record, on real photos with the real
dlib recognizer (dlib-bin + face-recognition-models).

Photos ship inside installed packages: insightface's ``t1.jpg`` (6 different people) and
``Tom_Hanks_54745.png``, scikit-image's astronaut. Smoke weights make the generator's output
meaningless, so the gate's logic is fed known pairs: the same person is a photo and its mirrored
(and a downscaled, JPEG re-encoded) copy; an unchanged face comes from ``UnchangedComponents``, a
generator whose denoiser predicts zero noise and whose "VAE" is the identity, so the real pipeline
(inversion, generation, paste-back) returns the input face unchanged.
"""

from __future__ import annotations

import hashlib
import io
import json
import subprocess
import sys
import time
from dataclasses import replace

import numpy as np
import pytest
import torch
from conftest import real_photo
from PIL import Image

from revpers.core.params import ParameterError, Params
from revpers.faces import alignment_matrix, obscure_face
from revpers.gate.audit import canonical_json, pixels_sha256
from revpers.gate.loop import verify_pair
from revpers.gate.policy import (
    ARCFACE_THRESHOLD,
    DLIB_THRESHOLD,
    FACE_VERDICTS,
    IMAGE_VERDICTS,
    LOCATE_TOLERANCE,
    SEED_STRIDE,
    VERIFY_SIZE,
    VerifyPolicy,
    pop_verify_policy,
)
from revpers.gate.recognizers import FaceCheck, Verifier
from revpers.service.images import decode_image, encode_image

skimage_data = pytest.importorskip("skimage.data")


@pytest.fixture(scope="module")
def verifier():
    return Verifier(None)  # dlib HOG detector + dlib ResNet: no bundle


def _embed_faces(verifier, rgb):
    faces = verifier.analyzer.detect(rgb)
    return faces, [verifier.embed(verifier.crop(rgb, verifier.matrix_for(f.kps))) for f in faces]


def _mirror(rgb):
    return np.ascontiguousarray(rgb[:, ::-1])


def _rescaled_jpeg(rgb, k=0.75, quality=70):
    img = Image.fromarray(rgb).resize((int(rgb.shape[1] * k), int(rgb.shape[0] * k)), Image.LANCZOS)
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=quality)
    return decode_image(buf.getvalue())


def _at(faces, centre, width):
    """Index of the detected face centred at ``centre`` (the astronaut's mission patch is a second,
    false, HOG detection in her mirrored and rescaled copies)."""
    off = [np.hypot((g.box[0] + g.box[2]) / 2 - centre[0], (g.box[1] + g.box[3]) / 2 - centre[1]) for g in faces]
    j = int(np.argmin(off))
    assert off[j] < 0.2 * width, "the face was not found again in the copy"
    return j


def _dist(a, b):
    return float(np.linalg.norm(a.dlib - b.dlib))


def _known_verdicts(report):
    """Every verdict a report carries is one of the documented ones (the client counts them)."""
    assert report["verdict"] in IMAGE_VERDICTS, report["verdict"]
    assert report["audit"]["verdict"] == report["verdict"]
    for face in report["faces"]:
        assert face["verdict"] in FACE_VERDICTS, face["verdict"]
    return report


def test_dlib_same_person_is_closer_than_different_people(verifier):
    """Same person: each photo's face vs the same face in its mirrored copy, and (Tom Hanks, the
    astronaut) vs a 0.75x downscaled JPEG q70 copy. Different people: all pairs of the 8 people in
    t1.jpg (6), Tom_Hanks_54745.png and astronaut()."""
    photos = {"t1": real_photo("t1.jpg"), "hanks": real_photo(), "astronaut": skimage_data.astronaut()}
    people, same = {}, []
    for name, rgb in photos.items():
        faces, embs = _embed_faces(verifier, rgb)
        mfaces, membs = _embed_faces(verifier, _mirror(rgb))
        assert len(faces) == (6 if name == "t1" else 1), name
        for i, (f, e) in enumerate(zip(faces, embs)):
            people[f"{name}{i}"] = e
            centre = np.array([(f.box[0] + f.box[2]) / 2, (f.box[1] + f.box[3]) / 2])
            # the same face at the mirrored place in the mirrored copy
            j = _at(mfaces, (rgb.shape[1] - centre[0], centre[1]), f.box[2] - f.box[0])
            same.append((f"{name}{i}~mirror", _dist(e, membs[j])))
        if name != "t1":
            k = 0.75
            rfaces, rembs = _embed_faces(verifier, _rescaled_jpeg(rgb, k))
            j = _at(rfaces, centre * k, (f.box[2] - f.box[0]) * k)
            same.append((f"{name}~rescaled-jpeg", _dist(embs[0], rembs[j])))
    keys = sorted(people)
    different = [(f"{a}/{b}", _dist(people[a], people[b])) for i, a in enumerate(keys) for b in keys[i + 1 :]]
    s = [d for _, d in same]
    d = [d for _, d in different]
    print(
        f"\ndlib L2, same person ({len(s)} pairs): {min(s):.3f}-{max(s):.3f}, mean {np.mean(s):.3f}; "
        f"different people ({len(d)} pairs): {min(d):.3f}-{max(d):.3f}, mean {np.mean(d):.3f}"
    )
    print("same:", ", ".join(f"{k} {v:.3f}" for k, v in same))
    assert max(s) < min(d)
    # and the documented operating point separates them on these photos
    assert max(s) < DLIB_THRESHOLD < min(d)


@pytest.mark.slow
def test_unchanged_face_fails_and_a_blurred_face_passes(verifier):
    t1 = real_photo("t1.jpg")
    blurred = t1.copy()
    for f in verifier.analyzer.detect(t1):
        obscure_face(blurred, alignment_matrix(f.kps, 1024), 1024, "blur")
    t0 = time.perf_counter()
    same = verify_pair(verifier, t1, t1.copy())
    t_pair = time.perf_counter() - t0
    obscured = verify_pair(verifier, t1, blurred)
    print(
        f"\nverify_pair t1 (6 faces, detection included): {t_pair:.2f} s; unchanged dlib distances "
        f"{[r['dlib_distance'] for r in same]}; blurred {[r['dlib_distance'] for r in obscured]}"
    )
    assert len(same) == len(obscured) == 6
    assert all(r["dlib_match"] and not r["passed"] and r["dlib_distance"] < 0.05 for r in same)
    assert all(r["passed"] and r["dlib_distance"] > DLIB_THRESHOLD for r in obscured)
    assert all(r["arcface_cosine"] is None for r in obscured)  # no bundle: dlib only
    with pytest.raises(ValueError, match="differ in size"):
        verify_pair(verifier, t1, t1[:-2])
    # the unchanged faces were found again in the output crops (so they were measured where they are)
    assert all(r["redetected"] for r in same)


def test_redetection_takes_only_a_face_within_the_locate_tolerance(verifier):
    """The output face is re-detected in its crop when its 5 points are within LOCATE_TOLERANCE of the
    side from the input face's; a face shifted further is not taken (it is measured at the input
    face's place instead, ``redetected`` False)."""
    astronaut = skimage_data.astronaut()
    face = verifier.analyzer.detect(astronaut)[0]
    m = verifier.matrix_for(face.kps)
    ref = verifier.embed(verifier.crop(astronaut, m))
    assert ref.redetected  # the input face itself, in its own crop
    limit = LOCATE_TOLERANCE * VERIFY_SIZE
    for shift, taken in ((0.6 * limit, True), (1.4 * limit, False)):
        shifted = m.copy()
        shifted[0, 2] += shift  # the face sits `shift` px further right in this crop
        crop = verifier.crop(astronaut, shifted)
        found = verifier.analyzer.detect_in_crop(crop)
        where = [float(np.mean(np.linalg.norm(f.kps - (ref.face.kps + [shift, 0]), axis=1))) for f in found]
        assert where and min(where) < 0.1 * limit, "the detector must see the shifted face for this test"
        out = verifier.embed(crop, fallback_face=ref.face)
        assert out.redetected is taken, shift
        if taken:
            np.testing.assert_allclose(out.face.kps, ref.face.kps + [shift, 0], atol=0.1 * limit)
        else:  # measured at the input face's place
            assert out.face is ref.face


def test_dlib_landmarks_of_the_redetection_are_reused():
    """With the dlib analyzer the 68 points re-detection predicted in a 320 px crop are reused by dlib's
    recognizer (no second prediction), and the descriptor is exactly the one a fresh prediction gives."""
    v = Verifier(None)
    calls = []
    predictor = v.dlib.predictor
    v.dlib.predictor = lambda *a: calls.append(1) or predictor(*a)
    astronaut = skimage_data.astronaut()
    crop = v.crop(astronaut, v.matrix_for(v.analyzer.detect(astronaut)[0].kps))
    found = v.embed(crop)
    assert found.redetected and "landmarks68" in found.face.extra and calls == []
    np.testing.assert_array_equal(found.dlib, v.dlib(crop, found.face.box))
    assert calls == [1]
    # a face measured at another crop's place: its points belong to that crop, so they are predicted here
    elsewhere = v.embed(np.zeros_like(crop), fallback_face=found.face)
    assert not elsewhere.redetected and calls == [1, 1]


def test_face_check_thresholds_and_the_pass_rule():
    """ArcFace matches at cosine >= its threshold, dlib at distance <= its threshold; a face passes
    only when neither matches; without ArcFace dlib alone decides."""

    def check(cos, dist):
        return FaceCheck(cos, dist, True, None if cos is None else ARCFACE_THRESHOLD, DLIB_THRESHOLD)

    at = check(ARCFACE_THRESHOLD, 0.9)
    assert at.arcface_match is True and at.dlib_match is False and not at.passed
    below = check(np.nextafter(ARCFACE_THRESHOLD, -1), 0.9)
    assert below.arcface_match is False and below.passed
    assert check(0.0, DLIB_THRESHOLD).dlib_match and not check(0.0, DLIB_THRESHOLD).passed
    assert check(0.0, np.nextafter(DLIB_THRESHOLD, 1)).passed
    assert not check(0.9, 0.1).passed  # both match
    dlib_only = check(None, 0.9)
    assert dlib_only.arcface_match is None and dlib_only.passed and not check(None, 0.5).passed
    assert at.as_dict() == {
        "arcface_cosine": 0.28,
        "arcface_threshold": 0.28,
        "arcface_match": True,
        "dlib_distance": 0.9,
        "dlib_threshold": 0.6,
        "dlib_match": False,
        "redetected": True,
        "passed": False,
    }


@pytest.mark.slow
def test_arcface_half_of_the_gate(smoke_bundle):
    """A bundle that is not flagged smoke gets the ArcFace half: the smoke bundle's random ArcFace-contract
    ONNX (a random network barely tells faces apart, so it still matches t1's blurred faces, cosine
    ~1) with the flag off. dlib passes the blurred faces, ArcFace does not: the face must not pass."""
    from revpers.gate.recognizers import verifier_for_bundle
    from revpers.models.bundle import Bundle

    v = verifier_for_bundle(Bundle(smoke_bundle.root, {**smoke_bundle.manifest, "smoke": False}))
    assert v.use_arcface and v.describe()["arcface"]["used"] and v.arcface_threshold == ARCFACE_THRESHOLD
    t1 = real_photo("t1.jpg")
    blurred = t1.copy()
    for f in v.analyzer.detect(t1):
        obscure_face(blurred, alignment_matrix(f.kps, 1024), 1024, "blur")
    same, obscured = verify_pair(v, t1, t1.copy()), verify_pair(v, t1, blurred)
    print(
        f"\nsmoke ArcFace, t1: unchanged cosines {[r['arcface_cosine'] for r in same]}, "
        f"blurred {[r['arcface_cosine'] for r in obscured]}"
    )
    assert len(same) == len(obscured) == 6
    assert all(abs(r["arcface_cosine"] - 1) < 1e-4 and r["arcface_match"] and not r["passed"] for r in same)
    for r in obscured:
        assert r["arcface_threshold"] == ARCFACE_THRESHOLD and r["arcface_cosine"] >= ARCFACE_THRESHOLD
        assert r["arcface_match"] and not r["dlib_match"] and not r["passed"]


# ------------------------------------------------------------------------------------------ policy
def test_policy_validation_and_retry_schedule():
    p = VerifyPolicy()
    assert (p.verify, p.retries, p.fallback) == (True, 2, "blur") and p.attempts == 3
    assert [p.seed_for(7, a) for a in range(3)] == [7, 7 + SEED_STRIDE, 7 + 2 * SEED_STRIDE]
    assert [p.params_for(Params(), a).guidance for a in range(3)] == [-10.0, -12.0, -14.0]
    g = VerifyPolicy(retry_mode="guidance", guidance_step=5)
    assert [g.seed_for(7, a) for a in range(3)] == [7, 7, 7]
    assert g.params_for(Params(guidance=-48), 2).guidance == -50.0  # clamped to Params' range
    s = VerifyPolicy(retry_mode="seed")
    assert s.params_for(Params(), 2).guidance == -10.0 and s.seed_for(2**63 - 1, 1) < 2**63
    assert VerifyPolicy(verify=False, retries=5).attempts == 1
    options = {"steps": 4, "retries": "1", "fallback": "reject", "verify": "on"}
    got = pop_verify_policy(options)
    assert options == {"steps": 4} and got == VerifyPolicy(retries=1, fallback="reject")
    for bad, pattern in [
        ({"retries": 9}, r"retries must be an integer in \[0, 5\]"),
        ({"retries": "two"}, "retries must be"),
        ({"retries": True}, "retries must be"),
        ({"retry_mode": "harder"}, "retry_mode must be one of seed, guidance, both"),
        ({"fallback": "burn"}, "fallback must be one of blur, pixelate, fill, reject"),
        ({"guidance_step": 0}, r"guidance_step must be a number in \(0, 20\]"),
        ({"guidance_step": "nan"}, "guidance_step"),
        ({"verify": "maybe"}, "verify must be"),
        ({"verfy": True}, "unknown verification parameter.*verfy"),
    ]:
        with pytest.raises(ParameterError, match=pattern):
            VerifyPolicy.from_mapping(bad)


# ------------------------------------------------------------------------------------------ the gate in the pipeline
class UnchangedComponents:
    """pipeline.Components whose output equals its input: identity "VAE" (latents = images) and a
    denoiser that predicts zero noise, so inversion + generation reproduce x0 whatever the
    identity or guidance (the failure the gate exists for: a generator that changed nothing)."""

    def __init__(self, torch_models):
        self.schedule = torch_models.schedule
        self.text = torch_models.text
        self.device = "cpu"
        self.unet_dtype = torch.float32
        self.calls = []

    def denoise(self, x, t, cond):
        return torch.zeros_like(x)

    def encode(self, images):
        self.calls.append(images.shape[0])
        return images.clone()

    def decode(self, latents):
        return latents.clone()


@pytest.fixture(scope="module")
def unchanged(smoke_bundle, torch_models):
    """An Anonymizer over the smoke bundle (dlib detector, random ArcFace -> dlib-only gate) whose
    generator changes nothing, at a 256 px face crop so the pasted face is the input face."""
    from revpers.models.bundle import Bundle
    from revpers.service.anonymizer import Anonymizer

    bundle = Bundle(smoke_bundle.root, {**smoke_bundle.manifest, "native_size": 256})
    return Anonymizer(bundle, models=UnchangedComponents(torch_models))


@pytest.fixture
def run_faces_calls(monkeypatch):
    """What the anonymizer really hands the generator (``run_faces``) per attempt."""
    import revpers.service.anonymizer as anonymizer_module

    real, calls = anonymizer_module.run_faces, []

    def recording(models, crops, identities, params, native_size, **kwargs):
        calls.append({"faces": len(crops), "seeds": kwargs.get("seeds"), "params": params})
        return real(models, crops, identities, params, native_size, **kwargs)

    monkeypatch.setattr(anonymizer_module, "run_faces", recording)
    return calls


@pytest.mark.slow
def test_unchanged_faces_are_retried_in_one_batch_then_blurred(unchanged, run_faces_calls):
    t1 = real_photo("t1.jpg")
    unchanged.models.calls.clear()
    t0 = time.perf_counter()
    res = unchanged.anonymize_photo(t1, Params(steps=2, seed=5))
    dt = time.perf_counter() - t0
    rep = _known_verdicts(res.report)
    print(
        f"\nunchanged generator on t1: {dt:.2f} s, gate {rep['timings_ms']['verify']:.0f} ms for "
        f"{rep['verification']['embeddings_computed']} embeddings; batches {rep['generator_batches']}"
    )
    assert rep["generator_batches"] == [6, 6, 6] and unchanged.models.calls == [6, 6, 6]
    # the generator got each attempt's seeds and guidance (the rest of the parameters unchanged)
    assert [c["seeds"] for c in run_faces_calls] == [[5 + k + a * SEED_STRIDE for k in range(6)] for a in range(3)]
    assert [c["params"].guidance for c in run_faces_calls] == [-10.0, -12.0, -14.0]
    assert all(replace(c["params"], guidance=-10.0) == Params(steps=2, seed=5) for c in run_faces_calls)
    # docs/verification.md "Cost": 6 inputs + 6 first outputs; the retries' outputs are pixel-identical
    # (cache hits); + 6 blurred faces in the final check
    assert rep["verification"]["embeddings_computed"] == 18
    assert rep["verdict"] == "fallback"
    assert rep["verification"]["recognizers"]["arcface"]["used"] is False
    assert "random" in rep["verification"]["note"]
    for face in rep["faces"]:
        assert face["verdict"] == "fallback_blurred" and face["action"] == "blurred"
        seeds = [a["seed"] for a in face["attempts"]]
        assert seeds == [5 + face["index"] + a * SEED_STRIDE for a in range(3)]
        assert [a["guidance"] for a in face["attempts"]] == [-10.0, -12.0, -14.0]
        assert all(a["dlib_match"] and not a["passed"] and a["dlib_distance"] < 0.3 for a in face["attempts"])
        assert face["verification"]["passed"] and face["verification"]["dlib_distance"] > DLIB_THRESHOLD
        assert face["seed_used"] is None
    # the image is the input with every face blurred under its mask, nothing else touched
    assert res.image is not None and res.image.shape == t1.shape
    want = t1.copy()
    for face in rep["faces"]:
        obscure_face(want, np.asarray(face["matrix"]), 256, "blur")
    assert np.array_equal(res.image, want)
    audit = rep["audit"]
    assert audit["verdict"] == "fallback" and audit["input_pixels_sha256"] == pixels_sha256(t1)
    assert audit["output_pixels_sha256"] == pixels_sha256(res.image) and audit["input_sha256"] is None
    assert [len(f["attempts"]) for f in audit["faces"]] == [3] * 6


def test_reject_fallback_returns_no_image_and_says_why(unchanged):
    res = unchanged.anonymize_photo(real_photo(), Params(steps=2), verify=VerifyPolicy(retries=1, fallback="reject"))
    rep = _known_verdicts(res.report)
    assert res.image is None and rep["verdict"] == "rejected"
    assert rep["generator_batches"] == [1, 1]
    assert rep["faces"][0]["verdict"] == "rejected" and len(rep["faces"][0]["attempts"]) == 2
    assert "still matched its input after 2 attempt(s)" in rep["rejected_reason"]
    assert rep["audit"]["output_pixels_sha256"] is None and rep["audit"]["verdict"] == "rejected"


def test_no_retries_pixelate_and_verify_off(unchanged):
    hanks = real_photo()
    res = unchanged.anonymize_photo(hanks, Params(steps=2), verify=VerifyPolicy(retries=0, fallback="pixelate"))
    assert res.report["generator_batches"] == [1]
    face = res.report["faces"][0]
    assert face["verdict"] == "fallback_pixelated" and face["action"] == "pixelated" and len(face["attempts"]) == 1
    off = unchanged.anonymize_photo(hanks, Params(steps=2), verify=VerifyPolicy(verify=False))
    assert off.report["verdict"] == "unverified" and off.report["faces"][0]["verdict"] == "unverified"
    assert "verification" not in off.report["faces"][0] and off.report["generator_batches"] == [1]
    assert off.report["verification"] == {"enabled": False, "policy": VerifyPolicy(verify=False).as_dict()}
    # unchanged output: the face really is the input, up to the crop's resampling there and back
    diff = np.abs(off.image.astype(int) - hanks.astype(int))
    print(f"\nunchanged generator, Tom Hanks: mean abs difference {diff.mean():.2f} levels, max {diff.max()}")
    assert diff.mean() < 1.5


def test_aligned_mode_is_gated(unchanged, verifier, run_faces_calls):
    from revpers.faces import align_face

    astronaut = skimage_data.astronaut()
    face = verifier.analyzer.detect(astronaut)[0]
    crop, _ = align_face(astronaut, face.kps, 256)  # an aligned whole-face image, as the paper's datasets
    res = unchanged.anonymize_aligned(crop, Params(steps=2, seed=1), verify=VerifyPolicy(retry_mode="seed"))
    assert [c["seeds"] for c in run_faces_calls] == [[1 + a * SEED_STRIDE] for a in range(3)]
    assert [c["params"] for c in run_faces_calls] == [Params(steps=2, seed=1)] * 3  # "seed": guidance kept
    f = _known_verdicts(res.report)["faces"][0]
    print(
        f"\naligned astronaut: attempts {[a['dlib_distance'] for a in f['attempts']]}, "
        f"after blur {f['verification']['dlib_distance']}"
    )
    assert res.report["verdict"] == "fallback" and f["verdict"] == "fallback_blurred"
    assert [a["seed"] for a in f["attempts"]] == [1, 1 + SEED_STRIDE, 1 + 2 * SEED_STRIDE]
    assert res.report["generator_batches"] == [1, 1, 1]
    assert f["verification"]["passed"] and res.image.shape == crop.shape and not np.array_equal(res.image, crop)


class BlurringComponents(UnchangedComponents):
    """Like UnchangedComponents, but the "VAE" decoder blurs each crop (Gaussian sigma = side / 12, the
    blur fallback's strength; a whole-face crop blurred so passes dlib) except the crops in ``spare``
    (native-size uint8), which come back unchanged (so they still match)."""

    def __init__(self, torch_models, spare=()):
        from revpers.core.pipeline import to_model_images

        super().__init__(torch_models)
        self.spare = [to_model_images([c])[0] for c in spare]
        self.spared = []

    def encode(self, images):
        self.spared = [any(torch.equal(img, s) for s in self.spare) for img in images]
        return super().encode(images)

    def decode(self, latents):
        import cv2

        side = latents.shape[-1]
        arr = latents.permute(0, 2, 3, 1).numpy()
        out = [
            a if spared else cv2.GaussianBlur(a, (0, 0), side / 12.0, borderType=cv2.BORDER_REPLICATE)
            for a, spared in zip(arr, self.spared)
        ]
        return torch.from_numpy(np.stack(out)).permute(0, 3, 1, 2).contiguous()


def test_aligned_batch_withholds_only_the_rejected_image(smoke_bundle, torch_models, verifier):
    """Two aligned faces in one batch, fallback "reject": the blurred face passes, the unchanged one
    still matches after its retry; only its image is withheld, the other is returned with its report."""
    from revpers.faces import align_face
    from revpers.models.bundle import Bundle
    from revpers.service.anonymizer import Anonymizer, resize_rgb

    astronaut = skimage_data.astronaut()
    crop, _ = align_face(astronaut, verifier.analyzer.detect(astronaut)[0].kps, 256)
    chip = real_photo()
    anon = Anonymizer(
        Bundle(smoke_bundle.root, {**smoke_bundle.manifest, "native_size": 256}),
        models=BlurringComponents(torch_models, spare=[resize_rgb(chip, (256, 256))]),
    )
    results = anon.anonymize_aligned_batch(
        [crop, chip], Params(steps=2, seed=3), verify=VerifyPolicy(retries=1, fallback="reject")
    )
    ok, bad = (_known_verdicts(r.report) for r in results)
    print(
        f"\nblurred face {[a['dlib_distance'] for a in ok['faces'][0]['attempts']]}, "
        f"unchanged face {[a['dlib_distance'] for a in bad['faces'][0]['attempts']]}"
    )
    assert ok["generator_batches"] == bad["generator_batches"] == [2, 1]  # the failing face is retried alone
    assert ok["verdict"] == "passed" and ok["faces"][0]["verdict"] == "passed" and ok["faces"][0]["seed_used"] == 3
    assert ok["faces"][0]["verification"]["passed"] and "rejected_reason" not in ok
    assert bad["verdict"] == "rejected" and bad["faces"][0]["verdict"] == "rejected"
    assert "face 0 still matched its input after 2 attempt(s)" in bad["rejected_reason"]
    assert results[1].image is None and bad["audit"]["output_pixels_sha256"] is None
    out = results[0].image
    assert out is not None and out.shape == crop.shape and not np.array_equal(out, crop)
    assert ok["audit"]["output_pixels_sha256"] == pixels_sha256(out)


def test_a_fallback_that_still_matches_escalates_instead_of_rejecting(unchanged):
    """Tom_Hanks_54745.png is a tight 112 px ArcFace chip, not the whole-face framing aligned mode
    expects: the blur (sized from the framing) is too weak for its face and dlib still matches the
    blurred face. The gate does not release it and does not reject the image either: it escalates
    to the next stronger fallback (pixelate, then a solid fill), re-checking each, and releases the
    first that no recognizer matches."""
    res = unchanged.anonymize_aligned(real_photo(), Params(steps=2), verify=VerifyPolicy(retries=0))
    f = _known_verdicts(res.report)["faces"][0]
    rungs = [c["fallback"] for c in f["fallback_checks"]]
    print(
        f"\ntight chip: attempt {f['attempts'][0]['dlib_distance']}, fallbacks "
        f"{[(c['fallback'], c['dlib_distance']) for c in f['fallback_checks']]}"
    )
    assert rungs[0] == "blur" and f["fallback_checks"][0]["dlib_match"]  # blur alone still matches
    assert len(rungs) >= 2 and rungs == ["blur", "pixelate", "fill"][: len(rungs)]
    assert all(c["dlib_match"] for c in f["fallback_checks"][:-1]) and f["fallback_checks"][-1]["passed"]
    assert f["verdict"] == {"pixelate": "fallback_pixelated", "fill": "fallback_filled"}[rungs[-1]]
    assert f["action"] == {"pixelate": "pixelated", "fill": "filled"}[rungs[-1]]
    assert f["verification"]["passed"] and not f["verification"]["dlib_match"]
    assert res.image is not None and res.report["verdict"] == "fallback" and "rejected_reason" not in res.report


@pytest.mark.slow
def test_audit_is_byte_identical_across_runs(unchanged, smoke_bundle):
    """Twice with the gate's retries (unchanged generator), and twice with the real smoke models."""
    from revpers.service.anonymizer import Anonymizer

    t1 = real_photo("t1.jpg")
    a = unchanged.anonymize_photo(t1, Params(steps=2, seed=9)).report["audit"]
    b = unchanged.anonymize_photo(t1, Params(steps=2, seed=9)).report["audit"]
    assert canonical_json(a) == canonical_json(b)
    assert sum(len(f["attempts"]) for f in a["faces"]) == 18
    real = Anonymizer(smoke_bundle)
    hanks = real_photo()
    r1 = real.anonymize_photo(hanks, Params(steps=3, seed=2))
    r2 = real.anonymize_photo(hanks, Params(steps=3, seed=2))
    assert canonical_json(r1.report["audit"]) == canonical_json(r2.report["audit"])
    audit = _known_verdicts(r1.report)["audit"]
    print(
        f"\nsmoke generator on Tom Hanks: verdict {audit['verdict']}, "
        f"dlib distance {audit['faces'][0]['verification']['dlib_distance']}"
    )
    # a face that passes at once costs 2 embeddings: its input and its output (docs/verification.md "Cost")
    assert audit["verdict"] == "passed" and r1.report["verification"]["embeddings_computed"] == 2
    assert audit["params"] == Params(steps=3, seed=2).as_dict()
    assert audit["bundle"]["manifest_sha256"] == smoke_bundle.digest()
    assert {"revpers", "torch", "onnxruntime", "dlib_runtime", "numpy"} <= set(audit["versions"])
    assert audit["verification"]["dlib"]["model_sha256"]
    text = canonical_json(audit).decode()
    assert "ms" not in {k.rsplit("_", 1)[-1] for k in audit} and str(smoke_bundle.root) not in text
    # a different seed is a different record
    r3 = real.anonymize_photo(hanks, Params(steps=3, seed=3))
    assert canonical_json(r3.report["audit"]) != canonical_json(audit)


def test_audit_names_the_manifest_that_was_loaded(smoke_bundle_dir, tmp_path):
    """The manifest hash is of the bytes load_bundle parsed, not of the file as it is later."""
    from revpers.gate.audit import build_audit
    from revpers.models.bundle import Bundle, load_bundle, manifest_bytes

    root = _bundle_copy(smoke_bundle_dir, tmp_path / "b", name="as loaded")
    raw = (root / "manifest.json").read_bytes()
    bundle = load_bundle(root)
    (root / "manifest.json").write_text(json.dumps({**bundle.manifest, "name": "edited after loading"}))
    want = hashlib.sha256(raw).hexdigest()
    assert bundle.digest() == want and bundle.describe()["manifest_sha256"] == want
    audit = build_audit(
        mode="photo",
        bundle=bundle,
        params={},
        face_policy=None,
        verify_policy={},
        verification=None,
        faces=[],
        verdict="no_faces",
        input_rgb=np.zeros((16, 16, 3), np.uint8),
        output_rgb=None,
        runtime={},
    )
    assert audit["bundle"] == {"name": "as loaded", "manifest_sha256": want, "smoke": True}
    assert load_bundle(root).digest() != want  # a later load sees the edit
    # a bundle built in memory: the hash of its manifest as write_manifest writes it (for a bundle
    # written by write_manifest, the file's hash)
    smoke = load_bundle(smoke_bundle_dir)
    assert Bundle(smoke.root, dict(smoke.manifest)).digest() == smoke.digest()
    assert Bundle(root, {"x": 1}).digest() == hashlib.sha256(manifest_bytes({"x": 1})).hexdigest()


# ------------------------------------------------------------------------------------------ command line
def _revpers(*args):
    return subprocess.run(
        [sys.executable, "-m", "revpers.cli", *map(str, args)], capture_output=True, text=True, timeout=600
    )


@pytest.mark.slow
def test_cli_verify_exit_codes(tmp_path, smoke_bundle_dir):
    t1 = real_photo("t1.jpg")
    blurred = t1.copy()
    from revpers.faces.analysis import DlibAnalyzer

    for f in DlibAnalyzer(None).detect(t1):
        obscure_face(blurred, alignment_matrix(f.kps, 1024), 1024, "blur")
    orig, blur, small = tmp_path / "t1.png", tmp_path / "blurred.png", tmp_path / "small.png"
    orig.write_bytes(encode_image(t1))
    blur.write_bytes(encode_image(blurred))
    small.write_bytes(encode_image(t1[:100, :100]))
    ok = _revpers("verify", orig, blur)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "6 face(s): 6 pass, 0 still match" in ok.stdout and "dlib only" in ok.stdout
    same = _revpers("verify", orig, orig, "--models", smoke_bundle_dir, "--json")
    assert same.returncode == 1, same.stderr
    result = json.loads(same.stdout)
    assert not result["passed"] and len(result["faces"]) == 6
    assert all(f["dlib_match"] for f in result["faces"])
    assert "random" in result["recognizers"]["arcface"]["note"]
    bad = _revpers("verify", orig, small)
    assert bad.returncode == 2 and "differ in size" in bad.stderr
    missing = _revpers("verify", orig, tmp_path / "nope.png")
    assert missing.returncode == 2 and "cannot read file" in missing.stderr


@pytest.mark.slow
def test_cli_anonymize_writes_verdict_and_audit(tmp_path, smoke_bundle_dir):
    src = tmp_path / "hanks.png"
    src.write_bytes(encode_image(real_photo()))
    proc = _revpers(
        "anonymize",
        src,
        "-o",
        tmp_path / "o",
        "--models",
        smoke_bundle_dir,
        "--steps",
        "3",
        "--retries",
        "1",
        "--fallback",
        "pixelate",
    )
    out = tmp_path / "o" / "hanks.png"
    report = json.loads((tmp_path / "o" / "hanks.png.json").read_text())
    assert proc.returncode == (0 if report["verdict"] == "passed" else 1), proc.stderr  # 1: a fallback needs review
    assert "by verdict" in proc.stdout and "SMOKE WEIGHTS" in proc.stdout
    audit = report["audit"]
    face = report["faces"][0]
    assert (report["verdict"], face["verdict"]) in (("passed", "passed"), ("fallback", "fallback_pixelated"))
    if face["verdict"] == "fallback_pixelated":  # --fallback pixelate is what obscures a failed face
        assert face["action"] == "pixelated", face
    assert audit["input_sha256"] == hashlib.sha256(src.read_bytes()).hexdigest()
    assert audit["output_sha256"] == hashlib.sha256(out.read_bytes()).hexdigest()
    assert audit["verify_policy"] == replace(VerifyPolicy(), retries=1, fallback="pixelate").as_dict()
    bad = _revpers("anonymize", src, "-o", tmp_path / "o2", "--models", smoke_bundle_dir, "--retries", "9")
    assert bad.returncode == 2 and "retries must be an integer in [0, 5]" in bad.stderr


def _bundle_copy(src_root, dst, **manifest_changes):
    """A bundle folder that shares ``src_root``'s model files (symlinks) with a changed manifest."""
    dst.mkdir()
    manifest = json.loads((src_root / "manifest.json").read_text())
    for rel in ("sdxl", "ip_adapter", "face_models"):
        (dst / rel).symlink_to(src_root / rel)
    (dst / "manifest.json").write_text(json.dumps({**manifest, **manifest_changes}))
    return dst


@pytest.fixture
def unchanged_cli(monkeypatch, smoke_bundle, torch_models, tmp_path):
    """``revpers.cli.main`` in process, its bundles' generator replaced by UnchangedComponents; returns
    a 256 px copy of the smoke bundle (so the pasted face is the input face, as in ``unchanged``)."""
    from revpers.models.torch_models import TorchModels

    monkeypatch.setattr(TorchModels, "load", classmethod(lambda cls, *a, **k: UnchangedComponents(torch_models)))
    return _bundle_copy(smoke_bundle.root, tmp_path / "bundle256", native_size=256)


@pytest.mark.slow
def test_cli_anonymize_reject_writes_the_report_and_no_image(unchanged_cli, tmp_path, capsys):
    from revpers.cli import main

    src = tmp_path / "hanks.png"
    src.write_bytes(encode_image(real_photo()))
    out = tmp_path / "o"
    code = main(
        [
            "anonymize",
            str(src),
            "-o",
            str(out),
            "--models",
            str(unchanged_cli),
            "--steps",
            "2",
            "--retries",
            "0",
            "--fallback",
            "reject",
        ]
    )
    err = capsys.readouterr().err
    assert code == 1, err
    assert not (out / "hanks.png").exists() and not (out / "hanks.png.part").exists()
    report = _known_verdicts(json.loads((out / "hanks.png.json").read_text()))
    assert report["verdict"] == "rejected" and report.get("output") is None and report["rejected_reason"]
    assert report["audit"]["input_sha256"] == hashlib.sha256(src.read_bytes()).hexdigest()
    assert report["audit"]["output_sha256"] is None and report["audit"]["output_pixels_sha256"] is None
    review = {row["input"]: row for row in json.loads((out / "review.json").read_text())}
    assert review["hanks.png"]["status"] == "rejected" and review["hanks.png"]["output"] is None
    assert "Traceback" not in err


def test_cli_anonymize_no_verify(unchanged_cli, tmp_path, capsys):
    """--no-verify: the generated face is 'unverified', a photo without a face 'no_faces'; exit 1, since
    nothing was released as passed: both are on the review list."""
    from revpers.cli import main

    hanks, coffee = tmp_path / "hanks.png", tmp_path / "coffee.png"
    hanks.write_bytes(encode_image(real_photo()))
    coffee.write_bytes(encode_image(skimage_data.coffee()))
    out = tmp_path / "o"
    code = main(
        [
            "anonymize",
            str(hanks),
            str(coffee),
            "-o",
            str(out),
            "--models",
            str(unchanged_cli),
            "--steps",
            "2",
            "--no-verify",
        ]
    )
    capsys.readouterr()
    assert code == 1
    review = {row["input"]: row for row in json.loads((out / "review.json").read_text())}
    assert review["hanks.png"]["verdict"] == "unverified" and review["coffee.png"]["verdict"] == "no_faces"
    report = _known_verdicts(json.loads((out / "hanks.png.json").read_text()))
    assert report["verdict"] == "unverified" and [f["verdict"] for f in report["faces"]] == ["unverified"]
    assert report["verification"] == {"enabled": False, "policy": VerifyPolicy(verify=False).as_dict()}
    assert report["audit"]["verification"] is None and "verification" not in report["faces"][0]
    assert report["audit"]["output_sha256"] == hashlib.sha256((out / "hanks.png").read_bytes()).hexdigest()
    assert _known_verdicts(json.loads((out / "coffee.png.json").read_text()))["verdict"] == "no_faces"
    summary = json.loads((out / "run-summary.json").read_text())
    assert summary["images_by_verdict"] == {"no_faces": 1, "unverified": 1}
    assert summary["faces_by_verdict"] == {"unverified": 1}


def test_cli_anonymize_bad_face_models_exit_2(monkeypatch, smoke_bundle, torch_models, tmp_path, capsys):
    """A bundle whose face section cannot be loaded is a bad bundle (exit 2), not a verdict (exit 1)."""
    from revpers.cli import main
    from revpers.models.torch_models import TorchModels

    monkeypatch.setattr(TorchModels, "load", classmethod(lambda cls, *a, **k: UnchangedComponents(torch_models)))
    broken = _bundle_copy(smoke_bundle.root, tmp_path / "broken", faces={**smoke_bundle.faces, "detector": "haar"})
    src = tmp_path / "hanks.png"
    src.write_bytes(encode_image(real_photo()))
    code = main(["anonymize", str(src), "-o", str(tmp_path / "o"), "--models", str(broken), "--steps", "2"])
    err = capsys.readouterr().err
    assert code == 2 and 'faces.detector: must be "insightface" or "dlib", got "haar"' in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not (tmp_path / "o" / "hanks.png").exists()


def test_cli_verify_aligned(tmp_path, capsys):
    """verify --aligned: each image is one aligned face (no detection in the original)."""
    import cv2

    from revpers.cli import main
    from revpers.faces import align_face
    from revpers.faces.analysis import DlibAnalyzer

    astronaut = skimage_data.astronaut()
    crop, _ = align_face(astronaut, DlibAnalyzer(None).detect(astronaut)[0].kps, 256)
    orig, blur = tmp_path / "crop.png", tmp_path / "blurred.png"
    orig.write_bytes(encode_image(crop))
    blur.write_bytes(encode_image(cv2.GaussianBlur(crop, (0, 0), 256 / 12.0)))
    assert main(["verify", str(orig), str(orig), "--aligned", "--json"]) == 1
    same = json.loads(capsys.readouterr().out)
    assert [f["box"] for f in same["faces"]] == [[0.0, 0.0, 256.0, 256.0]]
    assert same["faces"][0]["dlib_distance"] == 0.0 and same["faces"][0]["redetected"] and not same["passed"]
    assert main(["verify", str(orig), str(blur), "--aligned"]) == 0
    assert "1 face(s): 1 pass, 0 still match" in capsys.readouterr().out


def test_size_policy_faces_are_not_gated(unchanged):
    from revpers.faces import FacePolicy

    t1 = real_photo("t1.jpg")
    left = unchanged.anonymize_photo(t1, Params(steps=2), policy=FacePolicy(min_face_px=400, small_action="leave"))
    assert left.report["verdict"] == "partial" and left.report["generator_batches"] == []
    assert {f["verdict"] for f in left.report["faces"]} == {"left"} and np.array_equal(left.image, t1)
    blurred = _known_verdicts(unchanged.anonymize_photo(t1, Params(steps=2), policy=FacePolicy(min_face_px=400)).report)
    assert {f["verdict"] for f in blurred["faces"]} == {"not_generated"} and blurred["generator_batches"] == []
    # faces were found, but none went through the gate: not "passed"
    assert blurred["verdict"] == "not_gated" and "verification" not in blurred["faces"][0]
    assert "embeddings_computed" not in blurred["verification"]
    none = _known_verdicts(unchanged.anonymize_photo(skimage_data.coffee(), Params(steps=2)).report)
    assert none["verdict"] == "no_faces" and none["faces"] == []
    _known_verdicts(left.report)
