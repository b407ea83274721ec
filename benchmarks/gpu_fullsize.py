"""Issue 6 item 4: full-size numbers on a GPU — SDXL-architecture UNet (+ FaceID) and VAE with
random weights (speed does not depend on weight values) at 1024 px faces.

    python -m benchmarks.gpu_fullsize                       # CUDA: fp16 UNet, fp32 VAE (as SDXL needs)
    python -m benchmarks.gpu_fullsize --device cpu --tiny   # dry run of all the logic on the smoke architecture

Measures: per-step UNet time at batch 2 (one CFG pair) and at the inversion batch (2 x
``--inversion-batch`` timesteps); whole-face latency at the defaults (100 inversion + 100 generation
steps, skip 0.7) and at a fast preset (``--fast-steps``, default 50: half the UNet evaluations), both
our way and the paper's way; peak GPU memory. Whole-face runs go through ``revpers.pipeline.run_faces``
with ``revpers.models.TorchModels`` built from the random modules, so the loop, the solver and the
CPU<->GPU boundary are the production ones.

Our way: inversion batched ``--inversion-batch`` timesteps per UNet call, prompt encodings cached
(optionally ``--compile``). The paper's way on the same GPU: one UNet call per inversion step, both
SDXL text encoders run on every use (no cache); it does NOT include the paper's per-image reload of
the pipeline from disk (random weights have no files to load), so the paper-way figure is a lower
bound and the measured ratio understates the real gap.

Fast preset (not validated for quality here — random weights cannot show it): the same skip and
solver with half the steps. The edit-friendly inversion reconstructs the input exactly at any step
count (the stored noise maps absorb the discretisation error), and SDE-DPM-Solver++(2M) is a
second-order solver meant for tens of steps, so 50 steps keeps the method's structure; whether
re-identification and FID stay at the paper's level must be checked on real weights before use.
Results: benchmarks/results/gpu_fullsize.{json,md,png} (``--tiny``: gpu_fullsize_tiny.*).
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.common import RESULTS, md_table, quiet, stamp, target, write_results
from benchmarks.flops import face_time_at_peak, gpu_peak, model_flops, pipeline_counts
from benchmarks.fullsize import faceid_unet, unet_inputs, vae
from revpers.core.conditioning import TextEmbedding
from revpers.core.params import Params
from revpers.core.pipeline import Timings, count_unet_calls, run_faces
from revpers.core.schedule import NoiseSchedule
from revpers.models.smoke import _byte_level_vocab, _text_config, architecture
from revpers.models.torch_models import TorchModels, VaeDecoder, VaeEncoder
from revpers_client.cli import latency_stats


class NoCudaError(SystemExit):
    pass


def parse(argv=None):
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.gpu_fullsize",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--device", default="cuda")
    p.add_argument("--tiny", action="store_true", help="smoke-bundle architecture at 64 px (dry run)")
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--skip", type=float, default=0.7)
    p.add_argument("--fast-steps", type=int, default=50)
    p.add_argument("--fast-skip", type=float, default=0.7)
    p.add_argument("--inversion-batch", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--iters", type=int, default=10, help="timed UNet calls per batch size")
    p.add_argument("--face-repeats", type=int, default=1, help="whole-face runs per variant (median reported)")
    p.add_argument("--compile", action="store_true", help="torch.compile the UNet for our way")
    p.add_argument("--no-paper", action="store_true", help="skip the paper-way whole-face runs")
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--name", default=None)
    return p.parse_args(argv)


def require_device(device: str) -> None:
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise NoCudaError(
            "gpu_fullsize: no CUDA device is available (torch.cuda.is_available() is False; torch "
            f"{torch.__version__}, built with CUDA {torch.version.cuda}). Run it on a GPU machine "
            "with a CUDA build of torch (make TORCH=torch ...), or use `--device cpu --tiny` for a "
            "dry run of the benchmark logic."
        )


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def text_encoders(tiny: bool, device: str):
    """SDXL's two CLIP text encoders with random weights, as a smoke bundle of that size has them
    (full size: CLIP ViT-L text 768-d, 12 layers; OpenCLIP bigG text 1280-d, 32 layers, projection 1280)."""
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    vocab = len(_byte_level_vocab()[0])
    with torch.device(device):
        return (
            CLIPTextModel(_text_config(vocab, False, not tiny)).eval(),
            CLIPTextModelWithProjection(_text_config(vocab, True, not tiny)).eval(),
        )


class PromptEncoder:
    """What ``TextEncoderCache`` computes (penultimate hidden states of both encoders, pooled from the
    second), on random-weight encoders; ``cache=False`` encodes on every call (the paper's way)."""

    def __init__(self, encoders, device: str, cache: bool):
        self.te1, self.te2 = encoders
        self.device, self.cache, self._memo = device, cache, {}
        self.calls = 0

    @torch.inference_mode()
    def __call__(self, prompt: str):
        if self.cache and prompt in self._memo:
            return self._memo[prompt]
        self.calls += 1
        ids = torch.zeros(1, 77, dtype=torch.long, device=self.device)
        h1 = self.te1(ids, output_hidden_states=True).hidden_states[-2]
        out2 = self.te2(ids, output_hidden_states=True)
        emb = TextEmbedding(
            torch.cat([h1, out2.hidden_states[-2]], dim=-1).float().cpu(), out2.text_embeds.float().cpu()
        )
        if self.cache:
            self._memo[prompt] = emb
        return emb


def time_unet(unet, inputs, device: str, warmup: int, iters: int) -> list[float]:
    """Milliseconds per call (CUDA events on a GPU, wall clock on the CPU)."""
    with torch.inference_mode():
        for _ in range(warmup):
            unet(*inputs)
        sync(device)
        times = []
        for _ in range(iters):
            if device.startswith("cuda"):
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                unet(*inputs)
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end))
            else:
                t0 = time.perf_counter()
                unet(*inputs)
                times.append((time.perf_counter() - t0) * 1e3)
    return times


def whole_face(models, size: int, params, inversion_batch: int, device: str, repeats: int) -> dict:
    """Median of ``repeats`` timed one-face ``run_faces`` runs; also what the last run asked of the
    networks (UNet calls by batch, prompt encodes actually run), so the settings are checkable."""
    rng = np.random.default_rng(0)
    crop = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
    identity = rng.standard_normal((1, 512)).astype(np.float32)
    identity /= np.linalg.norm(identity)
    runs = []
    for _ in range(repeats):
        timings = Timings()
        if device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
        encodes_before = models.text.calls
        sync(device)
        with count_unet_calls(models) as unet:
            t0 = time.perf_counter()
            run_faces(models, [crop], identity, params, size, inversion_batch=inversion_batch, timings=timings)
            sync(device)
            seconds = time.perf_counter() - t0
        runs.append(
            {
                "s": seconds,
                "stages_ms": timings.as_ms(),
                "unet": unet.as_dict(),
                "prompt_encodes": models.text.calls - encodes_before,
                "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 3) if device.startswith("cuda") else None,
            }
        )
    best = sorted(runs, key=lambda r: r["s"])[len(runs) // 2]
    return {
        "s": round(statistics.median(r["s"] for r in runs), 4),
        "stages_ms": best["stages_ms"],
        "peak_memory_gib": best["peak_gib"],
        "repeats": repeats,
        "inversion_batch": inversion_batch,
        "prompt_cache": models.text.cache,
        "unet": runs[-1]["unet"],
        "prompt_encodes": runs[-1]["prompt_encodes"],
    }


def unet_steps(unet, unet_cfg: dict, latent: int, args, unet_dtype) -> dict:
    """Per-call UNet latency at batch 2 (one CFG step) and at the inversion's batch."""
    dev, cuda, steps = args.device, args.device.startswith("cuda"), {}
    for label, batch in (("batch2", 2), (f"batch{2 * args.inversion_batch}", 2 * args.inversion_batch)):
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        times = time_unet(unet, unet_inputs(unet_cfg, batch, latent, dev, unet_dtype), dev, args.warmup, args.iters)
        s = latency_stats(times)  # n, p50, p95, max, mean (ms), as the client reports latencies
        s["batch"] = batch
        s["per_sample_ms"] = round(s["p50"] / batch, 3)
        s["peak_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 3) if cuda else None
        steps[label] = s
        print(f"  UNet {label}: p50 {s['p50']:.2f} ms ({s['per_sample_ms']:.2f} ms/sample)", flush=True)
    return steps


def main(argv=None) -> dict:
    args = parse(argv)
    require_device(args.device)
    quiet()
    name = args.name or ("gpu_fullsize_tiny" if args.tiny else "gpu_fullsize")
    dev = args.device
    cuda = dev.startswith("cuda")
    unet_dtype = torch.float16 if cuda else torch.float32
    arch = architecture(full_size=not args.tiny)  # what a smoke bundle of that size holds
    unet_cfg, vae_cfg, size = arch["unet"], arch["vae"], arch["native_size"]
    latent = size // 8
    if cuda:
        torch.cuda.set_device(torch.device(dev))  # synchronize, events and memory statistics follow it
        torch.backends.cuda.matmul.allow_tf32 = True  # the fp32 VAE on tensor cores, as diffusers users run it
        torch.backends.cudnn.allow_tf32 = True

    result = stamp(
        name,
        module="benchmarks.gpu_fullsize",
        params={
            "device": dev,
            "tiny": args.tiny,
            "size": size,
            "unet_dtype": str(unet_dtype),
            "vae_dtype": "torch.float32",
            "steps": args.steps,
            "skip": args.skip,
            "fast_steps": args.fast_steps,
            "fast_skip": args.fast_skip,
            "inversion_batch": args.inversion_batch,
            "warmup": args.warmup,
            "iters": args.iters,
            "face_repeats": args.face_repeats,
            "compile": args.compile,
        },
    )
    result["title"] = "Full-size SDXL + FaceID with random weights" + (" (tiny dry run)" if args.tiny else "")
    result["tiny"] = args.tiny
    print(
        f"gpu_fullsize: building {'tiny' if args.tiny else 'SDXL'} UNet ({unet_dtype}) and VAE (fp32) on {dev}",
        flush=True,
    )
    t0 = time.perf_counter()
    torch.manual_seed(0)
    unet = faceid_unet(unet_cfg, dev, unet_dtype)
    autoencoder = vae(vae_cfg, dev, torch.float32)
    encoders = text_encoders(args.tiny, dev)
    sync(dev)
    result["build_s"] = round(time.perf_counter() - t0, 3)
    result["unet_params"] = sum(p.numel() for p in unet.parameters())
    if cuda:
        result["weights_memory_gib"] = round(torch.cuda.memory_allocated() / 2**30, 3)

    result["unet_step_ms"] = unet_steps(unet, unet_cfg, latent, args, unet_dtype)

    # ---- whole face
    schedule = NoiseSchedule.scaled_linear()
    run_unet = torch.compile(unet) if args.compile else unet
    ours = TorchModels(
        run_unet,
        VaeEncoder(autoencoder),
        VaeDecoder(autoencoder),
        PromptEncoder(encoders, dev, cache=True),
        schedule,
        dev,
        unet_dtype,
    )
    paper = TorchModels(
        unet,
        VaeEncoder(autoencoder),
        VaeDecoder(autoencoder),
        PromptEncoder(encoders, dev, cache=False),
        schedule,
        dev,
        unet_dtype,
    )
    presets = {
        "defaults": Params(steps=args.steps, skip=args.skip),
        "fast": Params(steps=args.fast_steps, skip=args.fast_skip),
    }
    # warm-up, uncounted: one run of each preset, so every UNet batch shape of the timed runs (the
    # full inversion batches, the last partial one, the generation pair) has been seen before (with
    # --compile: compiled); first call allocations; the prompt cache filled
    warm_batches = set()
    for params in presets.values():
        warm_batches |= set(whole_face(ours, size, params, args.inversion_batch, dev, 1)["unet"]["by_batch"])
    result["warmup_unet_batches"] = sorted(warm_batches, key=int)
    faces = {}
    for preset, params in presets.items():
        row = {"steps": params.steps, "skip": params.skip}
        r = whole_face(ours, size, params, args.inversion_batch, dev, args.face_repeats)
        row.update(
            {
                "ours_s": r["s"],
                "ours_stages_ms": r["stages_ms"],
                "ours_peak_memory_gib": r["peak_memory_gib"],
                "ours_settings": {k: r[k] for k in ("inversion_batch", "prompt_cache", "unet", "prompt_encodes")},
            }
        )
        if not args.no_paper:
            p = whole_face(paper, size, params, 1, dev, args.face_repeats)
            row.update(
                {
                    "paper_s": p["s"],
                    "paper_stages_ms": p["stages_ms"],
                    "paper_peak_memory_gib": p["peak_memory_gib"],
                    "paper_settings": {k: p[k] for k in ("inversion_batch", "prompt_cache", "unet", "prompt_encodes")},
                    "paper_over_ours": round(p["s"] / r["s"], 4),
                }
            )
        faces[preset] = row
        print(
            f"  face {preset} ({params.steps} steps): ours {row['ours_s']:.2f} s"
            + (f", paper way {row['paper_s']:.2f} s ({row['paper_over_ours']:.2f}x)" if "paper_s" in row else ""),
            flush=True,
        )
    result["whole_face"] = faces
    result["descriptions"] = {
        "ours": f"run_faces with inversion batched {args.inversion_batch} timesteps per UNet call, prompt cache"
        + (", torch.compile" if args.compile else ""),
        "paper": "run_faces with one UNet call per inversion step and both text encoders run on every use; "
        "excludes the paper's per-image reload of the pipeline from disk (lower bound)",
        "fast_preset": "same skip and solver, half the steps; quality not validated here (random weights)",
    }
    targets = {}
    d = faces["defaults"]
    if "paper_s" in d:
        targets["face_defaults_vs_paper"] = target(
            "per face at the defaults at least 2x faster than the paper's way on the same device",
            d["paper_over_ours"],
            2.0,
        )
    if cuda and not args.tiny:
        key, peak = gpu_peak(torch.cuda.get_device_name(torch.cuda.current_device()))
        if key:
            fl = model_flops(False, size)
            at_peak = face_time_at_peak(fl, pipeline_counts(args.steps, args.skip, args.inversion_batch), peak)
            step_at_peak_ms = fl["unet_batch2_flops"] / (peak["fp16"] * 1e12) * 1e3
            result["fraction_of_peak"] = {
                "gpu_row": key,
                "steps": args.steps,
                "skip": args.skip,
                "size": size,
                "face_time_at_peak_s": at_peak["total_s"],
                "measured_face_defaults_s": d["ours_s"],
                "face_defaults": round(at_peak["total_s"] / d["ours_s"], 4),
                "unet_step_batch2_at_peak_ms": round(step_at_peak_ms, 4),
                "measured_unet_step_batch2_ms": result["unet_step_ms"]["batch2"]["p50"],
                "unet_step_batch2": round(step_at_peak_ms / result["unet_step_ms"]["batch2"]["p50"], 4),
            }
        else:
            result["fraction_of_peak"] = None
    result["targets"] = targets
    write_results(name, result, _markdown(result), _plot, args.out)
    print(f"wrote {args.out}/{name}.json, .md, .png")
    return result


def _markdown(r: dict) -> str:
    st = r["unet_step_ms"]
    lines = [
        (
            "**Dry run on the smoke architecture (not full size): it checks the benchmark's logic; "
            "its numbers say nothing about SDXL speed.**\n"
        )
        if r["tiny"]
        else "",
        f"UNet parameters {r['unet_params'] / 1e9:.3f} B; built in {r['build_s']:.1f} s"
        + (f"; weights on the GPU {r['weights_memory_gib']} GiB" if r.get("weights_memory_gib") else "")
        + ".",
        "",
        md_table(
            ["UNet call", "p50 ms", "p95 ms", "ms per sample", "peak GiB"],
            [[k, v["p50"], v["p95"], v["per_sample_ms"], v["peak_memory_gib"]] for k, v in st.items()],
        ),
        "",
        md_table(
            ["preset", "steps", "ours s", "paper way s", "paper/ours", "peak GiB (ours)"],
            [
                [k, v["steps"], v["ours_s"], v.get("paper_s"), v.get("paper_over_ours"), v.get("ours_peak_memory_gib")]
                for k, v in r["whole_face"].items()
            ],
        ),
        "",
    ]
    lines += [f"- {k}: {v}" for k, v in r["descriptions"].items()]
    counted = [
        [
            k,
            way,
            v[f"{way}_settings"]["unet"]["calls"],
            v[f"{way}_settings"]["unet"]["samples"],
            v[f"{way}_settings"]["prompt_encodes"],
        ]
        for k, v in r["whole_face"].items()
        for way in ("ours", "paper")
        if f"{way}_settings" in v
    ]
    lines += [
        "",
        "Counted in the last timed run of each (UNet calls, sample evaluations, prompt encodes run):",
        "",
        md_table(["preset", "way", "UNet calls", "UNet samples", "prompt encodes"], counted),
    ]
    if r.get("fraction_of_peak"):
        f = r["fraction_of_peak"]
        lines += [
            "",
            f"Fraction of peak ({f['gpu_row']} datasheet): whole face at the defaults {f['face_defaults']:.1%}, "
            f"UNet step at batch 2 {f['unet_step_batch2']:.1%} (see flops.md).",
        ]
    if r["targets"]:
        lines += [
            "",
            md_table(
                ["target", "measured", "threshold", "pass"],
                [[t["target"], t["measured"], t["threshold"], t["pass"]] for t in r["targets"].values()],
            ),
        ]
    return "\n".join(lines)


def _plot(r: dict):
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    st = r["unet_step_ms"]
    bars = axes[0].bar(list(st), [v["per_sample_ms"] for v in st.values()], color="#4c72b0")
    axes[0].bar_label(bars, fmt="%.2f")
    axes[0].set_ylabel("ms per sample (p50 / batch)")
    axes[0].set_title("UNet per-step cost")
    faces = r["whole_face"]
    xs = np.arange(len(faces))
    axes[1].bar(xs - 0.2, [v["ours_s"] for v in faces.values()], 0.4, label="ours", color="#4c72b0")
    if all("paper_s" in v for v in faces.values()):
        axes[1].bar(xs + 0.2, [v["paper_s"] for v in faces.values()], 0.4, label="paper's way", color="#b0b0b0")
    axes[1].set_xticks(xs, [f"{k} ({v['steps']} steps)" for k, v in faces.items()])
    axes[1].set_ylabel("seconds per face")
    axes[1].set_title("Whole face" + (" — tiny dry run" if r["tiny"] else ""))
    axes[1].legend()
    return fig


if __name__ == "__main__":
    main()
