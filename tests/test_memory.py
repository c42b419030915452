"""Static bytes per part of a live model (xmc_dst.memory) against hand counts."""

from __future__ import annotations

from torch import nn

from xmc_dst.memory import static_breakdown


def test_static_breakdown_counts_shared_parameters_once():
    shared = nn.Linear(3, 3)
    model = nn.Module()
    model.a, model.b = shared, shared
    parts = static_breakdown(model)
    assert list(parts) == ["a"] and parts["a"].params == 12 * 4
