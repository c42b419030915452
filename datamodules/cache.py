"""On-disk cache of tokenised splits: where it lives, how it is keyed, and how it is written atomically.

A cache directory is ``<root>/<dataset>/<fingerprint>`` (default root: :func:`xmc_dst.paths.cache_root`). The
fingerprint hashes everything the cached content depends on (source files by path, size and mtime; the tokenizer by
the content of its serialised form; max_length; the cache format version), so a change to any of them selects a new
directory and the old one is simply not used.

A directory is built under a temporary name beside its final place and moved there with ``os.replace`` only once
complete: after a crash there is either a whole cache or none (plus a ``.tmp-*`` folder that the next build of
the same fingerprint removes). A file lock keeps two processes on one machine from tokenising the same thing twice.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import socket
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from filelock import FileLock


def file_signature(path: Path) -> dict[str, Any]:
    """Identify a source file cheaply: absolute path, size and modification time."""
    stat = path.stat()
    return {"path": str(path.resolve()), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def fingerprint(parts: dict[str, Any]) -> str:
    """A short stable hash of JSON-serialisable ``parts``."""
    blob = json.dumps(parts, sort_keys=True, default=str).encode("utf-8")
    return hashlib.sha256(blob).hexdigest()[:20]


def tokenizer_signature(tokenizer: Any, name: str) -> dict[str, Any]:
    """Identify a tokenizer by content: the hash of its serialised fast tokenizer, class and truncation side."""
    content = tokenizer.backend_tokenizer.to_str()
    return {
        "name": name,
        "class": type(tokenizer).__name__,
        "truncation_side": getattr(tokenizer, "truncation_side", "right"),
        "sha256": hashlib.sha256(content.encode("utf-8")).hexdigest(),
    }


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove_stale_temporaries(final: Path) -> None:
    """Remove ``.tmp-<name>-<host>-<pid>-*`` folders left by dead processes of this host."""
    host = socket.gethostname()
    for tmp in final.parent.glob(f".tmp-{final.name}-{host}-*"):
        try:
            pid = int(tmp.name[len(f".tmp-{final.name}-{host}-") :].split("-")[0])
        except ValueError:
            continue
        if not _pid_alive(pid):
            shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def atomic_directory(final: Path) -> Iterator[Path]:
    """Yield an empty temporary directory that becomes ``final`` if the block completes, and vanishes otherwise."""
    final.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temporaries(final)
    tmp = final.parent / f".tmp-{final.name}-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        yield tmp
        try:
            os.replace(tmp, final)
        except OSError:
            if not final.is_dir():  # not a lost race with another builder: a real error
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def build_lock(final: Path) -> FileLock:
    """An inter-process lock guarding the build of ``final``."""
    final.parent.mkdir(parents=True, exist_ok=True)
    return FileLock(str(final.parent / f".{final.name}.lock"))
