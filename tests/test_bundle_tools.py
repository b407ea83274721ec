"""`revpers bundle init` / `bundle check` as a user runs them, and the bundle check in front of anonymize:
a bundle built from a Hugging Face cache (fp16 variant files, links into blobs/) loads and anonymizes a
real photo, and each damaged file gives exit 2 and one line naming it, with no traceback."""

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save

from revpers.cli import main
from revpers.service.bundle_tools import FACES_KEYS, MANIFEST_KEYS, SDXL_CACHE_REPO, VERIFY_KEYS, check_bundle
from tests.conftest import real_photo

ROOT = Path(__file__).resolve().parent.parent
COMMIT = "462165984030d82259a11f4367a4eed129e94a7b"  # any 40-hex snapshot name
HTML = b"<!DOCTYPE html><html><body><h1>502 Bad Gateway</h1></body></html>\n" * 40  # a failed download


pytestmark = pytest.mark.slow  # end-to-end runs; left out of `make test-fast`


def revpers(*args):
    return subprocess.run(
        [sys.executable, "-m", "revpers.cli", *map(str, args)], capture_output=True, text=True, timeout=600, cwd=ROOT
    )


def hf_cache(sdxl: Path, hub: Path) -> Path:
    """The hub cache layout of stabilityai/stable-diffusion-xl-base-1.0 downloaded with variant="fp16",
    made from a smoke bundle's SDXL folder: every weight file converted to fp16 and named
    *.fp16.safetensors, file contents in blobs/<sha256>, snapshots/<commit>/... relative links to them,
    refs/main naming the commit, and an older snapshot whose download never finished."""
    repo = hub / SDXL_CACHE_REPO
    blobs, snap = repo / "blobs", repo / "snapshots" / COMMIT
    blobs.mkdir(parents=True)
    for f in sorted(p for p in sdxl.rglob("*") if p.is_file()):
        rel, data = f.relative_to(sdxl), f.read_bytes()
        if f.suffix == ".safetensors":
            data = save({k: v.half() for k, v in load_file(f).items()})
            rel = rel.with_name(f"{f.stem}.fp16.safetensors")
        blob = blobs / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        (snap / rel).parent.mkdir(parents=True, exist_ok=True)
        (snap / rel).symlink_to(os.path.relpath(blob, (snap / rel).parent))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    old = repo / "snapshots" / ("0" * 40)
    old.mkdir()
    (old / "model_index.json").symlink_to(f"../../blobs/{'f' * 64}.incomplete")
    return repo


def adapter_cache(adapter: Path, hub: Path) -> Path:
    """ip-adapter-faceid_sdxl.bin as a snapshot link in an h94/IP-Adapter-FaceID cache folder."""
    repo = hub / "models--h94--IP-Adapter-FaceID"
    data = adapter.read_bytes()
    blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
    blob.parent.mkdir(parents=True)
    blob.write_bytes(data)
    link = repo / "snapshots" / COMMIT / adapter.name
    link.parent.mkdir(parents=True)
    link.symlink_to(os.path.relpath(blob, link.parent))
    return link


def test_bundle_init_from_hf_cache_fp16_then_check_passes_and_anonymize_works(tmp_path, smoke_bundle_dir):
    hub = tmp_path / "hub"
    repo = hf_cache(smoke_bundle_dir / "sdxl", hub)
    adapter = adapter_cache(smoke_bundle_dir / "ip_adapter" / "ip-adapter-faceid_sdxl.bin", hub)
    faces = tmp_path / "face_models"
    shutil.copytree(smoke_bundle_dir / "face_models", faces)
    out = tmp_path / "bundle"
    proc = revpers("bundle", "init", out, "--sdxl", repo, "--ip-adapter", adapter, "--faces", faces, "--smoke")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"{out}: OK" in proc.stdout and "fp16" in proc.stdout

    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["sdxl_variant"] == "fp16" and manifest["smoke"] is True
    assert manifest["native_size"] == 64 and manifest["embedding_dim"] == 512  # read from the configs / adapter
    assert manifest["faces"] == {"detector": "dlib", "recognizer": "face_models/smoke_arcface.onnx"}
    assert manifest["sources"]["sdxl"] == str((repo / "snapshots" / COMMIT).resolve())  # refs/main's snapshot
    unet = out / "sdxl" / "unet" / "diffusion_pytorch_model.fp16.safetensors"
    assert unet.is_symlink() and Path(os.readlink(unet)).parent == (repo / "blobs").resolve()
    assert Path(os.readlink(out / "ip_adapter" / "ip-adapter-faceid_sdxl.bin")).parent.name == "blobs"

    proc = revpers("bundle", "check", out)
    assert proc.returncode == 0 and proc.stdout.startswith(f"{out}: OK"), proc.stdout + proc.stderr

    # the served components load the same files: the text encoders through the pipeline, the VAE on its own
    from revpers.models.bundle import load_bundle
    from revpers.serving.bls import TextEncoders
    from revpers.serving.components import TorchRunner

    assert load_bundle(out).sdxl_variant_of("vae") == "fp16"
    assert TextEncoders(load_bundle(out))("a photo").text.dtype == torch.float32
    assert TorchRunner(out, "vae_decoder").dtype == torch.float32

    photo = tmp_path / "face.png"
    Image.fromarray(real_photo()).save(photo)
    proc = revpers("anonymize", photo, "-o", tmp_path / "out", "--models", out, "--steps", 4)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads((tmp_path / "out" / "face.png.json").read_text())
    assert (tmp_path / "out" / "face.png").is_file() and report["faces_found"] == 1
    assert report["models"]["manifest_sha256"] == hashlib.sha256((out / "manifest.json").read_bytes()).hexdigest()
    assert report["smoke"] is True and "SMOKE WEIGHTS" in proc.stdout

    # the variant is what makes these files load: without it the check names the file and the fix
    del manifest["sdxl_variant"]
    (out / "manifest.json").write_text(json.dumps(manifest))
    proc = revpers("bundle", "check", out)
    assert proc.returncode == 2
    assert f"{out}/sdxl/unet/diffusion_pytorch_model.safetensors: missing" in proc.stdout
    assert 'set "sdxl_variant": "fp16"' in proc.stdout


def test_bundle_init_from_a_diffusers_folder_with_copies(tmp_path, smoke_bundle_dir, capsys):
    out = tmp_path / "copied"
    rc = main(
        [
            "bundle",
            "init",
            str(out),
            "--sdxl",
            str(smoke_bundle_dir / "sdxl"),
            "--ip-adapter",
            str(smoke_bundle_dir / "ip_adapter" / "ip-adapter-faceid_sdxl.bin"),
            "--faces",
            str(smoke_bundle_dir / "face_models"),
            "--copy",
            "--smoke",
        ]
    )
    assert rc == 0, capsys.readouterr()
    files = [p for p in out.rglob("*") if not p.is_dir()]
    assert files and not any(p.is_symlink() for p in files)
    assert "sdxl_variant" not in json.loads((out / "manifest.json").read_text())
    unet = "sdxl/unet/diffusion_pytorch_model.safetensors"
    assert (out / unet).read_bytes() == (smoke_bundle_dir / unet).read_bytes()
    assert not list(tmp_path.glob(".copied.init-*"))  # built aside and renamed into place

    args = [
        "bundle",
        "init",
        str(out),
        "--sdxl",
        str(smoke_bundle_dir / "sdxl"),
        "--ip-adapter",
        str(smoke_bundle_dir / "ip_adapter" / "ip-adapter-faceid_sdxl.bin"),
        "--faces",
        str(smoke_bundle_dir / "face_models"),
    ]
    capsys.readouterr()
    assert main(args) == 2 and "exists and is not empty (use --force" in capsys.readouterr().err
    assert main(args + ["--force"]) == 0 and (out / unet).is_symlink()
    capsys.readouterr()
    src = tmp_path / "downloads"
    shutil.copytree(smoke_bundle_dir, src)
    holder = [
        "bundle",
        "init",
        str(src),
        "--force",
        "--sdxl",
        str(src / "sdxl"),
        "--ip-adapter",
        str(src / "ip_adapter" / "ip-adapter-faceid_sdxl.bin"),
        "--faces",
        str(src / "face_models"),
    ]
    assert main(holder) == 2 and "it holds the source" in capsys.readouterr().err  # --force deletes nothing
    assert (src / unet).read_bytes() == (smoke_bundle_dir / unet).read_bytes()


def test_bundle_check_of_a_good_smoke_bundle_exits_0(smoke_bundle_dir):
    proc = revpers("bundle", "check", smoke_bundle_dir)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.startswith(f"{smoke_bundle_dir}: OK") and "SMOKE WEIGHTS" in proc.stdout
    assert "LoRA rank 4" in proc.stdout and proc.stderr == ""


def _damaged(smoke: Path, tmp_path: Path) -> Path:
    bundle = tmp_path / "damaged"
    shutil.copytree(smoke, bundle)
    return bundle


def _strip_lora(path: Path) -> None:
    state = torch.load(path, weights_only=True)
    state["ip_adapter"] = {k: v for k, v in state["ip_adapter"].items() if "_lora." not in k}
    torch.save(state, path)


DAMAGE = {  # case -> (file, damage, words of the problem)
    "missing UNet weights": ("sdxl/unet/diffusion_pytorch_model.safetensors", Path.unlink, "missing (unet weights)"),
    "garbage adapter": (
        "ip_adapter/ip-adapter-faceid_sdxl.bin",
        lambda p: p.write_bytes(HTML),
        "not a PyTorch weights file",
    ),
    "garbage ArcFace": ("face_models/smoke_arcface.onnx", lambda p: p.write_bytes(HTML), "not an ONNX model"),
    "adapter without FaceID LoRA": ("ip_adapter/ip-adapter-faceid_sdxl.bin", _strip_lora, "no FaceID LoRA weights"),
}


@pytest.mark.parametrize("case", list(DAMAGE))
def test_damaged_bundle_file_gives_exit_2_and_one_line_from_anonymize(case, tmp_path, smoke_bundle_dir):
    rel, damage, words = DAMAGE[case]
    bundle = _damaged(smoke_bundle_dir, tmp_path)
    damage(bundle / rel)
    photo = tmp_path / "face.png"
    Image.fromarray(real_photo()).save(photo)
    proc = revpers("anonymize", photo, "-o", tmp_path / "out", "--models", bundle, "--steps", 2)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {bundle / rel}: ") and words in lines[0], proc.stderr
    assert not (tmp_path / "out").exists()  # refused before any work
    assert check_bundle(bundle) == [lines[0][len("error: ") :]]  # `bundle check` says the same


def _fp16_without_variant(bundle: Path) -> None:
    unet = bundle / "sdxl/unet/diffusion_pytorch_model.safetensors"
    unet.rename(unet.with_name("diffusion_pytorch_model.fp16.safetensors"))


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _manifest(bundle: Path, **faces) -> None:
    m = json.loads((bundle / "manifest.json").read_text())
    m["faces"].update(faces)
    (bundle / "manifest.json").write_text(json.dumps(m))


def _swap_text_encoders(bundle: Path) -> None:
    shutil.copyfile(bundle / "sdxl/text_encoder/model.safetensors", bundle / "sdxl/text_encoder_2/model.safetensors")


def _wrong_kv_shape(bundle: Path) -> None:
    path = bundle / "ip_adapter/ip-adapter-faceid_sdxl.bin"
    state = torch.load(path, weights_only=True)
    state["ip_adapter"]["1.to_k_ip.weight"] = torch.zeros(3, 3)
    torch.save(state, path)


@pytest.mark.parametrize(
    "damage,expected",
    [
        (
            _fp16_without_variant,
            [
                r"sdxl/unet/diffusion_pytorch_model\.safetensors: missing \(unet weights\); the folder "
                r"has diffusion_pytorch_model\.fp16\.safetensors: set \"sdxl_variant\": \"fp16\""
            ],
        ),
        (
            lambda b: _truncate(b / "sdxl/vae/diffusion_pytorch_model.safetensors"),
            [
                r"sdxl/vae/diffusion_pytorch_model\.safetensors: truncated: "
                r"its header describes \d+ bytes of tensor data, "
                r"the file holds \d+"
            ],
        ),
        (
            _swap_text_encoders,
            [
                r"sdxl/text_encoder_2/model\.safetensors: \d+ of the \d+ tensors "
                r"CLIPTextModelWithProjection needs are missing"
            ],
        ),
        (
            _wrong_kv_shape,
            [
                r"ip-adapter-faceid_sdxl\.bin: does not fit the UNet .* ip_adapter\.1\.to_k_ip\.weight: "
                r"file \[3, 3\] vs UNet \[64, 64\]"
            ],
        ),
        (
            lambda b: _manifest(b, upsampel=2, det_thresh=0.5),
            [
                r"manifest\.json: faces\.upsampel: unknown key \(did you mean 'upsample'\?\)",
                r"manifest\.json: faces\.det_thresh: only used by the insightface detector",
            ],
        ),
        (
            lambda b: _manifest(b, detector="insightface", pack="face_models/buffalo_l", det_size=600),
            [
                r"manifest\.json: faces\.det_size: must be a positive multiple of 32",
                r"face_models/buffalo_l: missing \(the insightface model pack folder\)",
            ],
        ),
    ],
)
def test_bundle_check_names_each_problem_once(damage, expected, tmp_path, smoke_bundle_dir):
    bundle = _damaged(smoke_bundle_dir, tmp_path)
    damage(bundle)
    problems = check_bundle(bundle)
    assert len(problems) == len(expected), problems
    for line, pattern in zip(problems, expected, strict=True):
        assert line.startswith(str(bundle) + "/") and re.search(pattern, line), (line, pattern)


def test_every_manifest_key_is_documented():
    doc = (ROOT / "docs" / "real-weights.md").read_text()
    for section, keys in (("", MANIFEST_KEYS), ("faces.", FACES_KEYS), ("verify.", VERIFY_KEYS)):
        for key in keys:
            assert f"`{section}{key.name}`" in doc, f"{section}{key.name} is not in docs/real-weights.md"


def test_export_repository_and_serve_check_the_bundle_first(tmp_path, smoke_bundle_dir):
    from revpers.serving.triton_config import bls_config

    bundle = _damaged(smoke_bundle_dir, tmp_path)
    (bundle / "face_models/smoke_arcface.onnx").write_bytes(HTML)
    line = f"error: {bundle}/face_models/smoke_arcface.onnx: not an ONNX model"
    repo = tmp_path / "repo"  # a repository whose BLS model would load the damaged bundle
    (repo / "revpers").mkdir(parents=True)
    (repo / "revpers" / "config.pbtxt").write_text(bls_config(str(bundle), 1, 10))
    for args in (
        ("export", "--models", bundle, "--out", tmp_path / "artifacts"),
        ("repository", "--models", bundle, "--backend", "pytorch", "--out", tmp_path / "repo2"),
        ("serve", "--repository", repo),
    ):
        proc = revpers(*args)
        assert proc.returncode == 2, (args, proc.stdout + proc.stderr)
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(line), proc.stderr
    assert not (tmp_path / "artifacts").exists() and not (tmp_path / "repo2").exists()


def _scrfd_like(path: Path, outputs: int) -> None:
    """A graph with SCRFD's interface (one (1, 3, H, W) image in; scores, boxes [and keypoints] per
    stride out), to exercise the detector check; it detects nothing."""
    import onnx
    from onnx import TensorProto, helper

    names = [f"out{i}" for i in range(outputs)]
    graph = helper.make_graph(
        [helper.make_node("Identity", ["input.1"], [n]) for n in names],
        "scrfd",
        [helper.make_tensor_value_info("input.1", TensorProto.FLOAT, [1, 3, "H", "W"])],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in names],
    )
    onnx.save(helper.make_model(graph), path)


def test_bundle_init_from_an_insightface_pack_and_the_detector_check(tmp_path, smoke_bundle_dir, capsys):
    pack = tmp_path / "buffalo_l"
    pack.mkdir()
    shutil.copyfile(smoke_bundle_dir / "face_models/smoke_arcface.onnx", pack / "w600k_r50.onnx")
    shutil.copyfile(smoke_bundle_dir / "face_models/smoke_arcface.onnx", pack / "genderage.onnx")  # not taken
    _scrfd_like(pack / "det_10g.onnx", 9)
    out = tmp_path / "bundle"
    rc = main(
        [
            "bundle",
            "init",
            str(out),
            "--sdxl",
            str(smoke_bundle_dir / "sdxl"),
            "--ip-adapter",
            str(smoke_bundle_dir / "ip_adapter/ip-adapter-faceid_sdxl.bin"),
            "--faces",
            str(pack),
            "--smoke",
        ]
    )
    assert rc == 0, capsys.readouterr()
    assert json.loads((out / "manifest.json").read_text())["faces"] == {
        "detector": "insightface",
        "pack": "face_models/buffalo_l",
        "recognizer": "face_models/buffalo_l/w600k_r50.onnx",
    }
    assert sorted(p.name for p in (out / "face_models/buffalo_l").iterdir()) == ["det_10g.onnx", "w600k_r50.onnx"]
    (out / "face_models/buffalo_l/det_10g.onnx").unlink()
    _scrfd_like(out / "face_models/buffalo_l/det_10g.onnx", 6)
    assert check_bundle(out) == [
        f"{out}/face_models/buffalo_l/det_10g.onnx: an SCRFD detector without 5-point "
        "keypoints: alignment needs them (use buffalo_l's det_10g.onnx)"
    ]
