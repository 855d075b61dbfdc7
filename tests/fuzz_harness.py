"""Run fuzz cases in a child process, so that a segfault or abort fails a test instead of killing pytest.

``Worker`` keeps one child alive (``python tests/fuzz_harness.py``) and sends it cases as JSON lines:
``{"fn": "module:function", "case": {...}}``. The child calls the function (a module under tests/) and answers
one JSON line:

- ``{"status": "ok", "detail": ...}``: the function returned (it checked the result against the oracle itself);
- ``{"status": "error", "type": ..., "message": ...}``: it raised one of the exceptions the case allows (the
  function's ``ALLOWED`` attribute, default ValueError/TypeError/FileNotFoundError), with a message;
- ``{"status": "wrong", ...}``: an AssertionError (a result that differs from the oracle);
- ``{"status": "unclear", ...}``: any other exception, or an allowed one with an empty message or an internal
  assert (a bug: the user would see a traceback that does not say what is wrong).

If the child dies (signal, abort) or hangs past the timeout, the case is reported as ``crash`` / ``hang`` with its
exit status, and the next case starts a fresh child. ``Worker.stats`` counts cases and outcomes for the slow
profile's report.
"""

from __future__ import annotations

import collections
import importlib
import json
import os
import selectors
import subprocess
import sys
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
MARK = "@@FUZZ@@"
BAD = ("crash", "hang", "wrong", "unclear")


class Worker:
    def __init__(self, env: dict | None = None, timeout: float = 120.0):
        self.env = dict(os.environ, **(env or {}))
        self.env["PYTHONPATH"] = os.pathsep.join(p for p in (os.path.dirname(HERE), self.env.get("PYTHONPATH")) if p)
        self.timeout = timeout
        self.proc: subprocess.Popen | None = None
        self.stats: collections.Counter = collections.Counter()
        self.bad: list[dict] = []

    def _start(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-u", os.path.abspath(__file__)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=self.env, cwd=HERE,
            text=True,
        )

    def close(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None

    def run(self, fn: str, case: dict) -> dict:
        """Run one case; returns the outcome dict (see the module docstring)."""
        if self.proc is None or self.proc.poll() is not None:
            self._start()
        try:
            self.proc.stdin.write(json.dumps({"fn": fn, "case": case}) + "\n")
            self.proc.stdin.flush()
        except BrokenPipeError:
            pass
        out = self._answer()
        self.stats["cases"] += 1
        self.stats[out["status"]] += 1
        if out["status"] in BAD:
            self.bad.append({"fn": fn, "case": case, **out})
        return out

    def _answer(self) -> dict:
        sel = selectors.DefaultSelector()
        sel.register(self.proc.stdout, selectors.EVENT_READ)
        try:
            while True:
                if not sel.select(self.timeout):
                    self.close()
                    return {"status": "hang", "message": f"no answer within {self.timeout} s"}
                line = self.proc.stdout.readline()
                if not line:  # the child died
                    rc = self.proc.wait()
                    self.proc = None
                    return {"status": "crash", "message": f"worker exited with status {rc}"}
                if line.startswith(MARK):
                    return json.loads(line[len(MARK):])
        finally:
            sel.close()


def drive(worker: Worker, fn: str, strategy, n: int) -> None:
    """Run ``n`` hypothesis-drawn cases of ``strategy`` through ``fn``, collecting outcomes in ``worker.stats``
    (no assertion per case: the long profiles report and assert on the totals)."""
    from hypothesis import HealthCheck, Phase, given, settings

    @settings(max_examples=n, deadline=None, database=None, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck))
    @given(case=strategy)
    def run(case):
        worker.run(fn, case)

    run()


def report(name: str, stats, bad: list) -> str:
    """Write every bad outcome to a JSON file in the temp folder (for the long profiles); returns its path."""
    import tempfile

    path = os.path.join(tempfile.gettempdir(), f"haba_fuzz_{name}_failures.json")
    with open(path, "w") as f:
        json.dump({"stats": dict(stats), "bad": bad}, f, indent=1, default=str)
    return path


# ---- the child ------------------------------------------------------------------------------------------------
DEFAULT_ALLOWED = (ValueError, TypeError, FileNotFoundError)


def _call(fn: str, case: dict) -> dict:
    mod_name, func_name = fn.split(":")
    func = getattr(importlib.import_module(mod_name), func_name)
    allowed = getattr(func, "ALLOWED", DEFAULT_ALLOWED)
    try:
        detail = func(case)
    except AssertionError as exc:
        return {"status": "wrong", "message": str(exc)[:2000], "trace": traceback.format_exc()[-3000:]}
    except BaseException as exc:  # noqa: BLE001 - classifying every outcome is the point
        msg = str(exc).strip()
        clean = isinstance(exc, allowed) and msg and "INTERNAL ASSERT" not in msg
        return {
            "status": "error" if clean else "unclear",
            "type": type(exc).__name__,
            "message": msg[:2000],
            **({} if clean else {"trace": traceback.format_exc()[-3000:]}),
        }
    return {"status": "ok", "detail": detail}


def _main() -> None:
    sys.path.insert(0, HERE)
    import torch

    torch.set_num_threads(1)
    for line in sys.stdin:
        req = json.loads(line)
        out = _call(req["fn"], req["case"])
        sys.stdout.write(MARK + json.dumps(out, default=str) + "\n")
        sys.stdout.flush()


if __name__ == "__main__":
    _main()
