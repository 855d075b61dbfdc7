"""resolve_device: the one place a device name becomes a torch.device; and the CLI's answers to bad devices, bad
thread counts and allocation failures (one line, exit 2, never a traceback)."""

import pytest
import torch

from haba_fast.cli import _allocator_message, _out_of_memory, main
from haba_fast.devices import resolve_device


def test_auto_and_none_pick_cuda_only_when_available():
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device(None).type == expected
    assert resolve_device("auto").type == expected
    assert resolve_device(" AUTO ").type == expected
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(torch.device("cpu")) == torch.device("cpu")


@pytest.mark.parametrize("name, message", [
    ("tpu", "is not a device"),
    ("", "is not a device"),
    ("cuda:x", "is not a device"),
    ("meta", "runs on cpu or cuda"),
])
def test_bad_names_are_clear_errors(name, message):
    with pytest.raises(ValueError, match=message) as info:
        resolve_device(name, flag="--eval-device")
    assert "--eval-device" in str(info.value)


def test_cuda_without_cuda_or_beyond_the_gpus_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="CUDA is not available here; use --device cpu"):
        resolve_device("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device("cuda:1") == torch.device("cuda:1")
    assert resolve_device("cuda") == torch.device("cuda")
    with pytest.raises(ValueError, match=r"has 2 GPU\(s\) \(cuda:0 to cuda:1\)"):
        resolve_device("cuda:2")


@pytest.mark.parametrize("argv", [
    ["bench", "iteration", "--device", "tpu", "--syn-steps", "1", "--ipc", "1", "--batch-syn", "2", "--width", "8"],
    ["bench", "genaug", "--device", "meta", "--batch", "2", "--size", "8"],
    ["bench", "objective", "--device", "tpu"],
    ["eval", "--baseline", "random", "--dataset", "digits", "--ipc", "1", "--device", "tpu"],
])
def test_cli_bad_device_is_one_line(argv, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "error: --device" in err and "Traceback" not in err


@pytest.mark.parametrize("sub", ["iteration", "objective"])
def test_cli_bench_threads_must_be_positive(sub, capsys):
    with pytest.raises(SystemExit) as info:
        main(["bench", sub, "--threads", "-1"])
    assert info.value.code == 2
    assert "--threads: must be >= 1, got -1" in capsys.readouterr().err


def test_allocation_failures_are_recognised():
    cpu = RuntimeError(
        "[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate memory: you tried to "
        "allocate 40000000000 bytes. Error code 12 (Cannot allocate memory)"
    )
    assert _out_of_memory(cpu) and _out_of_memory(MemoryError())
    assert _allocator_message(cpu).startswith("can't allocate memory: you tried to allocate 40000000000 bytes")
    if hasattr(torch, "OutOfMemoryError"):
        assert _out_of_memory(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    assert not _out_of_memory(RuntimeError("shape mismatch"))


def test_cli_out_of_memory_is_one_line(monkeypatch, capsys):
    import haba_fast.commands.info as info_cmd

    def explode(args):
        torch.empty(1)  # torch imported, as in every command that allocates
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate "
                           "memory: you tried to allocate 14400000000 bytes. Error code 12 (Cannot allocate memory)")

    monkeypatch.setattr(info_cmd, "run", explode)
    assert main(["info"]) == 2
    err = capsys.readouterr().err
    assert "haba-fast info: error: out of memory" in err and "14400000000 bytes" in err
    assert "alloc_cpu.cpp" not in err


def test_cli_other_runtime_errors_still_raise(monkeypatch):
    import haba_fast.commands.info as info_cmd

    def broken(args):
        raise RuntimeError("an internal bug")

    monkeypatch.setattr(info_cmd, "run", broken)
    with pytest.raises(RuntimeError, match="an internal bug"):
        main(["info"])
