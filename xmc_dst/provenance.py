"""Where a figure comes from: the commit and the machine, stamped on every benchmark table and plot.

One place for the benchmark scripts (``benchmarks/*.py``) so that their tables name the machine and the commit in
the same words.
"""

from __future__ import annotations

import os
import platform
import subprocess
from pathlib import Path

__all__ = ["cpu_model", "git_commit", "machine"]

ROOT = Path(__file__).resolve().parents[1]


def git_commit(short: bool = True, cwd: Path = ROOT) -> str:
    """The checked-out commit of the repository (``unknown`` outside a git checkout)."""
    command = ["git", "rev-parse", *(["--short"] if short else []), "HEAD"]
    try:
        return subprocess.run(command, cwd=cwd, capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def cpu_model() -> str:
    """CPU model name with family/model numbers (the name alone is "AMD EPYC" in some VMs)."""
    info: dict[str, str] = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            info.setdefault(key.strip(), value.strip())
    except OSError:
        return platform.processor() or platform.machine()
    name = info.get("model name", platform.processor() or platform.machine())
    return f"{name} (family {info.get('cpu family', '?')}, model {info.get('model', '?')})"


def machine() -> str:
    """One line: CPU model, core count, operating system."""
    return f"{cpu_model()}, {os.cpu_count()} cores, {platform.system()}"
