"""The `pytorch` repository target (the bundle's PyTorch modules as Triton models; the GPU path
without TensorRT) and what every target shares: component descriptions from the bundle alone."""

from __future__ import annotations

import json
import re
import threading

import numpy as np
import pytest
import torch
from conftest import real_photo, start_triton


def test_specs_from_bundle_match_the_loaded_modules(smoke_bundle, torch_models):
    """The descriptions read from config files alone are what the loaded modules take and give: each
    module run on its spec's example inputs returns the spec's outputs, and the text shapes are the
    prompt encoder's."""
    from revpers.models.components import specs_from_bundle

    specs = {s.name: s for s in specs_from_bundle(smoke_bundle, inversion_batch=7)}
    assert set(specs) == {"unet", "vae_encoder", "vae_decoder", "arcface"}
    emb = torch_models.text("")
    unet = {t.name: t.shape for t in specs["unet"].inputs}
    assert unet["text"] == tuple(emb.text.shape[1:]) and unet["pooled"] == tuple(emb.pooled.shape[1:])
    assert specs["unet"].max_batch == 2 * 7 * 4 and specs["unet"].opt_batch == 2 * 7
    modules = {
        "unet": torch_models.unet,
        "vae_encoder": torch_models.vae_encoder,
        "vae_decoder": torch_models.vae_decoder,
    }
    for name, module in modules.items():
        spec = specs[name]
        with torch.no_grad():
            out = module(*[t.example(3) for t in spec.inputs])
        assert tuple(out.shape) == (3, *spec.outputs[0].shape), name


def test_full_size_specs_carry_one_face_per_unet_call(smoke_bundle_dir, tmp_path):
    """A full-size bundle's configs (SDXL text encoders, 1024 px; no weights needed to read them):
    SDXL's conditioning shapes, and batch limits sized for 1024 px (one face's inversion per UNet
    call, two faces per VAE call) instead of the small crops' 4 and 8."""
    import shutil

    from revpers.models.bundle import load_bundle
    from revpers.models.components import specs_from_bundle
    from revpers.models.smoke import _byte_level_vocab, _text_config

    root = tmp_path / "fullsize-configs"
    shutil.copytree(smoke_bundle_dir, root, ignore=shutil.ignore_patterns("*.safetensors", "*.bin", "*.onnx"))
    vocab = len(_byte_level_vocab()[0])
    for sub, projection in (("text_encoder", False), ("text_encoder_2", True)):
        _text_config(vocab, projection, full_size=True).to_json_file(root / "sdxl" / sub / "config.json")
    for weights in ("ip_adapter/ip-adapter-faceid_sdxl.bin", "face_models/smoke_arcface.onnx"):
        (root / weights).touch()  # load_bundle checks they exist; nothing here reads them
    manifest = json.loads((root / "manifest.json").read_text())
    (root / "manifest.json").write_text(json.dumps({**manifest, "native_size": 1024}))
    specs = {s.name: s for s in specs_from_bundle(load_bundle(root), inversion_batch=10)}
    unet = specs["unet"]
    assert {t.name: t.shape for t in unet.inputs} == {
        "sample": (4, 128, 128),
        "timestep": (),
        "text": (77, 2048),
        "pooled": (1280,),
        "time_ids": (6,),
        "identity": (512,),
        "ip_scale": (),
    }
    assert (unet.max_batch, unet.opt_batch) == (20, 20)
    assert specs["vae_encoder"].max_batch == specs["vae_decoder"].max_batch == 2
    small = {s.name: s for s in specs_from_bundle(load_bundle(smoke_bundle_dir), inversion_batch=10)}
    assert small["unet"].max_batch == 80 and small["vae_decoder"].max_batch == 8


def _config(repo, model: str) -> str:
    return (repo / model / "config.pbtxt").read_text()


def _param(text: str, key: str) -> str | None:
    m = re.search(r'key: "%s" value: \{ string_value: "((?:[^"\\]|\\.)*)" \}' % re.escape(key), text)
    return m and m.group(1).replace('\\"', '"')


def test_repository_targets_and_their_configs(smoke_bundle_dir, smoke_bundle, onnx_artifacts, tmp_path):
    from revpers.models.components import specs_from_bundle
    from revpers.service.request import Limits
    from revpers.serving.repository import build_repository

    repo = build_repository(None, tmp_path / "pt", "pytorch", bundle=smoke_bundle_dir)
    unet = _config(repo, "unet")
    assert _param(unet, "runtime") == "pytorch" and _param(unet, "torch_compile") == "no"
    assert _param(unet, "bundle") == str(smoke_bundle_dir.resolve()) and "count: 1 kind: KIND_CPU" in unet
    assert _param(unet, "FORCE_CPU_ONLY_INPUT_TENSORS") is None  # CPU: the backend's default (host tensors)
    assert not (repo / "unet" / "1" / "model.onnx").exists()
    assert _param(_config(repo, "arcface"), "runtime") == "onnxruntime"
    assert (repo / "arcface" / "1" / "model.onnx").is_file()
    ort = build_repository(onnx_artifacts[0], tmp_path / "ort-layout", "onnxruntime")
    for model in ("unet", "vae_encoder", "vae_decoder"):  # the graph with its weights file
        assert sorted(p.name for p in (ort / model / "1").iterdir()) == ["model.onnx", "model.onnx.data", "model.py"]
    bls = _config(repo, "revpers")
    assert "max_batch_size: 8" in bls and "dynamic_batching" in bls and "count: 2 kind: KIND_CPU" in bls
    specs = {s.name: s for s in specs_from_bundle(smoke_bundle, 10)}
    assert _param(bls, "inversion_batch") == "10"
    assert json.loads(_param(bls, "max_batch")) == {n: s.max_batch for n, s in specs.items()}
    limit_keys = ("max_bytes", "max_pixels", "max_faces", "max_steps", "max_retries")
    assert {k: _param(bls, k) for k in limit_keys} == Limits().as_parameters()  # the safe defaults, written out

    mine = Limits(max_bytes=1000, max_pixels=4096, max_faces=2, max_steps=130, max_retries=3)
    gpu = build_repository(
        None,
        tmp_path / "gpu",
        "pytorch",
        bundle=smoke_bundle_dir,
        gpu=True,
        bls_threads=4,
        component_instances=3,
        torch_compile=True,
        inversion_batch=5,
        limits=mine,
    )
    read_back = {k: _param(_config(gpu, "revpers"), k) for k in ("bundle", "max_batch", *limit_keys)}
    assert Limits.from_parameters(read_back) == mine  # what model.py reads is what was asked for
    unet, bls = _config(gpu, "unet"), _config(gpu, "revpers")
    assert "count: 3 kind: KIND_GPU" in unet and _param(unet, "torch_compile") == "yes"
    assert "max_batch_size: 40" in unet  # 2 CFG branches x 5 timesteps x 4 faces
    for model in ("unet", "vae_encoder", "vae_decoder", "arcface"):  # GPU tensors reach them as they are
        assert _param(_config(gpu, model), "FORCE_CPU_ONLY_INPUT_TENSORS") == "no", model
    assert "max_batch_size: 4" in bls and _param(bls, "FORCE_CPU_ONLY_INPUT_TENSORS") == "no"
    assert _param(bls, "inversion_batch") == "5" and json.loads(_param(bls, "max_batch"))["unet"] == 40

    ort = build_repository(onnx_artifacts[0], tmp_path / "ort", "onnxruntime", bundle=smoke_bundle_dir)
    assert _param(_config(ort, "revpers"), "inversion_batch") == str(
        onnx_artifacts[1]["components"]["unet"]["spec"]["opt_batch"] // 2
    )
    with pytest.raises(ValueError, match="differs from the exported one"):
        build_repository(
            onnx_artifacts[0], tmp_path / "ort7", "onnxruntime", bundle=smoke_bundle_dir, inversion_batch=7
        )
    with pytest.raises(ValueError, match="needs exported artifacts"):
        build_repository(None, tmp_path / "x", "onnxruntime", bundle=smoke_bundle_dir)
    with pytest.raises(FileNotFoundError, match="no TensorRT engine"):
        build_repository(onnx_artifacts[0], tmp_path / "trt", "tensorrt", bundle=smoke_bundle_dir)


class _FakePb:
    """Just the triton_python_backend_utils calls component_models.execute makes, over torch DLPack."""

    class Tensor:
        def __init__(self, name, value):
            self.name, self.value = name, value

        @classmethod
        def from_dlpack(cls, name, capsule):
            return cls(name, torch.utils.dlpack.from_dlpack(capsule))

        def to_dlpack(self):
            return torch.utils.dlpack.to_dlpack(self.value)

    class InferenceResponse:
        def __init__(self, output_tensors):
            self.outputs = {t.name: t.value for t in output_tensors}

    @staticmethod
    def get_input_tensor_by_name(request, name):
        return _FakePb.Tensor(name, request[name])


def test_component_execute_merges_requests_and_splits_results_back():
    from revpers.serving.components import execute

    seen = []

    def run(feeds):  # y = 10 * x + scalar, row by row; records the merged batch it got
        x, k = feeds
        seen.append((x.shape[0], k.shape))
        return [10 * x + k[:, None]]

    requests = [{"x": torch.full((n, 2), float(i)), "k": torch.full((n, 1), float(i))} for i, n in enumerate((1, 3, 2))]
    responses = execute(_FakePb, requests, [("x", False), ("k", True)], ["y"], run)
    assert seen == [(6, (6,))]  # one run over all 6 rows; the per-sample scalar given as (B,)
    for i, (req, resp) in enumerate(zip(requests, responses)):
        assert torch.equal(resp.outputs["y"], torch.full((req["x"].shape[0], 2), 11.0 * i))


def test_torch_runner_warms_up_at_the_preferred_batches_from_the_config(smoke_bundle_dir, smoke_bundle):
    """What the pytorch target's initialize runs before the model is READY: one call per preferred
    batch size, inputs built from the config as Triton hands it over (int64 dims as JSON strings)."""
    from revpers.models.components import TRITON_DTYPES, specs_from_bundle
    from revpers.serving.components import TorchRunner, example_feeds

    specs = {s.name: s for s in specs_from_bundle(smoke_bundle, inversion_batch=3)}
    for name in ("unet", "vae_decoder"):
        spec = specs[name]
        config = {
            "name": name,
            "max_batch_size": spec.max_batch,
            "input": [
                {
                    "name": t.name,
                    "data_type": TRITON_DTYPES[t.dtype],
                    "dims": [str(d) for d in t.shape or (1,)],
                    **({"reshape": {"shape": []}} if not t.shape else {}),
                }
                for t in spec.inputs
            ],
            "dynamic_batching": {"preferred_batch_size": list(spec.preferred_batches)},
        }
        feeds = example_feeds(config, 5)
        assert [tuple(f.shape) for f in feeds] == [(5, *t.shape) for t in spec.inputs]
        runner = TorchRunner(smoke_bundle_dir, name)
        calls = []
        runner.forward = lambda *args, _m=runner.module: calls.append(args[0].shape[0]) or _m(*args)
        want = list(spec.preferred_batches) or [1, spec.max_batch]
        assert runner.warm_up(config) == want and calls == want, name
        config.pop("dynamic_batching")
        calls.clear()
        assert runner.warm_up(config) == [1, spec.max_batch] == calls


class _Request:
    """A request as the response pool sees it: a name and a response sender that records sends."""

    def __init__(self, name, sent, fail_send=False):
        self.name, self.sent, self.fail_send = name, sent, fail_send

    def request_id(self):
        return self.name

    def get_response_sender(self):
        request = self

        class Sender:
            def send(self, response, flags=0):
                request.sent.append((request.name, response, flags))
                if request.fail_send:
                    raise RuntimeError("stub gone")

        return Sender()


def test_response_pool_answers_each_request_when_done_and_bounds_concurrency():
    """Three requests, two threads: the fast one is answered while the slow one still runs, the
    third waits for a free slot (never more than two at once), submit returns before the slow one
    is done (Triton may call execute again), and each request gets exactly one FINAL response, also
    when its handler raises or the send itself fails."""
    from revpers.serving.bls import ResponsePool

    FINAL = 7
    sent, running, peak, counts = [], set(), [0], []
    lock = threading.Lock()
    slow_may_finish = threading.Event()

    def handle(request):
        with lock:
            running.add(request.name)
            peak[0] = max(peak[0], len(running))
        try:
            if request.name == "slow":
                assert slow_may_finish.wait(20)
            if request.name == "bad":
                raise ValueError("handler bug")
            return f"response {request.name}"
        finally:
            with lock:
                running.discard(request.name)

    pool = ResponsePool(
        handle, lambda exc, request: f"error {type(exc).__name__}", FINAL, threads=2, on_count=counts.append
    )
    submitter = threading.Thread(target=pool.submit, args=([_Request(n, sent) for n in ("slow", "fast", "third")],))
    submitter.start()
    submitter.join(20)
    assert not submitter.is_alive()  # all three admitted while "slow" still runs
    for _ in range(200):  # "third" got the slot "fast" left
        if len(sent) == 2:
            break
        threading.Event().wait(0.05)
    assert [(n, r) for n, r, _ in sent] == [("fast", "response fast"), ("third", "response third")]
    slow_may_finish.set()
    pool.submit([_Request("bad", sent), _Request("lost", sent, fail_send=True)])
    pool.close()
    assert sorted((n, r) for n, r, _ in sent) == [
        ("bad", "error ValueError"),
        ("fast", "response fast"),
        ("lost", "response lost"),
        ("slow", "response slow"),
        ("third", "response third"),
    ]
    assert all(flags == FINAL for _, _, flags in sent)
    assert peak[0] == 2 and max(counts) == 2 and counts[-1] == 0 and pool.in_flight == 0


def test_torch_runner_computes_on_aligned_copies_of_its_inputs(smoke_bundle_dir, smoke_bundle, torch_models):
    """A tensor Triton hands a Python model sits in shared memory at whatever offset the tensors
    before it left. MKL/oneDNN choose CPU kernels by operand alignment, so computing on such a buffer
    in place gave a batch-2 UNet call up to 1.2e-7 off the aligned computation (AVX-512 EPYC,
    `identity` 4 bytes off, measured); the runner copies its inputs into fresh torch memory, so its
    output is bit-equal to the in-process module's on the same values wherever they lie."""
    from revpers.models.components import specs_from_bundle
    from revpers.serving.components import TorchRunner

    spec = next(s for s in specs_from_bundle(smoke_bundle, inversion_batch=3) if s.name == "unet")
    runner = TorchRunner(smoke_bundle_dir, "unet")
    gen = torch.Generator().manual_seed(0)
    feeds = [
        torch.randn((2, *t.shape), generator=gen) if t.dtype == "FP32" else torch.full((2,), 250) for t in spec.inputs
    ]
    feeds[-1] = torch.ones(2)  # ip_scale

    def offset(t: torch.Tensor, elements: int) -> torch.Tensor:  # the same values, 4*elements bytes further on
        buf = torch.empty(t.numel() + 16, dtype=t.dtype)
        view = buf[elements : elements + t.numel()].view(t.shape)
        view.copy_(t)
        return view

    with torch.inference_mode():
        want = torch_models.unet(*feeds)
    for k in (1, 2, 3):
        for i in range(len(feeds)):
            moved = [offset(f, k) if j == i else f for j, f in enumerate(feeds)]
            assert torch.equal(runner(moved)[0], want), (spec.inputs[i].name, k)


@pytest.mark.server
def test_pytorch_target_serves_the_same_images(smoke_bundle_dir, tmp_path):
    """The pytorch target computes exactly what the in-process pipeline computes: bit-equal images.

    Both run the same torch modules on the same CPU with the same inputs, so any difference has a
    cause, and each is ruled out: the same batch composition (one request; the same inversion batch
    on both sides, so the UNet sees 2 x 6 samples once and then 2 samples per generation step), the
    same torch thread count (the server is started with this process's; 1 vs 2 threads changed the
    image by 1 level, measured), and inputs in aligned memory (the runner copies them out of Triton's
    shared memory; see the test above: in place they gave 2 levels on a 2-core AVX-512 EPYC).
    """
    from revpers.core.params import Params
    from revpers.service.anonymizer import Anonymizer
    from revpers.service.images import decode_image, encode_image
    from revpers.serving.repository import build_repository
    from revpers_client.core import RevpersClient

    inversion_batch = 10  # both sides: 6 steps' inversion in one UNet call
    repo = build_repository(
        None, tmp_path / "repo", "pytorch", bundle=smoke_bundle_dir, inversion_batch=inversion_batch
    )
    srv = start_triton(repo, env={"OMP_NUM_THREADS": str(torch.get_num_threads())})
    try:
        client = RevpersClient(srv.urls.grpc)
        rgb = real_photo()
        data, report = client.anonymize(encode_image(rgb, "PNG"), mode="aligned", steps=6, seed=5)
        client.close()
    finally:
        srv.stop()
    got = decode_image(data)
    want = (
        Anonymizer(smoke_bundle_dir, inversion_batch=inversion_batch)
        .anonymize_aligned(rgb, Params(steps=6, seed=5))
        .image
    )
    diff = int(np.abs(got.astype(int) - want.astype(int)).max())
    print(f"pytorch target vs in process: max diff {diff} levels; report device {report['device']}")
    assert np.array_equal(got, want)
    assert int(np.abs(got.astype(int) - rgb.astype(int)).max()) > 10
    assert report["params"]["steps"] == 6 and report["params"]["seed"] == 5 and report["smoke"] is True


def test_limits_refuse_unusable_values_and_huge_numbers_are_parameter_errors():
    """A limit below the default a request gets when it leaves the value unset, or above what the
    method / Pillow / gRPC accept, is refused when the repository is made; a number too large for a
    float is a ParameterError (float(10**400) raises OverflowError), and the message does not echo it."""
    from revpers.core.errors import ParameterError
    from revpers.core.params import coerce_number
    from revpers.service.request import Limits

    for bad in (
        {"max_steps": 99},
        {"max_steps": 1001},
        {"max_retries": 1},
        {"max_retries": 6},
        {"max_pixels": 2**40},
        {"max_bytes": 2**31},
        {"max_faces": 0},
        {"max_faces": True},
    ):
        with pytest.raises(ParameterError, match=next(iter(bad))):
            Limits(**bad)
    with pytest.raises(ParameterError, match="max_steps must be an integer, got 'lots'"):
        Limits.from_parameters({"max_steps": "lots", "max_batch": "{}"})
    with pytest.raises(ParameterError, match="guidance must be finite, got an integer of about 400 digits"):
        coerce_number("guidance", int("9" * 400), float)
    with pytest.raises(ParameterError) as info:
        coerce_number("steps", "9" * 5000, int)
    assert len(str(info.value)) < 100


def test_onnxruntime_runner_is_invariant_to_batch_threads_and_alignment(onnx_artifacts):
    """What lets the server tests demand bit-equal images from the onnxruntime target: its runner
    gives each sample what it gives that sample alone (requests merged by a dynamic batcher, or the
    BLS's slices), whatever ONNX Runtime's thread count, and wherever the inputs lie in memory (it
    copies them out of Triton's shared memory into aligned buffers, as TorchRunner does; ONNX
    Runtime itself was insensitive to 4-12 byte offsets on the AVX-512 EPYC this was written on,
    the copy keeps it so where kernels are chosen by alignment). Checked on the running machine, so
    a CPU where this does not hold fails here, naming the cause, not only in the end-to-end tests."""
    from conftest import ort_threads

    from revpers.models.artifacts import load_artifacts
    from revpers.models.components import ComponentSpec
    from revpers.serving.components import OnnxRuntimeRunner

    out, record = onnx_artifacts
    gen = torch.Generator().manual_seed(0)
    for name in ("unet", "vae_encoder", "vae_decoder", "arcface"):
        spec = ComponentSpec.from_dict(load_artifacts(out)["components"][name]["spec"])
        path = out / record["components"][name]["onnx"]
        names, outs = [t.name for t in spec.inputs], [t.name for t in spec.outputs]
        feeds = [
            torch.randn((5, *t.shape), generator=gen) if t.dtype == "FP32" else torch.tensor([1, 250, 999, 40, 7])
            for t in spec.inputs
        ]
        if name == "unet":
            feeds[names.index("ip_scale")] = torch.tensor([1.0, 0.0, 0.5, 2.0, 1.0])
        runner = OnnxRuntimeRunner(path, names, outs, threads=ort_threads())
        want = runner(feeds)[0]
        for rows in ((0, 1), (1, 4), (4, 5)):  # alone, and in other batch compositions
            got = runner([f[rows[0] : rows[1]] for f in feeds])[0]
            assert torch.equal(got, want[rows[0] : rows[1]]), (name, rows)
        single = OnnxRuntimeRunner(path, names, outs, threads=1)
        assert torch.equal(single(feeds)[0], want), (name, "threads")
        for k in (1, 2, 3):  # the same values 4k bytes off their aligned place
            moved = []
            for f in feeds:
                buf = torch.empty(f.numel() + 16, dtype=f.dtype)
                view = buf[k : k + f.numel()].view(f.shape)
                view.copy_(f)
                moved.append(view)
            assert torch.equal(runner(moved)[0], want), (name, "offset", k)
