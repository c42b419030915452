"""One optimizer whose parameter groups each run AdamW or SGD, and per-group warmup + decay schedules.

Why one optimizer and not two. The paper trains the encoder with AdamW and the head with its own optimizer (SGD with
momentum or AdamW), learning rate and schedule; the authors' loop steps two optimizers by hand. In Lightning two
optimizers mean manual optimisation, and then gradient accumulation, gradient clipping, the AMP ``GradScaler``
(``16-mixed``: unscale, skip the step on inf/NaN) and the strategies' hooks all have to be re-done by hand in
``training_step``. :class:`GroupwiseOptimizer` is a single ``torch.optim.Optimizer`` whose groups carry their own
``algorithm`` (``adamw`` or ``sgd``), ``lr``, ``weight_decay`` and momentum, so automatic optimisation keeps all of
that, and one ``LambdaLR`` with one lambda per group gives every group its own warmup and schedule. The state names
follow torch's (``exp_avg``, ``exp_avg_sq``, ``momentum_buffer``), so :func:`xmc_dst.sparse.reset_optimizer_state`
moves them with rewired connections.

The update rules are those of ``torch.optim.AdamW`` (decoupled decay, bias correction, no amsgrad) and
``torch.optim.SGD`` (coupled decay, momentum with dampening, optional Nesterov); the tests check both against torch.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any, Literal

import torch
from torch import Tensor

Algorithm = Literal["adamw", "sgd"]
Schedule = Literal["cosine", "linear", "constant"]
ALGORITHMS = ("adamw", "sgd")
SCHEDULES = ("cosine", "linear", "constant")

__all__ = ["GroupwiseOptimizer", "cosine_decay", "drop_parameters", "schedule_lambda", "split_no_decay",
           "NO_DECAY_KEYS"]

# Parameter names that get no weight decay (the authors': bias, LayerNorm.weight, LayerNorm.bias); any parameter
# with fewer than two dimensions is exempt too, which covers other spellings of norm layers.
NO_DECAY_KEYS = ("bias", "LayerNorm.weight", "LayerNorm.bias", "layer_norm", "layernorm")


class GroupwiseOptimizer(torch.optim.Optimizer):
    """AdamW or SGD per parameter group, in one optimizer.

    Args:
        params: parameters or parameter groups (dicts); a group may set any of the options below.
        algorithm: ``adamw`` or ``sgd`` (default for groups that do not set it).
        lr, weight_decay: as in torch (AdamW: decoupled decay ``p -= lr * wd * p``; SGD: ``g += wd * p``).
        betas, eps: AdamW moments and denominator epsilon.
        momentum, dampening, nesterov: SGD momentum (0 disables it).
    """

    def __init__(self, params: Iterable[Tensor] | Iterable[dict[str, Any]], algorithm: Algorithm = "adamw",
                 lr: float = 1e-3, weight_decay: float = 0.0, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, momentum: float = 0.9, dampening: float = 0.0, nesterov: bool = False) -> None:
        if algorithm not in ALGORITHMS:
            raise ValueError(f"algorithm must be one of {ALGORITHMS}, got {algorithm!r}")
        if lr < 0 or weight_decay < 0 or eps < 0 or momentum < 0:
            raise ValueError("lr, weight_decay, eps and momentum must be non-negative")
        defaults = dict(algorithm=algorithm, lr=lr, weight_decay=weight_decay, betas=tuple(betas), eps=eps,
                        momentum=momentum, dampening=dampening, nesterov=nesterov)
        super().__init__(params, defaults)
        for group in self.param_groups:
            if group["algorithm"] not in ALGORITHMS:
                raise ValueError(f"algorithm must be one of {ALGORITHMS}, got {group['algorithm']!r}")

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """One update of every group by its own algorithm."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            sparse = [p for p in params if p.grad.is_sparse]
            if sparse:
                if group["algorithm"] != "adamw" or len(sparse) != len(params):
                    raise RuntimeError(f"group {group.get('name', '?')!r}: sparse gradients need an adamw group of "
                                       "sparse-gradient parameters only")
                for p in sparse:
                    self._lazy_adamw(group, p)
            elif group["algorithm"] == "adamw":
                self._adamw(group, params)
            else:
                self._sgd(group, params)
        return loss

    def _adamw(self, group: dict[str, Any], params: list[Tensor]) -> None:
        beta1, beta2 = group["betas"]
        lr, wd, eps = group["lr"], group["weight_decay"], group["eps"]
        grads, exp_avgs, exp_avg_sqs, steps = [], [], [], []
        for p in params:
            state = self.state[p]
            if not state:
                state["step"] = 0
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["step"] += 1
            grads.append(p.grad)
            exp_avgs.append(state["exp_avg"])
            exp_avg_sqs.append(state["exp_avg_sq"])
            steps.append(state["step"])
        if wd != 0:
            torch._foreach_mul_(params, 1.0 - lr * wd)
        torch._foreach_lerp_(exp_avgs, grads, 1.0 - beta1)
        torch._foreach_mul_(exp_avg_sqs, beta2)
        torch._foreach_addcmul_(exp_avg_sqs, grads, grads, value=1.0 - beta2)
        denom = torch._foreach_sqrt(exp_avg_sqs)
        torch._foreach_div_(denom, [math.sqrt(1.0 - beta2**s) for s in steps])
        torch._foreach_add_(denom, eps)
        torch._foreach_addcdiv_(params, exp_avgs, denom, [-lr / (1.0 - beta1**s) for s in steps])

    def _lazy_adamw(self, group: dict[str, Any], p: Tensor) -> None:
        """AdamW on the rows a sparse gradient touches (``torch.optim.SparseAdam``'s rule, plus decoupled decay of
        those rows): rows a step does not touch keep their values and moments, so a large embedding table costs the
        rows of the batch per step, not the whole table."""
        beta1, beta2 = group["betas"]
        lr, wd, eps = group["lr"], group["weight_decay"], group["eps"]
        state = self.state[p]
        if not state:
            state["step"] = 0
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        state["step"] += 1
        grad = p.grad.coalesce()
        rows, values = grad.indices()[0], grad.values()
        exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
        avg = exp_avg[rows].lerp_(values, 1.0 - beta1)
        avg_sq = exp_avg_sq[rows].mul_(beta2).addcmul_(values, values, value=1.0 - beta2)
        exp_avg[rows], exp_avg_sq[rows] = avg, avg_sq
        step = state["step"]
        denom = avg_sq.sqrt_().div_(math.sqrt(1.0 - beta2**step)).add_(eps)
        current = p[rows]
        if wd != 0:
            current.mul_(1.0 - lr * wd)
        p[rows] = current.addcdiv_(avg, denom, value=-lr / (1.0 - beta1**step))

    def _sgd(self, group: dict[str, Any], params: list[Tensor]) -> None:
        lr, wd = group["lr"], group["weight_decay"]
        momentum, dampening, nesterov = group["momentum"], group["dampening"], group["nesterov"]
        grads = [p.grad for p in params]
        if wd != 0:
            grads = torch._foreach_add(grads, params, alpha=wd)
        if momentum != 0:
            updates = []
            for p, g in zip(params, grads, strict=True):
                state = self.state[p]
                buf = state.get("momentum_buffer")
                if buf is None:
                    buf = state["momentum_buffer"] = g.detach().clone()
                else:
                    buf.mul_(momentum).add_(g, alpha=1.0 - dampening)
                updates.append(g.add(buf, alpha=momentum) if nesterov else buf)
            grads = updates
        torch._foreach_add_(params, grads, alpha=-lr)


def schedule_lambda(schedule: Schedule, warmup_steps: int, total_steps: int,
                    min_ratio: float = 0.0) -> Callable[[int], float]:
    """Learning-rate factor per optimizer step: linear warmup from 0 over ``warmup_steps``, then decay to
    ``min_ratio`` at ``total_steps`` (``cosine`` half-wave or ``linear``) or hold (``constant``).

    After warmup the cosine is that of ``transformers.get_cosine_schedule_with_warmup``, which the authors use; the
    warmup starts at ``1 / (warmup_steps + 1)`` rather than 0, so that the first step is not wasted.
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
    warmup_steps, total_steps = max(0, int(warmup_steps)), max(1, int(total_steps))

    def factor(step: int) -> float:
        if step < warmup_steps:
            return float(step + 1) / float(warmup_steps + 1)
        if schedule == "constant":
            return 1.0
        t, length = step - warmup_steps, max(1, total_steps - warmup_steps)
        if schedule == "cosine":
            return cosine_decay(1.0, min_ratio, t, length)
        return min_ratio + (1.0 - min_ratio) * (1.0 - min(1.0, t / length))

    return factor


def cosine_decay(initial: float, floor: float, t: float, total: float) -> float:
    """The half cosine from ``initial`` at ``t = 0`` to ``floor`` at ``t = total`` (``t`` clamped to that range):
    ``floor + (initial - floor) * (1 + cos(pi * t / total)) / 2``. The one formula behind the cosine learning-rate
    schedule, the DST threshold and drop-fraction schedules and the auxiliary loss weight."""
    total = max(total, 1)
    progress = min(max(t, 0), total) / total
    return floor + (initial - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def split_no_decay(named_params: Iterable[tuple[str, Tensor]],
                   keys: tuple[str, ...] = NO_DECAY_KEYS) -> tuple[list[Tensor], list[Tensor]]:
    """Split trainable parameters into (decayed, not decayed): biases, norm weights and all 1-d parameters."""
    decay, no_decay = [], []
    for name, param in named_params:
        if not param.requires_grad:
            continue
        (no_decay if param.ndim < 2 or any(key in name for key in keys) else decay).append(param)
    return decay, no_decay


def drop_parameters(optimizers: Iterable[torch.optim.Optimizer], params: Iterable[Tensor]) -> int:
    """Remove ``params`` from every optimizer: from its parameter groups and from its state, so that the tensors can
    be freed (what an auxiliary head's removal needs). Empty groups stay, keeping the optimizer's layout for
    checkpoints. Returns how many (optimizer, parameter) entries were removed."""
    gone = {id(p) for p in params}
    removed = 0
    for optimizer in optimizers:
        for group in optimizer.param_groups:
            kept = [p for p in group["params"] if id(p) not in gone]
            removed += len(group["params"]) - len(kept)
            for p in group["params"]:
                if id(p) in gone:
                    optimizer.state.pop(p, None)
            group["params"] = kept
    return removed
