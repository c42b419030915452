"""What the benchmark scripts share: mean ± std table cells and the fresh-process runner.

Each measured configuration runs in a fresh interpreter, so that its peak memory and its imports are its own:
:func:`run_child` writes the configuration (a JSON object) to a temporary folder, runs ``python <script> --child SPEC
RESULT`` from the repository root, offline, and returns the JSON object the child wrote; the script's ``--child``
branch is :func:`serve_child`. The machine and commit stamp of every table is :mod:`xmc_dst.provenance`.

Standard library only: ``peers.py`` imports this under the interpreter of ``.venv-pecos``, which has neither torch
nor the project's packages.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

__all__ = ["OFFLINE_ENV", "ROOT", "ChildFailed", "cell", "mean_std", "run_child", "serve_child"]

ROOT = Path(__file__).resolve().parents[1]
OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
               "TOKENIZERS_PARALLELISM": "false", "HF_DATASETS_DISABLE_PROGRESS_BARS": "1"}


def mean_std(values: Sequence[float]) -> list[float]:
    """[mean, sample standard deviation] (std 0 for a single value)."""
    values = [float(v) for v in values]
    return [statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0]


def cell(pair: Sequence[float], runs: int = 2, digits: int = 2) -> str:
    """``mean ± std`` of a :func:`mean_std` pair, the mean alone for a single run."""
    return f"{pair[0]:.{digits}f} ± {pair[1]:.{digits}f}" if runs > 1 else f"{pair[0]:.{digits}f}"


class ChildFailed(RuntimeError):
    """A child that exited with an error, was killed or timed out; ``output`` is the tail of what it printed."""

    def __init__(self, status: str, output: str) -> None:
        last = output.strip().splitlines()[-1] if output.strip() else ""
        super().__init__(f"{status}: {last}\n{output}")
        self.status, self.output, self.last_line = status, output, last


def run_child(script: str | Path, spec: dict[str, Any], timeout: float | None = None) -> dict[str, Any]:
    """``script --child`` on ``spec`` (plus ``"workdir"``, a temporary folder the child may use) in a fresh
    interpreter; its result, or :class:`ChildFailed`."""
    with tempfile.TemporaryDirectory(prefix="xmc-bench-") as work:
        spec_path, result_path = Path(work) / "spec.json", Path(work) / "result.json"
        spec_path.write_text(json.dumps({**spec, "workdir": work}))
        path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
        command = [sys.executable, str(script), "--child", str(spec_path), str(result_path)]
        try:
            done = subprocess.run(command, cwd=ROOT, env={**os.environ, **OFFLINE_ENV, "PYTHONPATH": path},
                                  capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired as expired:
            raise ChildFailed(f"timeout after {timeout:.0f} s", _text(expired.stdout) + _text(expired.stderr)) from None
        if done.returncode != 0 or not result_path.is_file():
            raise ChildFailed(f"exit {done.returncode}", done.stdout[-3000:] + done.stderr[-5000:])
        return json.loads(result_path.read_text())


def _text(output: bytes | str | None) -> str:
    return output.decode(errors="replace") if isinstance(output, bytes) else output or ""


def serve_child(paths: Sequence[str], run: Callable[[dict[str, Any]], dict[str, Any]]) -> None:
    """The child's side of :func:`run_child`: ``run`` the spec at ``paths[0]``, write the result to ``paths[1]``."""
    for key, value in OFFLINE_ENV.items():
        os.environ.setdefault(key, value)
    spec = json.loads(Path(paths[0]).read_text())
    Path(paths[1]).write_text(json.dumps(run(spec)))
