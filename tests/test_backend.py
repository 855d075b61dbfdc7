"""The backend gate (haba_fast.backend): per-backend reasons, the dispatcher, overrides and the old names."""

from __future__ import annotations

import warnings

import pytest
import torch
from utils import extension_loaded

from haba_fast import backend as B
from haba_fast.backend import BackendUnavailableError, OpInputs, explain, select_backend, supports


@pytest.fixture(autouse=True)
def _clean(monkeypatch):
    for k in ("HABA_FAST_BACKEND", "HABA_FAST_ADJOINT", "TRITON_INTERPRET"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setattr(B, "_warned", set())


def test_torch_supports_everything_and_explain_lists_every_backend():
    for op in B.OPS:
        assert supports(op, "cpu", "torch") == []
        assert set(explain(op, "cpu")) == set(B.BACKENDS)
    assert "CUDA" in " ".join(supports("generate", "cpu", "triton"))
    assert supports("trajectory_match", "cpu", "triton") == ["no Triton implementation of trajectory_match"]
    with pytest.raises(ValueError, match="unknown op 'blur'"):
        supports("blur", "cpu", "torch")


def test_cpu_reasons_name_dtype_device_and_family():
    inputs = OpInputs("cpu", torch.float16, ("crop", "noise"))
    why = " | ".join(supports("augment", inputs, "cpu"))
    assert "float16" in why and "family 'noise'" in why and "crop" not in why
    assert any("cpu tensors" in r for r in supports("generate", OpInputs("meta"), "cpu"))
    # trajectory_match's C++ op also takes CUDA tensors: no device reason there
    assert not any("tensors" in r for r in supports("trajectory_match", OpInputs("cuda"), "cpu"))


@pytest.mark.skipif(not extension_loaded(), reason="needs the C++ extension")
def test_auto_prefers_cpu_on_cpu_and_falls_back_with_one_warning():
    assert select_backend("augment", OpInputs("cpu", torch.float32, ("crop",))) == "cpu"
    with pytest.warns(RuntimeWarning, match="cpu: dtype torch.float16"):
        assert select_backend("augment", OpInputs("cpu", torch.float16)) == "torch"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the second fallback of the same kind is silent
        assert select_backend("augment", OpInputs("cpu", torch.float16)) == "torch"


def test_forced_backend_raises_with_reasons(monkeypatch):
    with pytest.raises(BackendUnavailableError, match="backend 'triton' cannot run generate: needs CUDA"):
        select_backend("generate", "cpu", "triton")
    monkeypatch.setenv("HABA_FAST_BACKEND", "torch")
    assert select_backend("generate", "cpu") == "torch"
    monkeypatch.setenv("HABA_FAST_BACKEND", "gpu")
    with pytest.raises(ValueError, match="unknown backend 'gpu'"):
        select_backend("generate", "cpu")


def test_old_names_map_with_a_deprecation_warning(monkeypatch):
    with pytest.warns(DeprecationWarning, match="'python' is deprecated; use 'torch'"):
        assert select_backend("trajectory_match", "cpu", "python") == "torch"
    monkeypatch.setenv("HABA_FAST_ADJOINT", "python")
    with pytest.warns(DeprecationWarning, match="HABA_FAST_ADJOINT is deprecated"):
        assert select_backend("trajectory_match", "cpu", legacy_env="HABA_FAST_ADJOINT") == "torch"
    monkeypatch.setenv("HABA_FAST_BACKEND", "torch")  # the new variable wins, silently
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert select_backend("trajectory_match", "cpu", legacy_env="HABA_FAST_ADJOINT") == "torch"


def test_register_check_adds_op_specific_reasons(monkeypatch):
    monkeypatch.setattr(B, "_CHECKS", {})

    def needs_convnet(inputs):
        model = inputs.extra.get("model")
        return [] if model is None or model == "convnet" else [f"{model} is not a ConvNet"]

    B.register_check("trajectory_match", "cpu", needs_convnet)
    B.register_check("trajectory_match", "cpu", needs_convnet)  # idempotent
    assert supports("trajectory_match", OpInputs("cpu", extra={"model": "resnet"}), "cpu")[-1] == (
        "resnet is not a ConvNet"
    )
    assert "resnet is not a ConvNet" not in supports("trajectory_match", OpInputs("cpu"), "cpu")
    with pytest.raises(BackendUnavailableError, match="resnet is not a ConvNet"):
        select_backend("trajectory_match", OpInputs("cpu", extra={"model": "resnet"}), "cpu")
    with pytest.raises(ValueError, match="unknown op"):
        B.register_check("blur", "cpu", needs_convnet)


def test_info_prints_why_each_backend_was_skipped(capsys):
    from haba_fast.cli import main

    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "not triton: no Triton implementation of trajectory_match" in out
    assert "not triton: needs CUDA tensors" in out


def test_cuda_fallback_names_every_skipped_backend(monkeypatch):
    monkeypatch.setattr(B, "triton_available", lambda: False)
    monkeypatch.setattr(B.importlib.util, "find_spec", lambda name: None)  # as if triton were not installed
    pattern = r"generate falls back to the torch backend \(triton: .*not installed.*; cpu: "
    with pytest.warns(RuntimeWarning, match=pattern):
        assert select_backend("generate", OpInputs("cuda", torch.float32)) == "torch"
