"""The model's parts given as factories: a class, a keyword-only ``functools.partial`` of one, or the
``{"class_path", "init_args"}`` dict that a LightningCLI yaml and a checkpoint's hyperparameters hold.

The encoder (:mod:`xmc_dst.encoders`) and the label head (:mod:`xmc_dst.heads`) are both given this way, so that a
config names each part once and the model calls it with what only the model knows (the data's tokenizer, the width
of the layer below). These two functions convert between the forms.
"""

from __future__ import annotations

import functools
import importlib
from collections.abc import Callable, Mapping
from typing import Any

__all__ = ["factory_spec", "resolve_factory"]


def resolve_factory(factory: Any, what: str = "encoder") -> Callable[..., Any]:
    """The factory itself, or built from a ``{"class_path", "init_args"}`` dict; ``what`` names it in errors."""
    if isinstance(factory, Mapping):
        module, _, name = str(factory["class_path"]).rpartition(".")
        cls = getattr(importlib.import_module(module), name)
        return functools.partial(cls, **dict(factory.get("init_args") or {}))
    if not callable(factory):
        raise TypeError(f"{what} must be a class, a functools.partial of one or a class_path dict; "
                        f"got {type(factory).__name__}")
    return factory


def factory_spec(factory: Any) -> dict[str, Any] | None:
    """``{"class_path", "init_args"}`` of a class or ``functools.partial`` of a class with keyword arguments only;
    None for anything else."""
    func, kwargs = factory, {}
    if isinstance(factory, functools.partial):
        if factory.args:
            return None
        func, kwargs = factory.func, dict(factory.keywords)
    if not isinstance(func, type):
        return None
    return {"class_path": f"{func.__module__}.{func.__qualname__}", "init_args": kwargs}
