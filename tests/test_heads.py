"""Label heads: each is its layer initialised as before, carries its optimizer settings, and a head class of one's
own plugs into XMCModule (model and optimizer groups) without touching the module."""

from __future__ import annotations

import functools

import pytest
import torch
from torch import nn

from xmc_dst.encoders import BagOfWordsEncoder
from xmc_dst.heads import DenseHead, FixedFanInHead, HeadOptimizer, InputTooNarrow
from xmc_dst.model import XMCModule
from xmc_dst.sparse import FixedFanInLinear


def test_fixed_fan_in_head_is_the_layer_with_its_settings():
    head = FixedFanInHead(12, 7, torch.Generator().manual_seed(3), fan_in=4, impl="csr", optimizer="sgd", lr=0.5,
                          weight_decay=0.0, momentum=0.7, warmup_steps=5, lr_schedule="linear")
    layer = FixedFanInLinear(12, 7, 4, impl="csr", generator=torch.Generator().manual_seed(3))
    assert head.state_dict().keys() == layer.state_dict().keys()  # checkpoints name the tensors as the layer does
    for name, value in layer.state_dict().items():
        assert torch.equal(head.state_dict()[name], value), name
    assert head.optimizer_settings == HeadOptimizer("sgd", 0.5, 0.0, 0.7, 5, "linear")
    with pytest.raises(InputTooNarrow) as info:
        FixedFanInHead(12, 7, fan_in=13)
    assert (info.value.argument, info.value.needed, info.value.available) == ("fan_in", 13, 12)
    with pytest.raises(ValueError, match="fan_in must be at least 1"):
        FixedFanInHead(12, 7, fan_in=0)


def test_dense_head_draws_normal_weights_from_the_generator():
    head = DenseHead(6, 5, torch.Generator().manual_seed(1), lr=0.2)
    expected = torch.empty(5, 6).normal_(0.0, 0.02, generator=torch.Generator().manual_seed(1))
    assert torch.equal(head.weight.detach(), expected) and torch.equal(head.bias.detach(), torch.zeros(5))
    assert isinstance(head, nn.Linear) and head.optimizer_settings == HeadOptimizer(lr=0.2)


@pytest.mark.parametrize(("settings", "message"), [
    (dict(algorithm="adam"), "head optimizer must be one of"),
    (dict(lr_schedule="step"), "head lr_schedule must be one of"),
    (dict(lr=-1.0), "non-negative"),
    (dict(warmup_steps=-2), "non-negative"),
])
def test_bad_optimizer_settings_fail_when_the_head_is_built(settings, message):
    with pytest.raises(ValueError, match=message):
        HeadOptimizer(**settings)


class ScaledHead(nn.Module):
    """A head the package does not know: a dense layer times a learned scale, with its own optimizer settings."""

    def __init__(self, in_features: int, num_labels: int, generator: torch.Generator | None = None,
                 lr: float = 0.3) -> None:
        super().__init__()
        self.linear = nn.Linear(in_features, num_labels)
        self.scale = nn.Parameter(torch.full((), 2.0))
        self.optimizer_settings = HeadOptimizer(algorithm="sgd", lr=lr, weight_decay=0.0, lr_schedule="constant")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.scale * self.linear(x)


def test_a_new_head_class_plugs_in_without_changing_the_module():
    module = XMCModule(encoder=functools.partial(BagOfWordsEncoder, embedding_dim=8, hidden_dim=6), num_labels=9,
                       num_features=20, head=functools.partial(ScaledHead, lr=0.25), intermediate_dim=5,
                       warmup_steps=0)
    assert module.head.linear.in_features == 5 and module.head.linear.out_features == 9
    assert module.hparams["head"] == {"class_path": f"{__name__}.ScaledHead", "init_args": {"lr": 0.25}}
    batch = {"feature_ids": torch.tensor([1, 4, 7]), "feature_values": torch.ones(3),
             "feature_offsets": torch.tensor([0, 2, 3])}
    features = module.intermediate(module.encoder(batch))
    torch.testing.assert_close(module(batch), 2.0 * module.head.linear(features))
    groups = {g["name"]: g for g in module.configure_optimizers()["optimizer"].param_groups}
    head = groups["head"]
    assert (head["algorithm"], head["lr"], head["weight_decay"]) == ("sgd", 0.25, 0.0)
    assert {id(p) for p in head["params"]} == {id(p) for p in module.head.parameters()}
    assert groups["intermediate"]["lr"] == 0.25  # intermediate_lr=None: the head's learning rate


def test_a_head_without_optimizer_settings_is_refused():
    with pytest.raises(TypeError, match="Linear has no optimizer_settings"):
        XMCModule(encoder=functools.partial(BagOfWordsEncoder, embedding_dim=8, hidden_dim=6), num_labels=9,
                  num_features=20, head=lambda features, labels, generator: nn.Linear(features, labels))


def _random_support(features: int, labels: int, g: torch.Generator) -> tuple[torch.Tensor, ...]:
    """A term-major support (every label on a random set of terms, some terms with no label) and its dense weights."""
    dense = torch.zeros(labels, features)
    for label in range(labels):
        chosen = torch.randperm(features, generator=g)[:int(torch.randint(1, 6, (1,), generator=g))]
        dense[label, chosen] = torch.rand(chosen.numel(), generator=g) + 0.1
    terms, rows = dense.T.nonzero(as_tuple=True)  # term-major, labels ascending within a term
    term_ptr = torch.cat([torch.zeros(1, dtype=torch.int64), torch.bincount(terms, minlength=features).cumsum(0)])
    return term_ptr, rows.int(), dense.T[terms, rows], dense


def test_lexical_head_is_the_dense_linear_model_on_its_support_and_dst_skips_it():
    from callbacks.dst import find_sparse_layers
    from xmc_dst.heads import LexicalHead

    g = torch.Generator().manual_seed(0)
    features, labels = 30, 7
    head = LexicalHead(features, labels, max_terms=5)
    term_ptr, rows, values, dense = _random_support(features, labels, g)
    head.set_support(term_ptr, rows, values)
    with torch.no_grad():
        head.bias.copy_(torch.randn(labels, generator=g))
    batch = {"lexical_ids": torch.tensor([3, 7, 19, 7, 0, 29]), "lexical_values": torch.rand(6, generator=g),
             "lexical_offsets": torch.tensor([0, 3, 3, 6])}  # the middle document has no term
    x = torch.zeros(3, features)
    for row in range(3):
        for j in range(int(batch["lexical_offsets"][row]), int(batch["lexical_offsets"][row + 1])):
            x[row, batch["lexical_ids"][j]] += batch["lexical_values"][j]
    torch.testing.assert_close(head(batch), x @ dense.T + head.bias)
    upstream = torch.randn(3, labels, generator=g)
    head(batch).backward(upstream)
    dense_grad = upstream.T @ x  # d/dW of the dense model, read at the support (term-major)
    torch.testing.assert_close(head.weight.grad, dense_grad.T[dense.T != 0])
    torch.testing.assert_close(head.bias.grad, upstream.sum(0))
    assert bool(head.initialised) and find_sparse_layers(nn.Sequential(head)) == []
    with pytest.raises(ValueError, match="term_ptr"):
        head.set_support(term_ptr[:-1], rows, values)
    with pytest.raises(ValueError, match="labels must lie"):
        head.set_support(term_ptr, rows + labels, values)
    with pytest.raises(ValueError, match="lexical ids"):
        head({"lexical_ids": torch.tensor([features]), "lexical_values": torch.ones(1),
              "lexical_offsets": torch.tensor([0, 1])})


def test_lexical_head_state_dict_round_trip_adopts_the_saved_support_size():
    from xmc_dst.heads import LexicalHead

    g = torch.Generator().manual_seed(1)
    trained = LexicalHead(20, 6, max_terms=5)
    trained.set_support(*_random_support(20, 6, g)[:3])
    fresh = LexicalHead(20, 6, max_terms=5)  # empty support, as a model built before loading a checkpoint
    fresh.load_state_dict(trained.state_dict())
    for name, value in trained.state_dict().items():
        assert torch.equal(fresh.state_dict()[name], value), name
    assert fresh.weight.numel() == trained.labels.numel() > 0


def _lexical_batch(features: int, docs: int, g: torch.Generator) -> dict[str, torch.Tensor]:
    counts = torch.randint(0, 6, (docs,), generator=g)
    ids = torch.cat([torch.randperm(features, generator=g)[:int(c)] for c in counts])
    return {"lexical_ids": ids, "lexical_values": torch.rand(ids.numel(), generator=g) + 0.05,
            "lexical_offsets": torch.cat([torch.zeros(1, dtype=torch.long), counts.cumsum(0)])}


def _dense_lexical(head) -> torch.Tensor:
    """The head's weights as a dense [labels, features] matrix, read through term_ptr / labels / slot."""
    dense = torch.zeros(head.num_labels, head.num_features)
    slots = head.slot.long() if head.slot.numel() else torch.arange(head.labels.numel())
    terms = torch.repeat_interleave(torch.arange(head.num_features), head.term_ptr.diff())
    dense[head.labels.long(), terms] = head.weight.detach()[slots]
    return dense


def _negative_oracle(batches, upstreams, per_document: int, connected: torch.Tensor, spare: int) -> set:
    """Brute force: per document the `per_document` largest output gradients (> 0) times each of its terms' values,
    summed over batches, connected pairs dropped, the `spare` best kept."""
    score: dict[tuple[int, int], float] = {}
    for batch, upstream in zip(batches, upstreams, strict=True):
        offsets = batch["lexical_offsets"]
        for row in range(offsets.numel() - 1):
            ranked = sorted(range(upstream.shape[1]), key=lambda label: -float(upstream[row, label]))[:per_document]
            for j in range(int(offsets[row]), int(offsets[row + 1])):
                for label in ranked:
                    value = float(batch["lexical_values"][j]) * float(upstream[row, label])
                    if value > 0:
                        key = (int(batch["lexical_ids"][j]), label)
                        score[key] = score.get(key, 0.0) + value
    fresh = [(value, key) for key, value in score.items() if not bool(connected[key[1], key[0]])]
    return {key for _, key in sorted(fresh, reverse=True)[:spare]}


def test_lexical_head_grows_the_negative_evidence_a_brute_force_oracle_picks():
    from xmc_dst.heads import LexicalHead

    g = torch.Generator().manual_seed(3)
    features, labels, per_document = 25, 9, 3
    head = LexicalHead(features, labels, max_terms=5, negative_fraction=0.5)
    term_ptr, rows, values, dense = _random_support(features, labels, g)
    head.set_support(term_ptr, rows, values)
    spare = head.spare_slots
    assert spare == round(0.5 * rows.numel()) > 0 and head.weight.numel() == rows.numel() + spare
    batches = [_lexical_batch(features, 6, g) for _ in range(4)]
    upstreams = [torch.randn(6, labels, generator=g) for _ in batches]
    head.collect_negatives(per_document)
    for batch, upstream in zip(batches, upstreams, strict=True):
        head(batch).backward(upstream)
        assert not head.weight.grad[rows.numel():].any()  # spare slots are never read before growth
    expected = _negative_oracle(batches, upstreams, per_document, dense != 0, spare)
    before = {name: head(batch).detach() for name, batch in enumerate(batches)}
    grown = head.grow_negatives()
    assert grown == len(expected) and head.labels.numel() == rows.numel() + grown and head.per_document == 0
    grown_dense = _dense_lexical(head)
    # the earlier connections are the nonzero weights (new ones start at zero)
    connected = {(t, label) for label, t in zip(*torch.nonzero(grown_dense != 0, as_tuple=True), strict=True)}
    terms = torch.repeat_interleave(torch.arange(features), head.term_ptr.diff())
    pairs = set(zip(terms.tolist(), head.labels.tolist(), strict=True))
    assert pairs == {(int(t), int(label)) for t, label in connected} | expected  # new ones at weight zero
    assert len(pairs) == head.labels.numel()  # unique
    keys = terms * labels + head.labels.long()
    assert bool((keys.diff() > 0).all())  # term-major, labels ascending within a term
    for name, batch in enumerate(batches):
        torch.testing.assert_close(head(batch).detach(), before[name])
    with torch.no_grad():
        head.weight.copy_(torch.randn(head.weight.numel(), generator=g))
    batch, upstream = batches[0], upstreams[0]
    x = torch.zeros(6, features).index_put_((torch.repeat_interleave(torch.arange(6), batch["lexical_offsets"].diff()),
                                             batch["lexical_ids"]), batch["lexical_values"], accumulate=True)
    torch.testing.assert_close(head(batch), x @ _dense_lexical(head).T + head.bias)
    head.weight.grad = None
    head(batch).backward(upstream)
    used = head.slot.long()
    torch.testing.assert_close(head.weight.grad[used], (upstream.T @ x)[head.labels.long(), terms])
    fresh = LexicalHead(features, labels, max_terms=5, negative_fraction=0.5)
    fresh.load_state_dict(head.state_dict())
    torch.testing.assert_close(fresh(batch), head(batch))


def test_lexical_head_resumes_its_recorded_evidence_exactly():
    from xmc_dst.heads import LexicalHead

    g = torch.Generator().manual_seed(4)
    features, labels = 30, 8
    support = _random_support(features, labels, g)[:3]
    batches = [_lexical_batch(features, 5, g) for _ in range(6)]
    upstreams = [torch.randn(5, labels, generator=g) for _ in batches]

    def head_after(batch_range, pending=None):
        head = LexicalHead(features, labels, max_terms=5, negative_fraction=1.0)
        head.set_support(*support)
        if pending is not None:
            head.restore_pending(*pending)
        head.collect_negatives(2)
        for i in batch_range:
            head(batches[i]).backward(upstreams[i])
        return head

    whole = head_after(range(6))
    first = head_after(range(3))
    resumed = head_after(range(3, 6), pending=first.pending_negatives())
    assert whole.grow_negatives() == resumed.grow_negatives() > 0
    for name in ("term_ptr", "labels", "slot"):
        assert torch.equal(getattr(whole, name), getattr(resumed, name)), name
    gathered = head_after(range(3))  # data parallel: another rank's evidence is gathered before growing
    other = head_after(range(3, 6)).pending_negatives()
    assert gathered.grow_negatives(lambda mine: [mine, other]) == whole.labels.numel() - support[1].numel()
    assert torch.equal(gathered.labels, whole.labels)
    none = LexicalHead(features, labels, max_terms=5)  # no spare slots: nothing to grow into
    none.set_support(*support)
    none.collect_negatives(2)
    none(batches[0]).backward(upstreams[0])
    assert none.pending_negatives()[0].numel() == 0  # nothing recorded
    assert none.grow_negatives() == 0 and none.slot.numel() == 0
    with pytest.raises(ValueError, match="lexical_negatives"):
        LexicalHead(features, labels, max_terms=5, negative_fraction=-0.1)


def test_start_from_connects_each_label_to_its_largest_coordinates():
    """Oracle: per row, the fan_in largest coordinates (sorted), weighted by those values at the row's old norm;
    a row with no positive value keeps its start; biases stay; starting in two chunks equals one call."""
    torch.manual_seed(0)
    head = FixedFanInHead(12, 6, torch.Generator().manual_seed(1), fan_in=4)
    embeddings = torch.randn(6, 12)
    embeddings[3] = -embeddings[3].abs()  # nothing positive: keeps its random start
    before = {name: tensor.clone() for name, tensor in head.state_dict().items()}
    chunked = FixedFanInHead(12, 6, torch.Generator().manual_seed(1), fan_in=4)
    head.start_from(embeddings)
    chunked.start_from(embeddings[:2])
    chunked.start_from(embeddings[2:], first=2)
    for row in range(6):
        if row == 3:
            assert head.indices[row].tolist() == before["indices"][row].tolist()
            assert torch.equal(head.weight[row], before["weight"][row])
            continue
        ranked = sorted(range(12), key=lambda c: -float(embeddings[row, c]))[:4]
        chosen = sorted(ranked)
        values = embeddings[row, chosen]
        expected = values / values.norm() * before["weight"][row].norm()
        assert head.indices[row].tolist() == chosen
        torch.testing.assert_close(head.weight[row], expected)
    assert torch.equal(head.bias, before["bias"])
    assert torch.equal(chunked.indices, head.indices) and torch.equal(chunked.weight, head.weight)


def test_dense_start_from_takes_the_whole_vector_at_the_old_norm():
    head = DenseHead(5, 3, torch.Generator().manual_seed(0))
    before = head.weight.detach().clone()
    embeddings = torch.tensor([[1.0, 2.0, 0.0, -1.0, 0.5], [0.0] * 5, [3.0, 0.0, 0.0, 0.0, 4.0]])
    head.start_from(embeddings)
    for row in (0, 2):
        expected = embeddings[row] / embeddings[row].norm() * before[row].norm()
        torch.testing.assert_close(head.weight[row].detach(), expected)
    assert torch.equal(head.weight[1].detach(), before[1])  # an all-zero vector: no direction, kept
