"""Reading a LightningCLI yaml outside the LightningCLI (``estimate-memory``, ``data-info``): one check, one message.

A missing, empty or non-mapping config fails here with the file's name, so the extra subcommands report it as the
Lightning ones do (``xmc-dst: error: ...``, exit status 2) instead of a ``KeyError`` or ``AttributeError`` deep
inside.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

__all__ = ["read_config"]


def read_config(path: str | Path, command: str) -> dict[str, Any]:
    """The sections of the yaml at ``path`` (``model``, ``data``, ``trainer``, ...) as a dict."""
    import yaml

    path = Path(path)
    if not path.is_file():
        state = "is a folder, not a file" if path.is_dir() else "does not exist"
        raise FileNotFoundError(f"{command}: config {path} {state}: pass a LightningCLI yaml, e.g. configs/bibtex.yaml")
    try:
        text = path.read_text(encoding="utf-8-sig")  # a byte-order mark is not part of the yaml
        config = yaml.safe_load(text)
    except (UnicodeDecodeError, yaml.YAMLError) as error:
        raise ValueError(f"{command}: config {path} is not UTF-8 YAML: {str(error).splitlines()[0]}") from None
    if config is None:
        raise ValueError(f"{command}: config {path} is empty: expected the model and data sections of a LightningCLI "
                         "yaml (see configs/)")
    if not isinstance(config, dict):
        raise ValueError(f"{command}: config {path} holds a {type(config).__name__}, not the sections of a "
                         "LightningCLI yaml (model:, data:, trainer:)")
    return config
