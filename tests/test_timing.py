"""haba_fast.timing's result writer for bench/ scripts."""

from __future__ import annotations

import json
import os

import pytest

from haba_fast import timing


def test_write_bench_json_records_command_environment_and_results(tmp_path):
    path = tmp_path / "new" / "folder" / "result.json"
    out = timing.write_bench_json(path, "python bench/x.py --n 2", rows=[{"a": 1}], summary={"ratio": 0.5})
    on_disk = json.loads(path.read_text())
    assert on_disk == json.loads(json.dumps(out))
    assert list(on_disk) == ["command", "env", "load_average_at_end", "rows", "summary"]
    assert on_disk["command"] == "python bench/x.py --n 2"
    assert on_disk["env"]["torch"] and on_disk["env"]["cpus"] >= 1
    assert len(on_disk["load_average_at_end"]) == 3
    assert on_disk["rows"] == [{"a": 1}] and on_disk["summary"] == {"ratio": 0.5}
    assert sorted(p.name for p in path.parent.iterdir()) == ["result.json"]  # no temporary file left behind


def test_write_bench_json_keeps_the_old_file_when_the_write_fails(tmp_path, monkeypatch):
    path = tmp_path / "result.json"
    timing.write_bench_json(path, "first", rows=[1])

    def no_rename(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", no_rename)  # the new file is written, then cannot replace the old one
    with pytest.raises(OSError, match="disk full"):
        timing.write_bench_json(path, "second", rows=[2])
    assert json.loads(path.read_text())["command"] == "first"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["result.json"]  # the temporary file is removed


def test_write_bench_json_refuses_results_named_like_its_own_keys(tmp_path):
    with pytest.raises(ValueError, match="env"):
        timing.write_bench_json(tmp_path / "r.json", "cmd", env={"mine": 1})
    assert not (tmp_path / "r.json").exists()


def test_measure_times_the_warmup_calls_apart_from_the_timed_ones():
    """``Timing.warmup_times`` holds each untimed warm-up call's seconds (a compiled step's first call includes its
    compile, which the benchmark rows record as ``warmup_s``); the timed calls are the rest."""
    import time

    delays = iter([0.05, 0.0, 0.0, 0.0])

    def fn():
        time.sleep(next(delays))

    heard = []
    t = timing.measure(fn, warmup=1, repeats=3, on_call=lambda kind, i, s: heard.append((kind, i, s)))
    assert len(t.warmup_times) == 1 and t.warmup_times[0] >= 0.05
    assert [(k, i) for k, i, _ in heard] == [("warm-up", 0), ("timed", 0), ("timed", 1), ("timed", 2)]
    assert [s for _, _, s in heard] == t.warmup_times + t.times
    assert t.repeats == 3 and len(t.times) == 3 and max(t.times) < 0.05
    assert timing.measure(lambda: None, warmup=0, repeats=2).warmup_times == []
