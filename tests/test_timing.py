"""haba_fast.timing's result writer for bench/ scripts."""

from __future__ import annotations

import json

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


def test_write_bench_json_keeps_the_old_file_when_results_cannot_be_written(tmp_path):
    path = tmp_path / "result.json"
    timing.write_bench_json(path, "first", rows=[1])
    with pytest.raises(TypeError):
        timing.write_bench_json(path, "second", rows=[object()])  # not JSON: nothing is replaced
    assert json.loads(path.read_text())["command"] == "first"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["result.json"]
