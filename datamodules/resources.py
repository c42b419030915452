"""The error of a data folder that lacks what its layout needs (where shipped data and the default tokenizer live is
:mod:`xmc_dst.paths`)."""

from __future__ import annotations

from pathlib import Path


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
