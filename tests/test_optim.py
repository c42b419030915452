"""GroupwiseOptimizer against torch's AdamW and SGD, the schedules against their formulas, and the parameter
helpers (no-decay split, dropping parameters from optimizers)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from xmc_dst.optim import GroupwiseOptimizer, drop_parameters, schedule_lambda, split_no_decay


def _params(seed: int, shapes=((5, 3), (3,), (4, 2))) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*shape, generator=g, dtype=torch.float64) for shape in shapes]


def _run(optimizer_factory, steps: int = 6, seed: int = 0) -> list[torch.Tensor]:
    params = [nn.Parameter(p) for p in _params(seed)]
    optimizer = optimizer_factory(params)
    g = torch.Generator().manual_seed(seed + 100)
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=g, dtype=torch.float64)
        optimizer.step()
    return [p.detach() for p in params]


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_adamw_groups_match_torch_adamw(weight_decay):
    kwargs = dict(lr=0.05, betas=(0.8, 0.95), eps=1e-6, weight_decay=weight_decay)
    ours = _run(lambda ps: GroupwiseOptimizer([{"params": ps, "algorithm": "adamw", **kwargs}]))
    reference = _run(lambda ps: torch.optim.AdamW(ps, **kwargs))
    for a, b in zip(ours, reference, strict=True):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("nesterov,dampening,weight_decay", [(False, 0.0, 0.0), (True, 0.0, 0.01),
                                                            (False, 0.3, 0.05)])
def test_sgd_groups_match_torch_sgd(nesterov, dampening, weight_decay):
    kwargs = dict(lr=0.1, momentum=0.9, nesterov=nesterov, dampening=dampening, weight_decay=weight_decay)
    ours = _run(lambda ps: GroupwiseOptimizer([{"params": ps, "algorithm": "sgd", **kwargs}]))
    reference = _run(lambda ps: torch.optim.SGD(ps, **kwargs))
    for a, b in zip(ours, reference, strict=True):
        torch.testing.assert_close(a, b)


def test_mixed_groups_update_like_two_torch_optimizers():
    adam_kwargs, sgd_kwargs = dict(lr=0.01, weight_decay=0.01), dict(lr=0.2, momentum=0.5, weight_decay=1e-3)

    def ours(ps):
        return GroupwiseOptimizer([{"params": ps[:2], "algorithm": "adamw", **adam_kwargs},
                                   {"params": ps[2:], "algorithm": "sgd", **sgd_kwargs}])

    class Two:
        def __init__(self, ps):
            self.a, self.b = torch.optim.AdamW(ps[:2], **adam_kwargs), torch.optim.SGD(ps[2:], **sgd_kwargs)

        def step(self):
            self.a.step()
            self.b.step()

    for a, b in zip(_run(ours), _run(Two), strict=True):
        torch.testing.assert_close(a, b)


@pytest.mark.gpu
def test_groupwise_optimizer_on_cuda_matches_torch():
    def run(factory):
        params = [nn.Parameter(p.float().cuda()) for p in _params(3)]
        optimizer = factory(params)
        g = torch.Generator().manual_seed(7)
        for _ in range(5):
            for p in params:
                p.grad = torch.randn(p.shape, generator=g).cuda()
            optimizer.step()
        return [p.detach().cpu() for p in params]

    ours = run(lambda ps: GroupwiseOptimizer([{"params": ps[:2], "algorithm": "adamw", "lr": 0.01,
                                               "weight_decay": 0.01},
                                              {"params": ps[2:], "algorithm": "sgd", "lr": 0.1, "momentum": 0.9}]))

    class Two:
        def __init__(self, ps):
            self.a = torch.optim.AdamW(ps[:2], lr=0.01, weight_decay=0.01)
            self.b = torch.optim.SGD(ps[2:], lr=0.1, momentum=0.9)

        def step(self):
            self.a.step()
            self.b.step()

    for a, b in zip(ours, run(Two), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_optimizer_state_roundtrip_and_names():
    params = [nn.Parameter(p) for p in _params(1)]
    opt = GroupwiseOptimizer([{"params": params[:2], "algorithm": "adamw"},
                              {"params": params[2:], "algorithm": "sgd", "momentum": 0.9}], lr=0.1)
    for p in params:
        p.grad = torch.ones_like(p)
    opt.step()
    assert set(opt.state[params[0]]) == {"step", "exp_avg", "exp_avg_sq"}
    assert set(opt.state[params[2]]) == {"momentum_buffer"}
    clone = GroupwiseOptimizer([{"params": params[:2], "algorithm": "adamw"},
                                {"params": params[2:], "algorithm": "sgd", "momentum": 0.9}], lr=0.1)
    clone.load_state_dict(opt.state_dict())
    torch.testing.assert_close(clone.state[params[0]]["exp_avg"], opt.state[params[0]]["exp_avg"])
    with pytest.raises(ValueError, match="algorithm"):
        GroupwiseOptimizer([{"params": params, "algorithm": "lion"}])


def test_schedules():
    cosine = schedule_lambda("cosine", warmup_steps=4, total_steps=14)
    assert [round(cosine(s), 6) for s in range(4)] == [0.2, 0.4, 0.6, 0.8]
    assert cosine(4) == pytest.approx(1.0)
    assert cosine(9) == pytest.approx(0.5)  # half-way through the decay
    assert cosine(14) == pytest.approx(0.0) and cosine(100) == pytest.approx(0.0)
    linear = schedule_lambda("linear", warmup_steps=0, total_steps=10)
    assert [linear(s) for s in (0, 5, 10)] == pytest.approx([1.0, 0.5, 0.0])
    assert schedule_lambda("constant", 2, 10)(9) == 1.0
    with pytest.raises(ValueError):
        schedule_lambda("step", 0, 1)


def test_split_no_decay_exempts_biases_and_norms():
    model = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4), nn.Linear(4, 2, bias=False))
    model[2].weight.requires_grad_(False)
    decay, no_decay = split_no_decay(model.named_parameters())
    assert [id(p) for p in decay] == [id(model[0].weight)]
    assert {id(p) for p in no_decay} == {id(model[0].bias), id(model[1].weight), id(model[1].bias)}


def test_drop_parameters_removes_groups_entries_and_state() -> None:
    keep, gone = torch.nn.Linear(3, 2), torch.nn.Linear(3, 4)
    opt_a = torch.optim.Adam([{"params": keep.parameters()}, {"params": gone.parameters()}])
    opt_b = torch.optim.SGD(gone.parameters(), lr=0.1, momentum=0.9)
    (keep(torch.ones(1, 3)).sum() + gone(torch.ones(1, 3)).sum()).backward()
    opt_a.step()
    opt_b.step()
    assert drop_parameters([opt_a, opt_b], gone.parameters()) == 4
    assert [len(g["params"]) for g in opt_a.param_groups] == [2, 0] and opt_b.param_groups[0]["params"] == []
    assert set(map(id, opt_a.state)) == set(map(id, keep.parameters())) and not opt_b.state
