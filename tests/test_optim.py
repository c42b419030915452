"""GroupwiseOptimizer against torch's AdamW and SGD, the schedules against their formulas, and the parameter
helpers (no-decay split, dropping parameters from optimizers)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from xmc_dst.optim import GroupwiseOptimizer, drop_parameters, schedule_lambda, split_no_decay, stochastic_round


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


# ------------------------------------------------------------------------------ bf16 + stochastic rounding

def _neighbours(value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The bf16 values just below and above every fp32 ``value`` (equal where it is representable)."""
    nearest = value.to(torch.bfloat16)
    up = torch.nextafter(nearest, torch.full_like(nearest, float("inf")))
    down = torch.nextafter(nearest, torch.full_like(nearest, float("-inf")))
    below = torch.where(nearest.float() <= value, nearest, down)
    above = torch.where(nearest.float() >= value, nearest, up)
    return below.float(), above.float()


def test_stochastic_rounding_is_unbiased_and_lands_on_a_neighbour():
    value = torch.randn(64, generator=torch.Generator().manual_seed(0)) * torch.logspace(-6, 4, 64)
    draws = 20_000
    rounded = stochastic_round(value.repeat(draws, 1), torch.Generator().manual_seed(1)).float()
    below, above = _neighbours(value)
    assert bool(((rounded == below) | (rounded == above)).all())
    # each draw is below or above with p = (v - below) / gap: the mean's standard error is at most gap / (2 sqrt(n));
    # 6 standard errors leave a false failure probability below 1e-8 per value
    gap = above - below
    assert bool(((rounded.mean(0) - value).abs() <= 6 * gap / (2 * draws ** 0.5)).all())
    nearest = value.to(torch.bfloat16).float()
    assert not torch.equal(nearest, value)  # the values are not representable: the test can tell the two apart


def test_stochastic_rounding_keeps_representable_and_non_finite_values():
    exact = torch.randn(1000, generator=torch.Generator().manual_seed(2)).to(torch.bfloat16).float()
    special = torch.tensor([0.0, -0.0, float("inf"), float("-inf"), 3.3895313892515355e38])
    for seed in range(5):
        g = torch.Generator().manual_seed(seed)
        assert torch.equal(stochastic_round(exact, g).float(), exact)
        out = stochastic_round(torch.cat([special, torch.tensor([float("nan")])]), g).float()
        assert torch.equal(out[:-1], special) and out[-1].isnan()
    with pytest.raises(TypeError, match="fp32"):
        stochastic_round(exact.double())


def _bf16_rows(rows: int, width: int, seed: int) -> torch.Tensor:
    """``rows`` identical bf16 rows: every row is an independent copy of one parameter for the expectation tests."""
    row = torch.randn(width, generator=torch.Generator().manual_seed(seed)).to(torch.bfloat16)
    return row.repeat(rows, 1)


@pytest.mark.parametrize("algorithm,state_dtype", [("sgd", "float32"), ("sgd", "bfloat16"), ("adamw", "float32")])
def test_bf16_step_is_the_fp32_step_in_expectation(algorithm, state_dtype):
    """Updates are affine in the parameter (and, for SGD, in its momentum), so the mean over independent copies
    rounded stochastically must equal torch's fp32 optimizer on the fp32 copy; torch's optimizer on a bf16 copy
    (round to nearest every step) ends measurably further away, as updates are below a bf16 ulp."""
    rows, width, steps = 20_000, 8, 3
    kwargs = dict(lr=1e-3, weight_decay=0.01) | (dict(momentum=0.9) if algorithm == "sgd" else {})
    param = nn.Parameter(_bf16_rows(rows, width, 0))
    reference = nn.Parameter(param.detach()[0].float().clone())
    nearest = nn.Parameter(param.detach()[0].clone())
    ours = GroupwiseOptimizer([{"params": [param], "algorithm": algorithm, "state_dtype": state_dtype, **kwargs}])
    torch_cls = torch.optim.SGD if algorithm == "sgd" else torch.optim.AdamW
    theirs, rounded_to_nearest = torch_cls([reference], **kwargs), torch_cls([nearest], **kwargs)
    g = torch.Generator().manual_seed(5)
    for _ in range(steps):
        grad = torch.randn(width, generator=g).to(torch.bfloat16)
        param.grad, reference.grad, nearest.grad = grad.repeat(rows, 1), grad.float(), grad.clone()
        for optimizer in (ours, theirs, rounded_to_nearest):
            optimizer.step()
    expected = reference.detach()
    below, above = _neighbours(expected)
    gap = (above - below).clamp(min=torch.finfo(torch.bfloat16).eps * expected.abs())
    error = (param.detach().float().mean(0) - expected).abs()
    assert bool((error <= 6 * steps ** 0.5 * gap / (2 * rows ** 0.5)).all())
    assert (nearest.detach().float() - expected).abs().max() > 10 * error.max()
    state = ours.state[param]
    buffers = ("momentum_buffer",) if algorithm == "sgd" else ("exp_avg", "exp_avg_sq")
    assert all(state[name].dtype == getattr(torch, state_dtype) for name in buffers)


def _bf16_training(seed: int, steps: int, optimizer=None, param=None):
    param = param if param is not None else nn.Parameter(_bf16_rows(4, 50, 3))
    optimizer = optimizer or GroupwiseOptimizer([{"params": [param], "algorithm": "adamw", "lr": 1e-2,
                                                  "rounding_seed": seed}])
    for _ in range(steps):  # the gradient of step t depends on t only
        g = torch.Generator().manual_seed(100 + int(optimizer.state[param].get("step", 0)))
        param.grad = torch.randn(param.shape, generator=g).to(torch.bfloat16)
        optimizer.step()
    return param, optimizer


def test_bf16_rounding_is_deterministic_under_a_seed_and_resumes_bit_exactly():
    a, _ = _bf16_training(seed=7, steps=6)
    b, _ = _bf16_training(seed=7, steps=6)
    c, _ = _bf16_training(seed=8, steps=6)
    assert torch.equal(a, b) and not torch.equal(a, c)
    half, optimizer = _bf16_training(seed=7, steps=3)
    saved = {"param": half.detach().clone(), "optimizer": optimizer.state_dict()}
    resumed = nn.Parameter(saved["param"])
    clone = GroupwiseOptimizer([{"params": [resumed], "algorithm": "adamw", "lr": 1e-2, "rounding_seed": 7}])
    clone.load_state_dict(saved["optimizer"])
    assert clone.state[resumed]["exp_avg"].dtype == torch.float32  # not cast to the parameter's bf16
    assert clone.state[resumed]["rounding_state"].dtype == torch.uint8
    resumed, _ = _bf16_training(seed=7, steps=3, optimizer=clone, param=resumed)
    assert torch.equal(resumed, a)


def test_bad_state_dtype_and_parameter_dtype():
    with pytest.raises(ValueError, match="state_dtype"):
        GroupwiseOptimizer([nn.Parameter(torch.zeros(2))], state_dtype="float16")
    with pytest.raises(TypeError, match="fp32, fp64 or bf16"):
        GroupwiseOptimizer([nn.Parameter(torch.zeros(2, dtype=torch.float16))])
