"""The benchmark scripts run, count FLOPs right and write consistent results (tiny settings; the
speed targets themselves are checked by the benchmarks, never here)."""

import argparse
import json
import math
import shutil

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.slow  # end-to-end runs; left out of `make test-fast`


def test_flop_counter_matches_analytic_counts_for_a_conv_and_a_linear():
    from benchmarks.flops import count_flops
    from benchmarks.fullsize import faceid_unet, tiny_configs

    unet_cfg, _, size = tiny_configs()
    unet = faceid_unet(unet_cfg, "meta", torch.float32).unet
    conv = unet.conv_in  # 4 -> 32 channels, 3x3, padding 1, at 8x8 latents
    x = torch.empty(2, 4, size // 8, size // 8, device="meta")
    flops, _ = count_flops(conv, x)
    assert flops == 2 * (2 * conv.out_channels * (size // 8) ** 2) * conv.in_channels * 3 * 3
    lin = unet.time_embedding.linear_1
    flops, _ = count_flops(lin, torch.empty(2, lin.in_features, device="meta"))
    assert flops == 2 * 2 * lin.in_features * lin.out_features


def test_whole_face_counts_follow_the_pipeline():
    from benchmarks.flops import model_flops, pipeline_counts

    c = pipeline_counts(steps=4, skip=0.7, inversion_batch=10)
    # 4 inversion steps in one batched call + 4 generation calls, every sample a CFG pair
    assert c == {
        "unet_calls": 5,
        "unet_sample_evaluations": 16,
        "vae_encodes": 1,
        "vae_decodes": 1,
        "inversion_batch": 10,
    }
    assert pipeline_counts(100, 0.7)["unet_sample_evaluations"] == 400  # algorithm.md: 400 at the defaults
    fl = model_flops(tiny=True, size=64)
    assert fl["unet_batch2_flops"] == 2 * fl["unet_batch1_flops"] > 0
    assert fl["vae_decode_flops"] > 0 and fl["vae_encode_flops"] > 0


def test_flops_main_face_total_and_time_at_peak(tmp_path):
    from benchmarks import flops

    r = flops.main(
        [
            "--tiny",
            "--steps",
            "3",
            "--size",
            "64",
            "--out",
            str(tmp_path),
            "--gpu-results",
            str(tmp_path / "absent.json"),
        ]
    )
    saved = json.loads((tmp_path / "flops.json").read_text())
    c, fl = saved["counts"], saved["flops"]
    assert c["unet_calls"] == 1 + 3 and c["unet_sample_evaluations"] == 2 * (3 + 3)
    # per sample = half a CFG-pair evaluation: without the /2 the UNet part would be twice this
    assert saved["face_flops"]["unet"] == c["unet_sample_evaluations"] * fl["unet_batch1_flops"]
    assert saved["face_flops"]["total"] == (
        c["unet_sample_evaluations"] * fl["unet_batch1_flops"] + fl["vae_encode_flops"] + fl["vae_decode_flops"]
    )
    h100 = saved["time_at_peak"]["H100 SXM"]
    expect = saved["face_flops"]["unet"] / (989.4e12) + saved["face_flops"]["vae"] / (494.7e12)
    assert h100["face_total_s"] == pytest.approx(expect, abs=1e-4)
    assert r["measured"]["available"] is False and r["measured"]["fraction_of_peak"] is None


def test_flops_takes_the_gpu_fraction_only_at_the_same_settings(tmp_path):
    from benchmarks.flops import measured_fraction

    frac = {
        "gpu_row": "H100 SXM",
        "steps": 100,
        "skip": 0.7,
        "size": 1024,
        "face_defaults": 0.41,
        "measured_face_defaults_s": 6.9,
        "unet_step_batch2": 0.55,
        "measured_unet_step_batch2_ms": 25.0,
    }
    path = tmp_path / "gpu_fullsize.json"
    path.write_text(
        json.dumps({"machine": {"gpu": {"name": "NVIDIA H100 80GB HBM3"}}, "tiny": False, "fraction_of_peak": frac})
    )
    same = argparse.Namespace(steps=100, skip=0.7, size=1024, tiny=False)
    m = measured_fraction(path, same)
    assert m["available"] and m["fraction_of_peak"] == 0.41 and m["unet_step_fraction_of_peak"] == 0.55
    other = measured_fraction(path, argparse.Namespace(steps=50, skip=0.7, size=1024, tiny=False))
    assert other["available"] is False and other["fraction_of_peak"] is None and "steps" in other["note"]


def _two_face_photo(path, one_face):
    """Two faces side by side (the one-face photo and its mirror image): a cheap multi-face input."""
    from PIL import Image

    face = np.asarray(Image.open(one_face).convert("RGB"))
    gap = np.full((face.shape[0], 24, 3), 255, np.uint8)
    Image.fromarray(np.concatenate([face, gap, face[:, ::-1]], axis=1)).save(path)


def _batch_composition_bound(bundle, photos, steps: int, inv: int, seed: int) -> int:
    """How far (a) may lie from (b), derived on the running machine (tests/numerics.py): e, each
    component's largest difference between a sample computed in (b)'s batches and alone, measured
    on (b)'s own inputs; A, the largest pixel change (b) shows when every output element of every
    component call moves by +-e. Before rounding that change is at most A + 1 levels; (a)'s real
    error, at most e on a few elements, is allowed twice that (for an error direction the method
    amplifies more than random signs), and rounding adds one: 2 (A + 1) + 1."""
    from numerics import ProbeComponents, each_sample_alone

    from benchmarks.pipelines import inprocess_request, max_pixel_difference
    from revpers.core.params import Params
    from revpers.gate.policy import VerifyPolicy
    from revpers.service.anonymizer import Anonymizer

    anonymizer = Anonymizer(bundle, inversion_batch=inv)
    models, params, verify = anonymizer.models, Params(steps=steps, seed=seed), VerifyPolicy(verify=False)
    raws = [p.read_bytes() for p in sorted(photos.iterdir())]
    with torch.inference_mode():
        anonymizer.models = measured = ProbeComponents(models, other=each_sample_alone(models))
        refs = [inprocess_request(anonymizer, raw, params, verify)[0] for raw in raws]
        anonymizer.models = ProbeComponents(models, perturb=measured.error)
        carried = max(
            max_pixel_difference(inprocess_request(anonymizer, raw, params, verify)[0], ref)
            for raw, ref in zip(raws, refs)
        )
    print(f"batch composition: component max abs {measured.error}, carried to {carried} levels")
    return 2 * (carried + 1) + 1


def test_compare_in_process_writes_consistent_results(tmp_path, smoke_bundle_dir):
    from benchmarks import compare
    from benchmarks.common import photo_folder

    photos = tmp_path / "photos"
    photos.mkdir()
    tom = photo_folder()[1]
    shutil.copy(tom, photos)
    _two_face_photo(photos / "two_faces.png", tom)
    steps, inv = 3, 10
    r = compare.main(
        [
            "--steps",
            str(steps),
            "--photos",
            str(photos),
            "--no-server",
            "--warmup-passes",
            "0",
            "--inversion-batch",
            str(inv),
            "--bundle",
            str(smoke_bundle_dir),
            "--out",
            str(tmp_path / "res"),
            "--work",
            str(tmp_path / "w"),
        ]
    )
    saved = json.loads((tmp_path / "res" / "compare.json").read_text())
    assert (tmp_path / "res" / "compare.md").is_file() and (tmp_path / "res" / "compare.png").stat().st_size > 0
    assert saved["per_image_ms"] == r["per_image_ms"]
    rows = saved["per_photo"]
    assert [(x["photo"], x["faces"]) for x in rows] == [("Tom_Hanks_54745.png", 1), ("two_faces.png", 2)]
    assert saved["params"]["verification_gate"] is False
    for x in rows:
        f = x["faces"]
        # (a): each face alone, one UNet call per inversion step and per generation step, CFG pair each
        assert x["a_unet"] == {"calls": 2 * f * steps, "samples": 4 * f * steps, "by_batch": {"2": 2 * f * steps}}
        # (b): all faces together, the inversion batched (steps <= inversion batch: one call)
        assert x["b_unet"] == {
            "calls": math.ceil(steps / inv) + steps,
            "samples": 4 * f * steps,
            "by_batch": {str(2 * f * steps): 1, str(2 * f): steps},
        }
        assert x["a_prompt_encodes"] == f  # no prompt cache: the empty prompt encoded for every face
        assert x["a_face_models_read_from_disk"] == 2  # landmark model and HOG detector, read again
        assert "verify" not in x["b_stages_ms"]  # the gate is off, as in (a)
        assert {"load_pipeline", "load_face_models", "inversion", "detect"} <= set(x["a_stages_ms"])
        assert {"detect", "identity_embed", "align_paste", "inversion", "decode", "encode"} <= set(x["b_stages_ms"])
    a = sum(x["a_ms"] for x in rows) / 2
    b = sum(x["b_ms"] for x in rows) / 2
    reload = sum(x["a_stages_ms"]["load_face_models"] for x in rows) / 2
    assert saved["per_image_ms"]["a"] == pytest.approx(a, abs=1e-3)
    assert saved["ratios"]["a_over_b"] == pytest.approx(a / b, rel=1e-3)
    assert saved["ratios"]["a_over_b_without_face_model_reload"] == pytest.approx((a - reload) / b, rel=1e-3)
    # same models, same math, same seeds; only the batch composition differs, and torch's CPU kernels
    # round a sample differently in another batch: bounded by what the method makes of that here
    bound = _batch_composition_bound(smoke_bundle_dir, photos, steps, inv, saved["params"]["seed"])
    print(f"max |a - b| {saved['max_pixel_diff_a_vs_b']} levels, bound {bound}")
    assert saved["max_pixel_diff_a_vs_b"] <= bound
    t = saved["targets"]["b_vs_a"]
    assert t["pass"] == (t["measured"] >= 3.0)
    assert t["measured"] == pytest.approx(a / b, rel=1e-3)
    for key in ("machine", "versions", "params", "date"):
        assert saved[key]
    assert saved["versions"]["revpers_commit"]

    again = compare.main(["--render-only", "--out", str(tmp_path / "res")])
    rerendered = json.loads((tmp_path / "res" / "compare.json").read_text())
    assert again["rendered"]["revpers_commit"] and rerendered["ratios"] == saved["ratios"]
    assert rerendered["per_photo"] == saved["per_photo"] and rerendered["date"] == saved["date"]
    assert "Re-rendered" in (tmp_path / "res" / "compare.md").read_text()


def test_stages_gate_flag_and_prompt_encode_mean_skips_photos_without_faces():
    from benchmarks import stages

    assert stages.parse([]).verify is True and stages.parse(["--no-verify"]).verify is False
    rows = [
        {"faces": 1, "prompt_encode_uncached_ms": 10.0, "prompt_encode_cached_ms": 0.04},
        {"faces": 6, "prompt_encode_uncached_ms": 6.0, "prompt_encode_cached_ms": 0.02},
        {"faces": 0, "prompt_encode_uncached_ms": 0.0, "prompt_encode_cached_ms": 0.0},
    ]
    assert stages._prompt_encode_means(rows) == pytest.approx([8.0, 0.03])


def test_gpu_fullsize_refuses_without_cuda_and_dry_runs_on_cpu(tmp_path):
    from benchmarks import gpu_fullsize

    if not torch.cuda.is_available():
        with pytest.raises(SystemExit, match="no CUDA device"):
            gpu_fullsize.main(["--out", str(tmp_path)])
    # steps 3 with inversion batch 10: the timed inversion call is a partial batch (3 steps = 6 samples)
    r = gpu_fullsize.main(
        [
            "--device",
            "cpu",
            "--tiny",
            "--steps",
            "3",
            "--fast-steps",
            "2",
            "--iters",
            "1",
            "--warmup",
            "0",
            "--out",
            str(tmp_path),
        ]
    )
    saved = json.loads((tmp_path / "gpu_fullsize_tiny.json").read_text())
    assert saved["tiny"] is True and saved["unet_step_ms"]["batch2"]["batch"] == 2
    assert " -m benchmarks.gpu_fullsize " in saved["command"]  # the module that ran, not the result name
    assert saved["unet_step_ms"]["batch20"]["batch"] == 20
    face = saved["whole_face"]["defaults"]
    assert face["ours_s"] > 0 and face["paper_s"] > 0
    assert face["paper_over_ours"] == pytest.approx(face["paper_s"] / face["ours_s"], rel=1e-2)
    assert {"inversion", "generation", "vae_encode", "vae_decode"} <= set(face["ours_stages_ms"])
    for preset, row in saved["whole_face"].items():
        s = row["steps"]
        paper, ours = row["paper_settings"], row["ours_settings"]
        # the paper's way: one UNet call per inversion step, every prompt encoded on use
        assert paper["inversion_batch"] == 1 and paper["prompt_cache"] is False
        assert paper["unet"] == {"calls": 2 * s, "samples": 4 * s, "by_batch": {"2": 2 * s}}
        assert paper["prompt_encodes"] == 1
        assert ours["inversion_batch"] == 10 and ours["prompt_cache"] is True and ours["prompt_encodes"] == 0
        assert ours["unet"] == {"calls": 1 + s, "samples": 4 * s, "by_batch": {str(2 * s): 1, "2": s}}
        # the warm-up ran every batch shape the timed runs use (incl. the partial inversion batch)
        assert set(ours["unet"]["by_batch"]) <= set(saved["warmup_unet_batches"]), preset
    assert r["targets"]["face_defaults_vs_paper"]["threshold"] == 2.0
