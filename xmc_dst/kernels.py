"""Build and load the optional C kernels of the fixed fan-in layer (``csrc/fixed_fan_in.c``).

The kernels are compiled on first use with the system C compiler (``$CC``, else ``cc``/``gcc``) into a per-user cache,
keyed by the source, the flags and the CPU, and loaded with :mod:`ctypes`: no build step at install time and no extra
package. Where no compiler is found or the build fails, :func:`load_kernels` returns ``None`` once with a warning and
the layer uses its pure-PyTorch paths. ``XMC_DST_DISABLE_KERNELS=1`` turns the kernels off.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import warnings
from functools import lru_cache
from pathlib import Path

from xmc_dst import paths

SOURCE = Path(__file__).with_name("csrc") / "fixed_fan_in.c"
FLAGS = ["-O3", "-march=native", "-fopenmp", "-ffp-contract=fast", "-shared", "-fPIC", "-std=gnu11"]


def cache_dir() -> Path:
    """Where built kernels live: ``kernels`` under the project's cache root (:mod:`xmc_dst.paths`)."""
    return paths.cache_dir("kernels")


def _cpu_signature() -> str:
    """The CPU model and flags, so a cache shared across machines never runs ``-march=native`` code elsewhere."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        wanted = [ln for ln in lines if ln.startswith(("model name", "flags", "Features"))][:2]
        return "\n".join(wanted)
    except OSError:
        return platform.processor()


def _compiler() -> str | None:
    for name in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if name and shutil.which(name):
            return name
    return None


def _build(compiler: str, target: Path) -> None:
    """Compile into a temporary file and rename it into place, so a crash never leaves half a library."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        subprocess.run([compiler, *FLAGS, str(SOURCE), "-o", tmp], check=True, capture_output=True, text=True)
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _declare(lib: ctypes.CDLL) -> None:
    p, i64, c_int = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    for suffix in ("f32", "f64"):
        fwd = getattr(lib, f"ffi_forward_{suffix}")
        fwd.argtypes = [p, p, p, p, p, i64, i64, i64, i64, i64, c_int]
        fwd.restype = None
        bwd = getattr(lib, f"ffi_backward_{suffix}")
        bwd.argtypes = [p, p, p, p, p, p, i64, i64, i64, i64, i64, i64, c_int]
        bwd.restype = None
    for suffix in ("f32", "f64"):
        fwd = getattr(lib, f"ffi_grouped_forward_{suffix}")
        fwd.argtypes = [p, p, c_int, p, p, p, p, i64, i64, i64, i64, c_int]
        fwd.restype = None
        bwd = getattr(lib, f"ffi_grouped_backward_{suffix}")
        bwd.argtypes = [p, p, c_int, p, p, p, p, p, p, i64, i64, i64, i64, i64, c_int]
        bwd.restype = None
    lib.ffi_regrow.argtypes = [p, p, i64, i64, i64, ctypes.c_uint64, c_int, p, p, c_int]
    lib.ffi_regrow.restype = c_int
    lib.ffi_prune_f32.argtypes = [p, i64, i64, c_int, ctypes.c_float, i64, p, c_int]
    lib.ffi_prune_f32.restype = None


HUGE_PAGE = 1 << 21
MADV_HUGEPAGE = 14  # <sys/mman.h> on Linux


@lru_cache(maxsize=1)
def _libc() -> ctypes.CDLL | None:
    if platform.system() != "Linux":
        return None
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
    except OSError:
        return None
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    libc.madvise.restype = ctypes.c_int
    return libc


def advise_huge_pages(tensor) -> bool:
    """Ask Linux to back a new, not yet written CPU tensor with transparent huge pages (``madvise``), so a kernel's
    first write into a [labels, batch] output takes one fault per 2 MB instead of one per 4 KB: at 670K labels x 64
    that halves the cost of a fresh 171 MB output. A hint: False (and nothing changes) where it cannot be given."""
    libc = _libc()
    if libc is None or tensor.device.type != "cpu":
        return False
    start = tensor.data_ptr()
    end = start + tensor.numel() * tensor.element_size()
    first, last = (start + HUGE_PAGE - 1) & ~(HUGE_PAGE - 1), end & ~(HUGE_PAGE - 1)
    return last > first and libc.madvise(first, last - first, MADV_HUGEPAGE) == 0


@lru_cache(maxsize=1)
def load_kernels() -> ctypes.CDLL | None:
    """The compiled kernel library, building it if needed; ``None`` where it cannot be had (with one warning)."""
    if os.environ.get("XMC_DST_DISABLE_KERNELS", "0") not in ("", "0"):
        return None
    compiler = _compiler()
    if compiler is None:
        warnings.warn("xmc_dst: no C compiler found; the fixed fan-in layer uses its PyTorch paths", stacklevel=2)
        return None
    key = hashlib.sha256(
        SOURCE.read_bytes() + " ".join([compiler, *FLAGS]).encode() + _cpu_signature().encode()
    ).hexdigest()[:16]
    target = cache_dir() / f"fixed_fan_in-{key}.so"
    try:
        if not target.exists():
            _build(compiler, target)
        lib = ctypes.CDLL(str(target))
        _declare(lib)
        return lib
    except (OSError, subprocess.CalledProcessError, AttributeError) as err:
        detail = getattr(err, "stderr", "") or str(err)
        warnings.warn(f"xmc_dst: building the CPU kernels failed ({detail.strip()[:500]}); using PyTorch paths",
                      stacklevel=2)
        return None
