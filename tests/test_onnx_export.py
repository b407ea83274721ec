"""revpers.export.onnx_export: every exported component matches its PyTorch module (fp32), the batch axis is
dynamic, per-sample timestep / IP scale are runtime inputs, the ArcFace copy is renamed correctly,
and (where TensorRT imports) engines match the ONNX files."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import real_photo
from numerics import ProbeComponents

from revpers.core.errors import DependencyError
from revpers.export.onnx_export import parity
from revpers.models.artifacts import ARTIFACTS_MANIFEST, onnx_session
from revpers.models.components import NUMPY_DTYPES, ComponentSpec

FP32_TOL = 1e-4


pytestmark = pytest.mark.slow  # end-to-end runs; left out of `make test-fast`


@pytest.fixture(scope="module")
def exported(onnx_artifacts):
    return onnx_artifacts


@pytest.fixture(scope="module")
def fp32_models(smoke_bundle):
    from revpers.models.torch_models import TorchModels

    return TorchModels.load(smoke_bundle, device="cpu", unet_dtype=torch.float32)


def _spec(record: dict, name: str) -> ComponentSpec:
    return ComponentSpec.from_dict(record["components"][name]["spec"])


def _path(exported, name: str) -> Path:
    out, record = exported
    return out / record["components"][name]["onnx"]


def _unet_inputs(
    spec: ComponentSpec, batch: int, seed: int = 0, timesteps=None, ip_scale=None, identity=None
) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    inputs = {t.name: t.example(batch) for t in spec.inputs}
    inputs["timestep"] = torch.tensor(timesteps if timesteps is not None else [500] * batch, dtype=torch.int64)
    inputs["ip_scale"] = torch.tensor(ip_scale if ip_scale is not None else [1.0] * batch, dtype=torch.float32)
    inputs["time_ids"] = torch.tensor([[64.0, 64.0, 0.0, 0.0, 64.0, 64.0]] * batch)
    if identity is not None:
        inputs["identity"] = identity
    return inputs


def _run_onnx(path: Path, inputs: dict[str, torch.Tensor]) -> np.ndarray:
    return onnx_session(path).run(None, {k: v.numpy() for k, v in inputs.items()})[0]


def test_manifest_lists_all_components(exported):
    out, record = exported
    on_disk = json.loads((out / ARTIFACTS_MANIFEST).read_text())
    assert set(on_disk["components"]) == {"unet", "vae_encoder", "vae_decoder", "arcface"}
    for name, comp in on_disk["components"].items():
        assert (out / comp["onnx"]).is_file(), name


@pytest.mark.parametrize("batch", [1, 5])
def test_unet_matches_torch_with_per_sample_timestep_and_scale(exported, fp32_models, batch):
    spec = _spec(exported[1], "unet")
    ts = [299, 4, 150, 1, 999][:batch]
    scales = [0.0, 0.5, 1.0, 2.0, 1.5][:batch]
    torch.manual_seed(1)
    identity = torch.randn(batch, spec.inputs[5].shape[0]) * 3  # non-zero identity
    inputs = _unet_inputs(spec, batch, seed=batch, timesteps=ts, ip_scale=scales, identity=identity)
    err = parity(fp32_models.unet, spec, _path(exported, "unet"), inputs)
    print(f"unet batch={batch} onnx-vs-torch max abs {err:.3g}")
    assert err <= FP32_TOL
    # the per-sample values really are per sample: each row equals a batch-1 run of that row alone
    if batch > 1:
        full = _run_onnx(_path(exported, "unet"), inputs)
        for i in (0, batch - 1):
            row = _run_onnx(_path(exported, "unet"), {k: v[i : i + 1] for k, v in inputs.items()})
            assert np.abs(full[i : i + 1] - row).max() <= FP32_TOL


def test_unet_ip_scale_is_a_runtime_input(exported):
    spec = _spec(exported[1], "unet")
    path = _path(exported, "unet")
    dim = spec.inputs[5].shape[0]
    base = _unet_inputs(spec, 2, seed=7, timesteps=[300, 300], ip_scale=[0.0, 0.0], identity=torch.zeros(2, dim))
    other = dict(base, identity=torch.randn(2, dim, generator=torch.Generator().manual_seed(3)) * 5)
    a, b = _run_onnx(path, base), _run_onnx(path, other)
    print(f"ip_scale=0: identity changes output by {np.abs(a - b).max():.3g}")
    assert np.abs(a - b).max() <= 1e-6  # identity is irrelevant at scale 0
    scaled = [_run_onnx(path, dict(other, ip_scale=torch.tensor([s, s]))) for s in (0.5, 1.0, 2.0)]
    diffs = [np.abs(scaled[0] - a).max(), np.abs(scaled[1] - scaled[0]).max(), np.abs(scaled[2] - scaled[1]).max()]
    print("ip_scale changes output by", [f"{d:.3g}" for d in diffs])
    assert min(diffs) > 1e-4  # every scale gives a different output: not baked in at export time


@pytest.mark.parametrize("name", ["vae_encoder", "vae_decoder"])
@pytest.mark.parametrize("batch", [1, 3])
def test_vae_matches_torch(exported, fp32_models, name, batch):
    spec = _spec(exported[1], name)
    module = fp32_models.vae_encoder if name == "vae_encoder" else fp32_models.vae_decoder
    torch.manual_seed(batch)
    inputs = {t.name: t.example(batch) for t in spec.inputs}
    if name == "vae_encoder":
        inputs["image"] = inputs["image"].clamp(-1, 1)
    err = parity(module, spec, _path(exported, name), inputs)
    out = _run_onnx(_path(exported, name), inputs)
    assert out.shape == (batch, *spec.outputs[0].shape)
    print(f"{name} batch={batch} onnx-vs-torch max abs {err:.3g}")
    assert err <= FP32_TOL


def test_arcface_renamed_and_equivalent_to_recognizer(exported, smoke_bundle):
    spec = _spec(exported[1], "arcface")
    path = _path(exported, "arcface")
    sess = onnx_session(path)
    assert [i.name for i in sess.get_inputs()] == ["input.1"]
    assert [o.name for o in sess.get_outputs()] == ["embedding"]
    x = np.random.default_rng(0).standard_normal((3, 3, 112, 112)).astype(np.float32)
    got = sess.run(["embedding"], {"input.1": x})[0]
    assert got.shape == (3, smoke_bundle.embedding_dim) == (3, 512)
    assert spec.outputs[0].shape == (512,)
    original = onnx_session(smoke_bundle.path(smoke_bundle.faces["recognizer"]))
    want = original.run(None, {original.get_inputs()[0].name: x})[0]
    assert np.abs(got - want).max() <= 1e-5
    assert np.abs(got[0] - got[1]).max() > 1e-3  # not a constant


def test_weights_sit_in_one_data_file_beside_the_graph(exported):
    """The layout a 10 GB SDXL UNet needs (protobuf stops at 2 GB), on every component."""
    from revpers.models.artifacts import external_data_files, onnx_files

    out, record = exported
    for name in ("unet", "vae_encoder", "vae_decoder"):
        path = _path(exported, name)
        assert sorted(p.name for p in path.parent.iterdir()) == ["model.onnx", "model.onnx.data"], name
        assert external_data_files(path) == [path.parent / "model.onnx.data"]
        assert onnx_files(path) == [path, path.parent / "model.onnx.data"]
        graph, data = (f.stat().st_size for f in onnx_files(path))
        assert data > 10 * graph, (name, graph, data)  # the weights really moved out of the graph


def test_scattered_external_weights_are_gathered_into_one_file(tmp_path):
    """What torch's exporter writes past 2 GB (one file per tensor) becomes model.onnx + model.onnx.data,
    the stray files go, the outputs stay the same; a second pass does not grow the data file."""
    import onnx

    from revpers.models.artifacts import external_data_files, onnx_session, store_weights_externally

    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.GELU(), torch.nn.Linear(32, 8)).eval()
    plain = tmp_path / "plain.onnx"
    torch.onnx.export(model, (torch.zeros(2, 16),), str(plain), input_names=["x"], output_names=["y"], dynamo=False)
    path = tmp_path / "scattered" / "model.onnx"
    path.parent.mkdir()
    onnx.save_model(
        onnx.load(str(plain)), str(path), save_as_external_data=True, all_tensors_to_one_file=False, size_threshold=0
    )
    scattered = external_data_files(path)
    assert len(scattered) == 4 and all(f.is_file() for f in scattered)
    x = np.random.default_rng(0).standard_normal((2, 16)).astype(np.float32)
    want = onnx_session(plain).run(None, {"x": x})[0]

    data = store_weights_externally(path)
    assert sorted(p.name for p in path.parent.iterdir()) == ["model.onnx", "model.onnx.data"]
    assert external_data_files(path) == [data]
    np.testing.assert_array_equal(onnx_session(path).run(None, {"x": x})[0], want)
    size = data.stat().st_size
    store_weights_externally(path)  # onnx appends to an existing data file unless it is removed first
    assert data.stat().st_size == size
    np.testing.assert_array_equal(onnx_session(path).run(None, {"x": x})[0], want)


@pytest.mark.tensorrt
def test_tensorrt_engines_match_onnx(exported):
    pytest.importorskip(
        "tensorrt",
        reason="TensorRT is not installed here (no NVIDIA GPU/TensorRT wheel); "
        "engine build and engine-vs-ONNX parity run where it imports",
    )
    from revpers.export.tensorrt_build import build_engines, engine_parity

    out, record = exported
    engines = build_engines(out, record, log=print)
    assert set(engines) >= {"unet", "vae_encoder", "vae_decoder"}
    tolerances = {"unet": 5e-2, "vae_encoder": 1e-3, "vae_decoder": 1e-3, "arcface": 1e-3}
    for name, rel in engines.items():
        spec = _spec(record, name)
        assert (out / rel).is_file(), name
        if name == "unet":
            inputs = _unet_inputs(spec, 4, timesteps=[299, 4, 150, 1], ip_scale=[0.0, 0.5, 1.0, 2.0])
        else:
            torch.manual_seed(0)
            inputs = {t.name: t.example(2) for t in spec.inputs}
        err = engine_parity(out / rel, _path(exported, name), {k: v.numpy() for k, v in inputs.items()})
        print(f"{name} engine-vs-onnx max abs {err:.3g}")
        assert err <= tolerances.get(name, 1e-3), name


def test_fp8_calibration_records_the_pipelines_own_unet_inputs(exported, smoke_bundle, fp32_models):
    """FP8 calibration data is recorded from the method itself (inversion and generation calls) and
    feeds the exported UNet graph as is. ModelOpt and the FP8 engine build run where they install."""
    from revpers.core.params import Params
    from revpers.core.schedule import timesteps
    from revpers.export.calibration import calibration_faces, capture_unet_inputs, quantize_unet_fp8

    crops, ids = calibration_faces(smoke_bundle, [real_photo(), real_photo("t1.jpg")])
    assert len(crops) == 7 and ids.shape == (7, smoke_bundle.embedding_dim)
    params = Params(steps=6)
    data = capture_unet_inputs(
        fp32_models, crops[:2], ids[:2], params, smoke_bundle.native_size, max_samples=1000, inversion_batch=3
    )
    spec = _spec(exported[1], "unet")
    n = data["sample"].shape[0]
    ts = timesteps(params.steps, params.skip, fp32_models.schedule.num_train_timesteps)
    assert n == 2 * 2 * 2 * len(ts)  # (inversion + generation) x 2 CFG branches x 2 faces x steps
    for t in spec.inputs:
        assert data[t.name].shape == (n, *t.shape), t.name
        assert data[t.name].dtype == NUMPY_DTYPES[t.dtype], t.name
    assert set(np.unique(data["timestep"]).tolist()) == set(int(t) for t in ts)
    assert params.ip_scale in set(np.unique(data["ip_scale"]).tolist())
    rows = {k: v[:5] for k, v in data.items()}
    got = _run_onnx(_path(exported, "unet"), {k: torch.from_numpy(v) for k, v in rows.items()})
    with torch.inference_mode():
        want = fp32_models.unet(*[torch.from_numpy(rows[t.name]) for t in spec.inputs]).numpy()
    assert np.abs(got - want).max() <= 1e-4
    capped = capture_unet_inputs(fp32_models, crops[:1], ids[:1], params, smoke_bundle.native_size, max_samples=8)
    assert capped["sample"].shape[0] == 8
    try:
        import modelopt.onnx.quantization  # noqa: F401
    except ImportError:
        with pytest.raises(DependencyError, match="ModelOpt"):
            quantize_unet_fp8(_path(exported, "unet"), rows, Path("unused.onnx"))
    with pytest.raises(ValueError, match="fp8 is a TensorRT engine option"):
        from revpers.export.onnx_export import export_bundle

        export_bundle(smoke_bundle, Path("unused"), fp8=True)


def test_onnx_pipeline_matches_torch_within_the_bound_its_own_error_gives(exported, smoke_bundle, torch_models):
    """The one cross-runtime check of the whole method: the exported ONNX components, fed as the BLS
    feeds the served ones (``OnnxRuntimeComponents``; the server gives its images bit for bit, see
    test_server.py), against the in-process PyTorch pipeline. ONNX Runtime and PyTorch use different
    kernels, so they differ by float rounding, and the bound on the images is derived from that on
    the running machine instead of fitted (tests/numerics.py):

    1. e_c, each component's largest ONNX-vs-PyTorch difference on the pipeline's own inputs (every
       UNet/VAE call of the PyTorch run also runs the ONNX component on the same input);
    2. A, how far the method carries errors of that size: the PyTorch run again with every
       output element of every component call moved by +-e_c (seeded random signs), measured as the
       largest change of the decoded image in grey levels before rounding;
    3. the ONNX run may differ from the PyTorch one by at most 2 A before rounding (the perturbation
       puts the worst-case error on every element where the real error reaches it on a few; the
       factor 2 covers an error direction the method amplifies more than random signs), and by at
       most floor(2 A) + 1 levels after (rounding adds at most one).
    A wrong feed (input order, scalar layout, a missing identity or prompt) moves the image by far
    more than A."""
    from revpers.core.params import Params
    from revpers.core.pipeline import run_faces
    from revpers.export.calibration import calibration_faces
    from revpers.serving.local import OnnxRuntimeComponents

    crops, ids = calibration_faces(smoke_bundle, [real_photo()])
    params, n = Params(steps=8, seed=3), smoke_bundle.native_size
    ort = OnnxRuntimeComponents(exported[0], smoke_bundle)

    def run(models):
        result = run_faces(models, crops, ids, params, n, inversion_batch=ort.inversion_batch)
        return np.stack(result.images).astype(int), (models.decode(result.x_out) * 127.5).numpy()

    def onnx_file(name, **given):
        # the ONNX file itself on the module's inputs, by name: not through OnnxRuntimeComponents'
        # feeding, which the check is about (a wrong feed must not enlarge the measured error)
        runner = ort.runners[name]
        return runner([given[k] for k in runner.input_names])[0]

    with torch.inference_mode():
        measured = ProbeComponents(torch_models, other=onnx_file)
        img_torch, levels_torch = run(measured)
        img_ort, levels_ort = run(ort)
        img_pert, levels_pert = run(ProbeComponents(torch_models, perturb=measured.error))
    amplified = float(np.abs(levels_pert - levels_torch).max())
    diff = float(np.abs(levels_ort - levels_torch).max())
    rounded = int(np.abs(img_ort - img_torch).max())
    print(
        f"component onnx-vs-torch max abs {measured.error}; the method carries errors of that size to "
        f"{amplified:.3g} levels; onnx-vs-torch images {diff:.3g} levels ({rounded} after rounding)"
    )
    assert diff <= 2 * amplified
    assert rounded <= int(2 * amplified) + 1
    assert np.abs(img_torch - np.stack(crops).astype(int)).max() > 10  # the faces did change
