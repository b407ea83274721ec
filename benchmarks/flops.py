"""Issue 6 item 5: the physical limit. FLOPs of one full-size UNet evaluation and of a whole face at
the defaults, the time that takes at a GPU's peak, and our measured fraction of it.

    python -m benchmarks.flops [--steps 100 --skip 0.7] [--tiny]

The SDXL-architecture UNet (with the FaceID adapter) and VAE are built on the ``meta`` device (no
weights, no memory) and run under ``torch.utils.flop_counter.FlopCounterMode`` (2 FLOPs per
multiply-add; matmuls, convolutions and attention are counted, elementwise ops are not). The number
of UNet sample evaluations per face is not assumed: ``revpers.pipeline.run_faces`` is run with
counting stand-in components at the given steps/skip. Peak figures: NVIDIA datasheets (dense
tensor-core throughput, no sparsity). Time at peak is ``face_time_at_peak``, the one definition
``gpu_fullsize`` uses too; the measured fraction is the one benchmarks/results/gpu_fullsize.json
recorded, taken only when that GPU run used the same steps, skip and size (else null, with the reason).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from benchmarks.common import RESULTS, md_table, quiet, stamp, write_results
from benchmarks.fullsize import faceid_unet, tiny_configs, unet_inputs, vae
from revpers.core.conditioning import TextEmbedding
from revpers.core.params import Params
from revpers.core.pipeline import run_faces
from revpers.core.schedule import NoiseSchedule
from revpers.models.architecture import SDXL_UNET_CONFIG, SDXL_VAE_CONFIG

# Dense (no sparsity) tensor-core peaks, TFLOP/s, from NVIDIA's datasheets: A100 80GB SXM
# (FP16/BF16 312, TF32 156), H100 SXM (FP16/BF16 989.4, TF32 494.7), H200 SXM (989.4 / 494.7, same
# GH100 compute as H100 SXM), H100 PCIe (756 / 378).
PEAKS = {
    "A100 SXM": {"fp16": 312.0, "tf32": 156.0, "match": ["A100"]},
    "H100 SXM": {"fp16": 989.4, "tf32": 494.7, "match": ["H100 80GB HBM3", "H100 SXM"]},
    "H100 PCIe": {"fp16": 756.0, "tf32": 378.0, "match": ["H100 PCIe"]},
    "H200": {"fp16": 989.4, "tf32": 494.7, "match": ["H200"]},
}
PEAK_SOURCE = (
    "NVIDIA datasheets: A100 Tensor Core GPU (FP16/BF16 312, TF32 156 TFLOP/s dense), "
    "H100 Tensor Core GPU (SXM 989.4 / 494.7, PCIe 756 / 378), H200 Tensor Core GPU (989.4 / 494.7); "
    "the datasheets quote twice these numbers 'with sparsity'."
)


def parse(argv=None):
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.flops", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--skip", type=float, default=0.7)
    p.add_argument("--size", type=int, default=1024, help="face crop size in px (latents size/8)")
    p.add_argument("--tiny", action="store_true", help="the smoke bundle's architecture instead of SDXL (dry mode)")
    p.add_argument("--gpu-results", type=Path, default=RESULTS / "gpu_fullsize.json")
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--name", default="flops")
    return p.parse_args(argv)


def count_flops(fn, *args) -> tuple[int, dict]:
    """Total FLOPs of ``fn(*args)`` and the per-operator totals."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter, torch.no_grad():
        fn(*args)
    per_op = {str(k): int(v) for k, v in counter.get_flop_counts().get("Global", {}).items()}
    return int(counter.get_total_flops()), per_op


class CountingComponents:
    """Stand-in ``pipeline.Components`` that counts what ``run_faces`` asks of the networks."""

    def __init__(self, latent_channels: int = 4):

        self.schedule = NoiseSchedule.scaled_linear()
        self.latent_channels = latent_channels
        self._text = TextEmbedding(torch.zeros(1, 77, 8), torch.zeros(1, 8))
        self.unet_calls, self.unet_samples, self.encoded, self.decoded = 0, 0, 0, 0

    def denoise(self, x, t, cond):
        self.unet_calls += 1
        self.unet_samples += x.shape[0]
        return torch.zeros_like(x)

    def encode(self, images):
        self.encoded += images.shape[0]
        return torch.zeros(images.shape[0], self.latent_channels, images.shape[2] // 8, images.shape[3] // 8)

    def decode(self, latents):
        self.decoded += latents.shape[0]
        return torch.zeros(latents.shape[0], 3, latents.shape[2] * 8, latents.shape[3] * 8)

    def text(self, prompt):
        return self._text


def pipeline_counts(steps: int, skip: float, inversion_batch: int = 10) -> dict:
    """UNet calls and sample evaluations ``run_faces`` makes for one face (64 px crop: the count
    does not depend on the size)."""
    import numpy as np

    comps = CountingComponents()
    run_faces(
        comps,
        [np.zeros((64, 64, 3), np.uint8)],
        np.zeros((1, 512), np.float32),
        Params(steps=steps, skip=skip),
        64,
        inversion_batch=inversion_batch,
    )
    return {
        "unet_calls": comps.unet_calls,
        "unet_sample_evaluations": comps.unet_samples,
        "vae_encodes": comps.encoded,
        "vae_decodes": comps.decoded,
        "inversion_batch": inversion_batch,
    }


def model_flops(tiny: bool, size: int) -> dict:
    unet_cfg, vae_cfg = (tiny_configs()[:2]) if tiny else (SDXL_UNET_CONFIG, SDXL_VAE_CONFIG)
    latent = size // 8
    unet = faceid_unet(unet_cfg, "meta", torch.float16)
    unet_b2, unet_ops = count_flops(unet, *unet_inputs(unet_cfg, 2, latent, "meta", torch.float16))
    unet_b1, _ = count_flops(unet, *unet_inputs(unet_cfg, 1, latent, "meta", torch.float16))
    params = sum(p.numel() for p in unet.parameters())
    del unet
    model = vae(vae_cfg, "meta", torch.float32)
    enc, _ = count_flops(lambda x: model.encode(x).latent_dist.mode(), torch.randn(1, 3, size, size, device="meta"))
    dec, _ = count_flops(
        lambda z: model.decode(z, return_dict=False)[0], torch.randn(1, 4, latent, latent, device="meta")
    )
    return {
        "unet_batch2_flops": unet_b2,
        "unet_batch1_flops": unet_b1,
        "unet_params": params,
        "unet_batch2_by_op": dict(sorted(unet_ops.items(), key=lambda kv: -kv[1])),
        "vae_encode_flops": enc,
        "vae_decode_flops": dec,
        "latent": latent,
        "size": size,
    }


def face_flops(fl: dict, counts: dict) -> dict:
    """FLOPs of one face: every UNet sample evaluation (``unet_batch2_flops`` covers a CFG pair, so
    half of it per sample) plus the VAE encodes and decodes ``run_faces`` made."""
    unet = fl["unet_batch2_flops"] / 2 * counts["unet_sample_evaluations"]
    vae = fl["vae_encode_flops"] * counts["vae_encodes"] + fl["vae_decode_flops"] * counts["vae_decodes"]
    return {"unet": unet, "vae": vae, "total": unet + vae}


def face_time_at_peak(fl: dict, counts: dict, peak: dict) -> dict:
    """Seconds one face takes at a GPU's datasheet peak: the UNet at the fp16 tensor peak, the VAE
    (fp32, as SDXL needs) at the TF32 peak. The one definition ``flops`` and ``gpu_fullsize`` use."""
    f = face_flops(fl, counts)
    unet_s = f["unet"] / (peak["fp16"] * 1e12)
    vae_s = f["vae"] / (peak["tf32"] * 1e12)
    return {"unet_s": unet_s, "vae_s": vae_s, "total_s": unet_s + vae_s}


def gpu_peak(name: str | None) -> tuple[str, dict] | tuple[None, None]:
    if not name:
        return None, None
    for key, peak in PEAKS.items():
        if any(m.lower() in name.lower() for m in peak["match"]):
            return key, peak
    return None, None


def measured_fraction(path: Path, args) -> dict:
    """Our fraction of peak as ``gpu_fullsize`` computed it (with ``face_time_at_peak``), taken only
    when that run used this run's steps, skip and size; null otherwise, with the reason."""
    out = {
        "source": str(path),
        "available": False,
        "fraction_of_peak": None,
        "note": "no GPU measurement in results (benchmarks/gpu_fullsize.py has not run on a GPU): fractions are null",
    }
    if args.tiny or not path.is_file():
        return out
    gpu = json.loads(path.read_text())
    name = ((gpu.get("machine") or {}).get("gpu") or {}).get("name")
    frac = gpu.get("fraction_of_peak")
    if gpu.get("tiny") or not name:
        out["note"] = f"{path.name} is a dry (--tiny / CPU) run, not a GPU measurement: fractions are null"
        return out
    if not frac:
        out["note"] = f"GPU {name!r} has no peak figure in the table gpu_fullsize used: fractions are null"
        return out
    mine = {"steps": args.steps, "skip": args.skip, "size": args.size}
    theirs = {k: frac.get(k) for k in mine}
    if theirs != mine:
        out["note"] = (
            f"{path.name} was measured at {theirs}, this run counts {mine}: fractions are null "
            "(run both at the same settings)"
        )
        return out
    return {
        "source": str(path),
        "available": True,
        "gpu": name,
        "peak_row": frac["gpu_row"],
        "measured_unet_step_batch2_ms": frac["measured_unet_step_batch2_ms"],
        "unet_step_fraction_of_peak": frac["unet_step_batch2"],
        "measured_face_defaults_s": frac["measured_face_defaults_s"],
        "fraction_of_peak": frac["face_defaults"],
        "note": "fraction = time at peak / measured time, as computed by gpu_fullsize (same steps, skip, size)",
    }


def main(argv=None) -> dict:
    args = parse(argv)
    quiet()
    counts = pipeline_counts(args.steps, args.skip)
    fl = model_flops(args.tiny, args.size)
    ff = face_flops(fl, counts)
    face_unet, face_vae, face_total = ff["unet"], ff["vae"], ff["total"]
    limits = {}
    for key, peak in PEAKS.items():
        t = face_time_at_peak(fl, counts, peak)
        limits[key] = {
            "fp16_tflops": peak["fp16"],
            "tf32_tflops": peak["tf32"],
            "unet_step_batch2_ms": round(fl["unet_batch2_flops"] / (peak["fp16"] * 1e12) * 1e3, 4),
            "face_unet_s": round(t["unet_s"], 4),
            "face_vae_s": round(t["vae_s"], 4),
            "face_total_s": round(t["total_s"], 4),
        }
    measured = measured_fraction(args.gpu_results, args)

    result = stamp(
        args.name,
        {
            "steps": args.steps,
            "skip": args.skip,
            "size": args.size,
            "tiny": args.tiny,
            "unet_dtype": "fp16 (counted at the fp16 tensor peak)",
            "vae_dtype": "fp32 (counted at the TF32 tensor peak)",
        },
    )
    result["title"] = "FLOPs and the physical limit" + (" (tiny dry run)" if args.tiny else "")
    result.update(
        {
            "counts": counts,
            "flops": fl,
            "face_flops": {"unet": face_unet, "vae": face_vae, "total": face_total},
            "time_at_peak": limits,
            "peak_source": PEAK_SOURCE,
            "measured": measured,
            "not_counted": "text encoders (cached per prompt), ArcFace (a few GFLOP), face detection, "
            "elementwise ops (norms, activations, solver arithmetic)",
        }
    )
    md = [
        f"UNet evaluations per face at steps={args.steps}, skip={args.skip} (counted by running run_faces): "
        f"{counts['unet_calls']} UNet calls, {counts['unet_sample_evaluations']} sample evaluations; "
        f"{counts['vae_encodes']} VAE encode, {counts['vae_decodes']} VAE decode at {args.size}x{args.size}.",
        "",
        md_table(
            ["quantity", "TFLOP"],
            [
                [
                    f"UNet, one evaluation at batch 2 (CFG pair), latents {fl['latent']}x{fl['latent']}",
                    fl["unet_batch2_flops"] / 1e12,
                ],
                ["VAE encode 1 image", fl["vae_encode_flops"] / 1e12],
                ["VAE decode 1 image", fl["vae_decode_flops"] / 1e12],
                ["whole face: UNet", face_unet / 1e12],
                ["whole face: VAE", face_vae / 1e12],
                ["whole face: total", face_total / 1e12],
            ],
        ),
        "",
        f"UNet parameters: {fl['unet_params'] / 1e9:.3f} B (incl. FaceID projection and IP K/V).",
        "",
        "Time at peak (UNet at the fp16 tensor peak, VAE at the TF32 peak):",
        "",
        md_table(
            ["GPU", "fp16 TFLOP/s", "UNet step (batch 2) ms", "whole face s"],
            [[k, v["fp16_tflops"], v["unet_step_batch2_ms"], v["face_total_s"]] for k, v in limits.items()],
        ),
        "",
        f"Peaks: {PEAK_SOURCE}",
        "",
        "Measured fraction of peak: "
        + (
            f"{measured['fraction_of_peak']} per face, "
            f"{measured['unet_step_fraction_of_peak']} per UNet step on {measured['gpu']}"
            if measured["available"]
            else f"null — {measured['note']}."
        ),
        "",
        f"Not counted: {result['not_counted']}.",
    ]
    write_results(args.name, result, "\n".join(md), _plot, args.out)
    print(
        f"UNet batch 2: {fl['unet_batch2_flops'] / 1e12:.3f} TFLOP; face: {face_total / 1e12:.1f} TFLOP; "
        + ", ".join(f"{k} {v['face_total_s']:.2f} s" for k, v in limits.items())
    )
    return result


def _plot(r: dict):
    import matplotlib.pyplot as plt

    lim = r["time_at_peak"]
    fig, ax = plt.subplots(figsize=(7, 4))
    names = list(lim)
    bars = ax.bar(names, [lim[k]["face_total_s"] for k in names], color="#4c72b0", label="time at peak")
    ax.bar_label(bars, fmt="%.2f s")
    m = r["measured"]
    if m.get("available") and m.get("measured_face_defaults_s"):
        ax.axhline(m["measured_face_defaults_s"], color="#c44e52", ls="--", label=f"measured on {m['gpu']}")
    ax.axhline(13.0, color="#888888", ls=":", label="paper: ~13 s on A100")
    ax.set_ylabel("seconds per face at the defaults")
    ax.set_title(
        f"Whole face: {r['face_flops']['total'] / 1e12:.0f} TFLOP "
        f"({r['counts']['unet_sample_evaluations']} UNet sample evaluations)"
    )
    ax.legend(fontsize=8)
    return fig


if __name__ == "__main__":
    main()
