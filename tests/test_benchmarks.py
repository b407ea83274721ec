"""The benchmark scripts run, count FLOPs right and write consistent results (tiny settings; the
speed targets themselves are checked by the benchmarks, never here)."""

import json
import shutil

import pytest
import torch


def test_flop_counter_matches_analytic_counts_for_a_conv_and_a_linear():
    from benchmarks.flops import count_flops
    from benchmarks.fullsize import faceid_unet, tiny_configs, unet_inputs

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
    assert c == {"unet_calls": 5, "unet_sample_evaluations": 16, "vae_encodes": 1, "vae_decodes": 1,
                 "inversion_batch": 10}
    assert pipeline_counts(100, 0.7)["unet_sample_evaluations"] == 400  # algorithm.md: 400 at the defaults
    fl = model_flops(tiny=True, size=64)
    assert fl["unet_batch2_flops"] == 2 * fl["unet_batch1_flops"] > 0
    assert fl["vae_decode_flops"] > 0 and fl["vae_encode_flops"] > 0


def test_compare_in_process_writes_consistent_results(tmp_path, smoke_bundle_dir):
    from benchmarks import compare
    from benchmarks.common import photo_folder

    photos = tmp_path / "photos"
    photos.mkdir()
    tom, astronaut = photo_folder()[1:3]
    shutil.copy(tom, photos)
    shutil.copy(astronaut, photos)
    r = compare.main(["--steps", "1", "--photos", str(photos), "--no-server", "--warmup-passes", "0",
                      "--bundle", str(smoke_bundle_dir), "--out", str(tmp_path / "res"), "--work", str(tmp_path / "w")])
    saved = json.loads((tmp_path / "res" / "compare.json").read_text())
    assert (tmp_path / "res" / "compare.md").is_file() and (tmp_path / "res" / "compare.png").stat().st_size > 0
    assert saved["per_image_ms"] == r["per_image_ms"]
    rows = saved["per_photo"]
    assert [x["photo"] for x in rows] == ["Tom_Hanks_54745.png", "astronaut.png"]
    assert all(x["faces"] == 1 for x in rows)
    assert saved["per_image_ms"]["a"] == pytest.approx(sum(x["a_ms"] for x in rows) / 2, abs=1e-3)
    assert saved["max_pixel_diff_a_vs_b"] <= 3  # same models, same math, same seeds
    t = saved["targets"]["b_vs_a"]
    assert t["pass"] == (t["measured"] >= 3.0)
    assert t["measured"] == pytest.approx(saved["per_image_ms"]["a"] / saved["per_image_ms"]["b"], rel=1e-3)
    assert {"load_pipeline", "load_face_models", "inversion", "detect"} <= set(rows[0]["a_stages_ms"])
    assert {"detect", "identity_embed", "align_paste", "inversion", "decode", "encode"} <= set(rows[0]["b_stages_ms"])
    for key in ("machine", "versions", "params", "date"):
        assert saved[key]
    assert saved["versions"]["revpers_commit"]


def test_gpu_fullsize_refuses_without_cuda_and_dry_runs_on_cpu(tmp_path):
    from benchmarks import gpu_fullsize

    if not torch.cuda.is_available():
        with pytest.raises(SystemExit, match="no CUDA device"):
            gpu_fullsize.main(["--out", str(tmp_path)])
    r = gpu_fullsize.main(["--device", "cpu", "--tiny", "--steps", "2", "--fast-steps", "1", "--iters", "1",
                           "--warmup", "0", "--out", str(tmp_path)])
    saved = json.loads((tmp_path / "gpu_fullsize_tiny.json").read_text())
    assert saved["tiny"] is True and saved["unet_step_ms"]["batch2"]["batch"] == 2
    assert saved["unet_step_ms"]["batch20"]["batch"] == 20
    face = saved["whole_face"]["defaults"]
    assert face["ours_s"] > 0 and face["paper_s"] > 0
    assert face["paper_over_ours"] == pytest.approx(face["paper_s"] / face["ours_s"], rel=1e-2)
    assert {"inversion", "generation", "vae_encode", "vae_decode"} <= set(face["ours_stages_ms"])
    assert r["targets"]["face_defaults_vs_paper"]["threshold"] == 2.0
