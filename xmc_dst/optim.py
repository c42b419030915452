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

bf16 parameters (a head stored in bf16, HASTE's choice) take the same rules computed in fp32, and the result is
rounded back to bf16 *stochastically* (:func:`stochastic_round`): round-to-nearest would drop every update smaller
than half a bf16 ulp (2**-9 of the weight), i.e. most of a small learning rate's steps, while stochastic rounding
keeps them in expectation. The momentum / moments are kept in the group's ``state_dtype`` (``float32``, or
``bfloat16``, rounded stochastically too). Each such parameter draws from its own generator, seeded from the
group's ``rounding_seed`` and the parameter's place in the group; its state (``rounding_state``) is optimizer state,
so checkpoints resume the same roundings bit for bit.
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
           "stochastic_round", "NO_DECAY_KEYS", "STATE_DTYPES"]

STATE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
# Elements of a bf16 parameter updated at a time: bounds the fp32 temporaries of its step (2**22: 16 MB each) while
# keeping the number of elementwise kernels per step small (each one is a fork/join of the intra-op threads).
LOW_PRECISION_CHUNK = 1 << 22
# Bytes per element of the temporaries of one chunk of that step: fp32 value, gradient, up to two moments, the int32
# rounding noise and bit pattern, the rounded bf16 result.
LOW_PRECISION_TEMPORARY_BYTES = 4 * 6 + 2
# Low 16 bits of an fp32 value: what bf16 drops.
_BF16_DROPPED_BITS = 16


def stochastic_round(value: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """fp32 ``value`` rounded to bf16 stochastically: up to the next bf16 value with probability equal to the
    dropped fraction of the gap, down otherwise, so ``E[round(v)] = v``; bf16-representable values (zeros and
    infinities included) come back unchanged, NaN stays NaN.

    A uniform random integer below ``2**16`` is added to the fp32 bit pattern and the low 16 bits are cleared: the
    carry into bit 16 happens exactly with probability (dropped bits) / ``2**16``. The sign-magnitude layout makes this
    round the magnitude, so it is symmetric in the sign. An infinity has no dropped bits, so it never carries.
    """
    if value.dtype != torch.float32:
        raise TypeError(f"stochastic_round takes fp32 values, got {value.dtype}")
    return _stochastic_round_(value.clone(memory_format=torch.contiguous_format), generator)


def _stochastic_round_(value: Tensor, generator: torch.Generator | None) -> Tensor:
    """:func:`stochastic_round` overwriting its contiguous fp32 argument (four passes over it, no fp32 copy)."""
    nan = torch.isnan(value)  # a NaN payload near the top could carry into the sign bit
    bits = value.view(torch.int32)
    bits.add_(torch.randint(0, 1 << _BF16_DROPPED_BITS, value.shape, generator=generator, device=value.device,
                            dtype=torch.int32)).bitwise_and_(-(1 << _BF16_DROPPED_BITS))
    return value.masked_fill_(nan, float("nan")).to(torch.bfloat16)


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
                 eps: float = 1e-8, momentum: float = 0.9, dampening: float = 0.0, nesterov: bool = False,
                 state_dtype: str = "float32", rounding_seed: int = 0) -> None:
        if algorithm not in ALGORITHMS:
            raise ValueError(f"algorithm must be one of {ALGORITHMS}, got {algorithm!r}")
        if lr < 0 or weight_decay < 0 or eps < 0 or momentum < 0:
            raise ValueError("lr, weight_decay, eps and momentum must be non-negative")
        defaults = dict(algorithm=algorithm, lr=lr, weight_decay=weight_decay, betas=tuple(betas), eps=eps,
                        momentum=momentum, dampening=dampening, nesterov=nesterov, state_dtype=state_dtype,
                        rounding_seed=rounding_seed)
        super().__init__(params, defaults)
        self._generators: dict[int, torch.Generator] = {}
        for group in self.param_groups:
            if group["algorithm"] not in ALGORITHMS:
                raise ValueError(f"algorithm must be one of {ALGORITHMS}, got {group['algorithm']!r}")
            if group["state_dtype"] not in STATE_DTYPES:
                raise ValueError(f"state_dtype must be one of {tuple(STATE_DTYPES)}, got {group['state_dtype']!r}")
            for p in group["params"]:
                if p.dtype not in (torch.float32, torch.float64, torch.bfloat16):
                    raise TypeError(f"group {group.get('name', '?')!r}: parameters must be fp32, fp64 or bf16 "
                                    f"(bf16 with stochastic rounding), got {p.dtype}")

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
            else:
                low = [p for p in params if p.dtype == torch.bfloat16]
                full = [p for p in params if p.dtype != torch.bfloat16]
                for p in low:
                    self._low_precision(group, p)
                if full and group["algorithm"] == "adamw":
                    self._adamw(group, full)
                elif full:
                    self._sgd(group, full)
        return loss

    def _generator(self, group: dict[str, Any], p: Tensor) -> torch.Generator:
        """The rounding generator of ``p``, at the state its optimizer state holds (set after a checkpoint load)."""
        generator = self._generators.get(id(p))
        if generator is None:
            generator = torch.Generator(device=p.device)
            state = self.state[p].get("rounding_state")
            if state is None:
                place = next(i for i, q in enumerate(group["params"]) if q is p)
                generator.manual_seed(int(group["rounding_seed"]) * 1_000_003 + place)
            else:
                generator.set_state(state.cpu())
            self._generators[id(p)] = generator
        return generator

    def _low_precision(self, group: dict[str, Any], p: Tensor) -> None:
        """One AdamW or SGD step of a bf16 parameter: fp32 arithmetic, stochastic rounding back to bf16 (parameter
        and, with ``state_dtype=bfloat16``, its state), a chunk of :data:`LOW_PRECISION_CHUNK` elements at a time."""
        state, generator = self.state[p], self._generator(group, p)
        dtype = STATE_DTYPES[group["state_dtype"]]
        adamw = group["algorithm"] == "adamw"
        names = ("exp_avg", "exp_avg_sq") if adamw else (("momentum_buffer",) if group["momentum"] != 0 else ())
        fresh = any(name not in state for name in names)
        for name in names:
            state.setdefault(name, torch.zeros_like(p, dtype=dtype, memory_format=torch.contiguous_format))
        if adamw:
            state["step"] = state.get("step", 0) + 1
        flat_p, flat_g = p.view(-1), p.grad.reshape(-1)
        buffers = [state[name].view(-1) for name in names]
        for start in range(0, flat_p.numel(), LOW_PRECISION_CHUNK):
            part = slice(start, start + LOW_PRECISION_CHUNK)
            value, grad = flat_p[part].float(), flat_g[part].float()
            moments = [b[part].float() for b in buffers]
            if adamw:
                _adamw_rule(group, state["step"], value, grad, *moments)
            else:
                _sgd_rule(group, value, grad, moments[0] if moments else None, fresh)
            flat_p[part] = _stochastic_round_(value, generator)
            for buffer, moment in zip(buffers, moments, strict=True):
                buffer[part] = _stochastic_round_(moment, generator) if dtype == torch.bfloat16 else moment
        state["rounding_state"] = generator.get_state()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """torch's load, except that state keeps its saved dtype: torch casts every floating-point state tensor to
        its parameter's dtype (fp32 moments of a bf16 parameter would become bf16, and the uint8 generator state of
        the roundings would be read as bf16)."""
        super().load_state_dict(state_dict)
        self._generators = {}
        saved = state_dict["state"]
        for saved_group, group in zip(state_dict["param_groups"], self.param_groups, strict=True):
            for key, p in zip(saved_group["params"], group["params"], strict=True):
                for name, value in saved.get(key, {}).items():
                    if isinstance(value, Tensor) and name != "step" and value.dtype != self.state[p][name].dtype:
                        device = "cpu" if name == "rounding_state" else p.device
                        self.state[p][name] = value.to(device=device, copy=True)

    def _adamw(self, group: dict[str, Any], params: list[Tensor]) -> None:
        beta1, beta2 = group["betas"]
        lr, wd, eps = group["lr"], group["weight_decay"], group["eps"]
        grads, exp_avgs, exp_avg_sqs, steps = [], [], [], []
        for p in params:
            state = self._adam_state(p)
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

    def _adam_state(self, p: Tensor) -> dict[str, Any]:
        """``p``'s AdamW state (zero moments on its first step), its step count advanced by one."""
        state = self.state[p]
        if not state:
            state["step"] = 0
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        state["step"] += 1
        return state

    def _lazy_adamw(self, group: dict[str, Any], p: Tensor) -> None:
        """AdamW on the rows a sparse gradient touches (``torch.optim.SparseAdam``'s rule, plus decoupled decay of
        those rows): rows a step does not touch keep their values and moments, so a large embedding table costs the
        rows of the batch per step, not the whole table."""
        beta1, beta2 = group["betas"]
        lr, wd, eps = group["lr"], group["weight_decay"], group["eps"]
        state = self._adam_state(p)
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


def _adamw_rule(group: dict[str, Any], step: int, p: Tensor, grad: Tensor, exp_avg: Tensor,
                exp_avg_sq: Tensor) -> None:
    """``torch.optim.AdamW``'s update of ``p`` and its moments, in place (one tensor; what ``_adamw`` does with
    foreach kernels)."""
    beta1, beta2 = group["betas"]
    lr, wd, eps = group["lr"], group["weight_decay"], group["eps"]
    if wd != 0:
        p.mul_(1.0 - lr * wd)
    exp_avg.lerp_(grad, 1.0 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)
    denom = exp_avg_sq.sqrt().div_(math.sqrt(1.0 - beta2**step)).add_(eps)
    p.addcdiv_(exp_avg, denom, value=-lr / (1.0 - beta1**step))


def _sgd_rule(group: dict[str, Any], p: Tensor, grad: Tensor, buf: Tensor | None, fresh: bool) -> None:
    """``torch.optim.SGD``'s update of ``p`` and its momentum buffer (``fresh``: the first step, which starts the
    buffer at the gradient), in place."""
    lr, wd, momentum = group["lr"], group["weight_decay"], group["momentum"]
    if wd != 0:
        grad = grad.add(p, alpha=wd)
    if buf is not None:
        if fresh:
            buf.copy_(grad)
        else:
            buf.mul_(momentum).add_(grad, alpha=1.0 - group["dampening"])
        grad = grad.add(buf, alpha=momentum) if group["nesterov"] else buf
    p.add_(grad, alpha=-lr)


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
