"""The `pytorch` repository target (the bundle's PyTorch modules as Triton models; the GPU path
without TensorRT) and what every target shares: component descriptions from the bundle alone."""

from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import real_photo, start_triton


def test_specs_from_bundle_match_the_loaded_modules(smoke_bundle, torch_models):
    from export.components import specs_for, specs_from_bundle

    from_configs = {s.name: s for s in specs_from_bundle(smoke_bundle, inversion_batch=7)}
    from_modules = {s.name: s for s in specs_for(torch_models, smoke_bundle.native_size, smoke_bundle.embedding_dim,
                                                 inversion_batch=7)}
    assert set(from_configs) == set(from_modules) | {"arcface"}
    for name, spec in from_modules.items():
        assert from_configs[name] == spec, name


def test_repository_targets_and_their_configs(smoke_bundle_dir, onnx_artifacts, tmp_path):
    from revpers.repository import build_repository

    repo = build_repository(None, tmp_path / "pt", "pytorch", bundle=smoke_bundle_dir)
    unet = (repo / "unet" / "config.pbtxt").read_text()
    assert 'key: "runtime" value: { string_value: "pytorch" }' in unet
    assert str(smoke_bundle_dir.resolve()) in unet and "KIND_CPU" in unet
    assert not (repo / "unet" / "1" / "model.onnx").exists()
    assert 'string_value: "onnxruntime"' in (repo / "arcface" / "config.pbtxt").read_text()
    assert (repo / "arcface" / "1" / "model.onnx").is_file()
    bls = (repo / "revpers" / "config.pbtxt").read_text()
    assert "max_batch_size: 8" in bls and "dynamic_batching" in bls and "count: 2 kind: KIND_CPU" in bls

    gpu = build_repository(None, tmp_path / "gpu", "pytorch", bundle=smoke_bundle_dir, gpu=True, bls_threads=4)
    assert "KIND_GPU" in (gpu / "unet" / "config.pbtxt").read_text()
    assert 'FORCE_CPU_ONLY_INPUT_TENSORS" value: { string_value: "no"' in (gpu / "revpers" / "config.pbtxt").read_text()
    with pytest.raises(ValueError, match="needs exported artifacts"):
        build_repository(None, tmp_path / "x", "onnxruntime", bundle=smoke_bundle_dir)
    with pytest.raises(FileNotFoundError, match="no TensorRT engine"):
        build_repository(onnx_artifacts[0], tmp_path / "trt", "tensorrt", bundle=smoke_bundle_dir)


@pytest.mark.server
def test_pytorch_target_serves_the_same_images(smoke_bundle_dir, tmp_path):
    from client.core import RevpersClient
    from revpers.anonymizer import Anonymizer
    from revpers.images import decode_image, encode_image
    from revpers.pipeline import Params
    from revpers.repository import build_repository

    repo = build_repository(None, tmp_path / "repo", "pytorch", bundle=smoke_bundle_dir)
    srv = start_triton(repo)
    try:
        client = RevpersClient(srv.urls.grpc)
        rgb = real_photo()
        data, report = client.anonymize(encode_image(rgb, "PNG"), mode="aligned", steps=6, seed=5)
        client.close()
    finally:
        srv.stop()
    got = decode_image(data)
    want = Anonymizer(smoke_bundle_dir).anonymize_aligned(rgb, Params(steps=6, seed=5)).image
    diff = int(np.abs(got.astype(int) - want.astype(int)).max())
    print(f"pytorch target vs in process: max diff {diff} levels; report device {report['device']}")
    assert diff <= 1
    assert int(np.abs(got.astype(int) - rgb.astype(int)).max()) > 10
    assert json.dumps(report["params"]) and report["smoke"] is True
