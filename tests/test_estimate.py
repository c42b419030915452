"""The training-memory estimate of a config (xmc_dst.estimate) against hand counts, the live model's tensors and
what MemoryProfiler measures."""

from __future__ import annotations

import functools
import json
import shutil
from pathlib import Path

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

from callbacks import AuxiliaryObjective, MemoryProfiler
from xmc_dst.estimate import (
    KNOWN_ENCODERS,
    EncoderConfigNotFound,
    estimate_memory,
    estimate_memory_main,
    estimate_memory_parts,
)

HEADS = {"sparse": "xmc_dst.heads.FixedFanInHead", "dense": "xmc_dst.heads.DenseHead"}


def bow_batches(num_features: int, num_labels: int, count: int = 4, batch: int = 8) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(count):
        ids = torch.randint(num_features, (batch * 6,), generator=g)
        labels = torch.randint(num_labels, (batch * 2,), generator=g)
        out.append({"feature_ids": ids, "feature_values": torch.rand(ids.numel(), generator=g),
                    "feature_offsets": torch.arange(0, ids.numel() + 1, 6),
                    "label_ids": labels, "label_offsets": torch.arange(0, labels.numel() + 1, 2)})
    return out


GROUPED_BF16 = {"class_path": "xmc_dst.heads.GroupedFanInHead",
                "init_args": {"fan_in": 8, "group_size": 4, "weight_dtype": "bfloat16", "state_dtype": "bfloat16"}}


@pytest.mark.parametrize("head", ["sparse", "dense", "grouped-bf16"])
def test_estimate_of_the_static_part_matches_the_profiler(head, tmp_path):
    from xmc_dst.encoders import BagOfWordsEncoder
    from xmc_dst.model import XMCModule

    encoder = {"class_path": "xmc_dst.encoders.BagOfWordsEncoder", "init_args": {"embedding_dim": 48,
                                                                                  "hidden_dim": 40}}
    if head == "grouped-bf16":
        spec = {**GROUPED_BF16, "init_args": {**GROUPED_BF16["init_args"], "optimizer": "sgd"}}
    else:
        spec = {"class_path": HEADS[head], "init_args": {"optimizer": "sgd", **({"fan_in": 8} if head == "sparse"
                                                                                 else {})}}
    hparams = dict(num_labels=701, num_features=300, head=spec, intermediate_dim=24, aux_clusters=16, warmup_steps=0)
    model = XMCModule(encoder=functools.partial(BagOfWordsEncoder, embedding_dim=48, hidden_dim=40), **hparams)
    profiler = MemoryProfiler(print_table=False)
    aux = AuxiliaryObjective(cutoff_step=100, build_clusters=False)  # the auxiliary head trains (has state)
    L.Trainer(callbacks=[aux, profiler], max_steps=2, default_root_dir=tmp_path, logger=False,
              enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
              ).fit(model, DataLoader(bow_batches(300, 701), batch_size=None))
    measured = profiler.report["parts"]
    estimate = estimate_memory({"model": {"encoder": encoder, **hparams}}, batch_size=8)
    parts = estimate.parts["dense" if head == "dense" else "sparse"]
    if head == "grouped-bf16":  # counted exactly: 176 groups of 4 (3 padding slots), bf16 weights and momentum
        assert measured["head"]["params"] == parts["head"].params == (176 * 4 * 8 + 701) * 2
        assert measured["head"]["optimizer"] == parts["head"].optimizer == (176 * 4 * 8 + 701) * 2 + 2 * 5056
        assert measured["head"]["buffers"] == parts["head"].buffers == 176 * 8 * 4 + (701 + 176 * 4) * 4 + 8
    for name in ("encoder", "intermediate", "aux_head", "head"):
        got = measured[name]["static"] + (measured["other"]["static"] if name == "aux_head" else 0)
        assert parts[name].static == pytest.approx(got, rel=0.15), name
    predicted = sum(p.static for n, p in parts.items() if n != "dst")
    assert predicted == pytest.approx(profiler.report["static_bytes"], rel=0.15)


@pytest.mark.parametrize("head", ["dense", "sparse"])
def test_optimizer_step_temporary_is_measured_as_estimated(head):
    """The peak RSS of one GroupwiseOptimizer step over the live tensors (state already created) is the estimate's
    "optimizer step temporaries": the largest group's size (dense: the 51 MB head; sparse: the 36 MB embedding),
    not the groups' sum. Every tensor is over glibc's 32 MiB mmap ceiling, so a freed temporary leaves RSS and each
    step's peak is its own."""
    from xmc_dst.encoders import BagOfWordsEncoder
    from xmc_dst.memory import peak_rss_bytes, reset_peak_rss, rss_bytes
    from xmc_dst.model import XMCModule

    spec = {"class_path": HEADS[head], "init_args": {"fan_in": 8} if head == "sparse" else {}}
    hparams = dict(num_labels=100_000, num_features=70_000, head=spec, warmup_steps=0)
    torch.manual_seed(0)
    model = XMCModule(encoder=functools.partial(BagOfWordsEncoder, embedding_dim=128, hidden_dim=0), **hparams)
    optimizer = model.configure_optimizers()["optimizer"]
    for p in model.parameters():
        p.grad = torch.full_like(p, 1e-3)
    optimizer.step()  # creates the moments: the step measured below only makes temporaries
    if not reset_peak_rss() or rss_bytes() is None:
        pytest.skip("no resettable peak RSS (/proc/self/clear_refs) here")
    before = rss_bytes()
    optimizer.step()
    measured = peak_rss_bytes() - before
    encoder = {"class_path": "xmc_dst.encoders.BagOfWordsEncoder", "init_args": {"embedding_dim": 128,
                                                                                  "hidden_dim": 0}}
    estimate = estimate_memory({"model": {"encoder": encoder, **hparams}}, batch_size=8)
    expected = estimate.parts[head]["optimizer step temporaries"].activations
    largest = max(sum(p.numel() for p in group["params"]) for group in optimizer.param_groups) * 4
    assert expected == largest  # the estimate's count, from the config alone, is the live model's largest group
    assert expected == (100_000 * 129 if head == "dense" else 70_000 * 128) * 4
    assert measured == pytest.approx(expected, abs=4 << 20)  # all groups at once would be 36-51 MB more


def test_estimate_counts_a_transformer_exactly_and_compares_heads_at_670k(tiny_encoder_dir):
    from xmc_dst.encoders import EncoderInputs, TransformerEncoder

    config = {"model": {"class_path": "xmc_dst.model.XMCModule", "init_args": {
        "encoder": {"class_path": "xmc_dst.encoders.TransformerEncoder", "init_args": {"trainable_layers": 1}},
        "tokenizer": str(tiny_encoder_dir),
        "head": {"class_path": "xmc_dst.heads.FixedFanInHead", "init_args": {"fan_in": 32}}}},
        "trainer": {"precision": "16-mixed", "callbacks": [
            {"class_path": "callbacks.DynamicSparseTraining", "init_args": {"interval": 100}}]}}
    estimate = estimate_memory(config, num_labels=670_091, batch_size=4, max_length=16, budget_gib=1.0)
    real = TransformerEncoder(EncoderInputs(tokenizer=str(tiny_encoder_dir)), trainable_layers=1)
    total = sum(p.numel() for p in real.parameters())
    trainable = sum(p.numel() for p in real.parameters() if p.requires_grad)
    encoder = estimate.parts["sparse"]["encoder"]
    assert encoder.params == 4 * total and encoder.grads == 4 * trainable and encoder.optimizer == 8 * trainable
    labels, width = 670_091, 32  # the tiny BERT's hidden size is the head's input
    dense, sparse = estimate.parts["dense"]["head"], estimate.parts["sparse"]["head"]
    assert dense.static == labels * (width + 1) * 4 * 4  # weights, grads, two AdamW moments
    assert sparse.static == labels * (min(32, width) + 1) * 4 * 4 + labels * 32 * 4 + 8
    assert estimate.parts["sparse"]["dst"].buffers == 65_536 * 1 * 8  # sampled ever-active map: ceil(32/64) words
    assert dense.activations == sparse.activations == 2 * 4 * labels * 4
    assert estimate.fits("sparse") is (estimate.total("sparse") <= 1 << 30)
    assert estimate.to_dict()["heads"]["dense"]["total"] == estimate.total("dense")


def test_estimate_counts_the_lexical_projection_table(tiny_encoder_dir):
    def config(lexical_dim: int) -> dict:
        return {"model": {"class_path": "xmc_dst.model.XMCModule", "init_args": {
            "encoder": {"class_path": "xmc_dst.encoders.TransformerEncoder",
                        "init_args": {"trainable_layers": 0, "lexical_dim": lexical_dim}},
            "tokenizer": str(tiny_encoder_dir), "intermediate_dim": 64}},
            "data": {"class_path": "datamodules.RawTextXMCDataModule", "init_args": {"lexical_features": 5000}}}

    plain, lexical = (estimate_memory(config(dim), num_labels=1000).parts["sparse"] for dim in (0, 48))
    table = 5000 * 48
    assert lexical["encoder"].params - plain["encoder"].params == 4 * table
    assert lexical["encoder"].grads - plain["encoder"].grads == 4 * table
    # the intermediate layer reads the wider concatenation
    assert lexical["intermediate"].params - plain["intermediate"].params == 4 * 48 * 64


def test_parts_formula_reports_the_budget_verdict():
    estimate = estimate_memory_parts(num_labels=670_091, head_in=768, fan_in=32, batch_size=32,
                                     encoder_params=110_000_000, budget_bytes=8 << 30)
    dense_head = estimate.parts["dense"]["head"].static
    sparse_head = estimate.parts["sparse"]["head"].static
    assert dense_head / sparse_head > 15  # the paper's point: a sparse head's training state is ~19x smaller
    assert estimate.fits("sparse") and not estimate.fits("dense")


def test_estimate_memory_command_prints_json_and_fails_over_budget(tmp_path, capsys):
    config = tmp_path / "c.yaml"
    config.write_text("""
model:
  encoder: {class_path: xmc_dst.encoders.BagOfWordsEncoder, init_args: {embedding_dim: 32, hidden_dim: 0}}
  num_labels: 100000
  num_features: 5000
  head: {class_path: xmc_dst.heads.FixedFanInHead, init_args: {fan_in: 16}}
""")
    assert estimate_memory_main(["--config", str(config), "--json", "--batch-size", "16"]) == 0
    report = json.loads(capsys.readouterr().out)
    dense, sparse = report["heads"]["dense"], report["heads"]["sparse"]
    assert dense["parts"]["head"]["params"] == 100_000 * 33 * 4
    assert sparse["parts"]["head"]["params"] == 100_000 * 17 * 4
    assert report["batch_size"] == 16 and dense["fits"] is None
    assert estimate_memory_main(["--config", str(config), "--budget-gib", "0.001"]) == 1  # the sparse head won't fit
    assert "does NOT fit" in capsys.readouterr().out


# ------------------------------------------------------------------------------------------- offline architecture

ROOT = Path(__file__).resolve().parents[1]
# Published parameter counts (Hugging Face model cards / the papers), with the pooler where the model has one.
PUBLISHED_PARAMETERS = {"bert-base-uncased": 109_482_240, "distilbert-base-uncased": 66_362_880,
                        "roberta-base": 124_645_632, "sentence-transformers/all-MiniLM-L6-v2": 22_713_216}
BERT_POOLER = 768 * 768 + 768  # TransformerEncoder drops the pooler


@pytest.fixture
def empty_hub_cache(tmp_path, monkeypatch):
    """A Hugging Face cache holding nothing (conftest already forbids the network)."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    return tmp_path / "hub"


@pytest.mark.parametrize("name", sorted(PUBLISHED_PARAMETERS))
def test_the_table_of_known_encoders_has_their_published_sizes(name):
    from transformers import AutoConfig, AutoModel

    entry = dict(KNOWN_ENCODERS[name])
    with torch.device("meta"):
        model = AutoModel.from_config(AutoConfig.for_model(entry.pop("model_type"), **entry))
    assert sum(p.numel() for p in model.parameters()) == PUBLISHED_PARAMETERS[name]


def test_the_table_matches_the_shipped_minilm_config():
    from xmc_dst.paths import minilm_dir

    shipped = json.loads((minilm_dir() / "config.json").read_text(encoding="utf-8"))
    for key, value in KNOWN_ENCODERS["sentence-transformers/all-MiniLM-L6-v2"].items():
        assert shipped[key] == value, key


@pytest.mark.parametrize("name", ["wiki10-31k", "amazon-670k", "wiki-500k", "lf-amazontitles-131k"])
def test_paper_configs_are_estimated_offline(name, empty_hub_cache, capsys):
    estimate = estimate_memory(ROOT / "configs" / f"{name}.yaml")
    encoder = estimate.parts["sparse"]["encoder"]
    expected = PUBLISHED_PARAMETERS["distilbert-base-uncased"] if name.startswith("lf-") else \
        PUBLISHED_PARAMETERS["bert-base-uncased"] - BERT_POOLER
    assert encoder.params == 4 * expected  # fp32 weights under 16-mixed
    assert any("table of known encoders" in note for note in estimate.notes)
    assert estimate_memory_main(["--config", str(ROOT / "configs" / f"{name}.yaml"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["heads"]["sparse"]["parts"]["encoder"]["params"] == 4 * expected


def _config_naming(tmp_path: Path, encoder: str) -> Path:
    text = (ROOT / "configs" / "wiki10-31k.yaml").read_text(encoding="utf-8")
    path = tmp_path / "config.yaml"
    path.write_text(text.replace("tokenizer: bert-base-uncased", f"tokenizer: {encoder}"), encoding="utf-8")
    return path


def _parameters(directory: Path) -> int:
    from transformers import AutoModel

    return sum(p.numel() for n, p in AutoModel.from_pretrained(directory).named_parameters() if "pooler" not in n)


def test_an_encoder_in_the_hub_cache_is_read_from_there(tiny_encoder_dir, empty_hub_cache, tmp_path):
    snapshot = empty_hub_cache / "models--someone--tiny-bert" / "snapshots" / "0123abc"
    snapshot.mkdir(parents=True)
    shutil.copy(tiny_encoder_dir / "config.json", snapshot / "config.json")
    (empty_hub_cache / "models--someone--tiny-bert" / "refs").mkdir()
    (empty_hub_cache / "models--someone--tiny-bert" / "refs" / "main").write_text("0123abc")
    estimate = estimate_memory(_config_naming(tmp_path, "someone/tiny-bert"), num_labels=100)
    assert estimate.parts["sparse"]["encoder"].params == 4 * _parameters(tiny_encoder_dir)
    assert not any("table of known encoders" in note for note in estimate.notes)


def test_encoder_config_option_and_the_error_without_it(tiny_encoder_dir, empty_hub_cache, tmp_path, capsys):
    from xmc_dst.cli import configuration_error

    config = _config_naming(tmp_path, "someone/unknown-encoder")
    with pytest.raises(EncoderConfigNotFound) as caught:
        estimate_memory(config, num_labels=100)
    message = str(caught.value)
    assert "\n" not in message and "'someone/unknown-encoder'" in message and "--encoder-config PATH" in message
    assert str(empty_hub_cache) in message
    assert configuration_error(caught.value) is caught.value  # the CLI prints it as its one-line error
    for given in (tiny_encoder_dir, tiny_encoder_dir / "config.json"):
        args = ["--config", str(config), "--num-labels", "100", "--encoder-config", str(given), "--json"]
        assert estimate_memory_main(args) == 0
        report = json.loads(capsys.readouterr().out)
        assert report["heads"]["sparse"]["parts"]["encoder"]["params"] == 4 * _parameters(tiny_encoder_dir)
    with pytest.raises(EncoderConfigNotFound, match="no such file"):
        estimate_memory(config, num_labels=100, encoder_config=tmp_path / "missing.json")


def test_estimate_counts_the_lexical_head_as_a_real_one_of_its_bound_holds(tiny_encoder_dir):
    from xmc_dst.heads import LexicalHead

    features, labels, terms = 5000, 1000, 3

    def config(**model) -> dict:
        return {"model": {"class_path": "xmc_dst.model.XMCModule", "init_args": {
            "encoder": {"class_path": "xmc_dst.encoders.TransformerEncoder",
                        "init_args": {"trainable_layers": 0, "lexical_dim": 16}},
            "tokenizer": str(tiny_encoder_dir), "intermediate_dim": 64, **model}},
            "data": {"class_path": "datamodules.RawTextXMCDataModule", "init_args": {"lexical_features": features}}}

    head = LexicalHead(features, labels, terms)  # every label on `terms` terms: the bound, reached
    g = torch.Generator().manual_seed(0)
    chosen = torch.stack([torch.randperm(features, generator=g)[:terms] for _ in range(labels)])
    term_of = chosen.reshape(-1)
    order = torch.argsort(term_of * labels + torch.arange(labels).repeat_interleave(terms))
    term_ptr = torch.cat([torch.zeros(1, dtype=torch.int64), torch.bincount(term_of, minlength=features).cumsum(0)])
    head.set_support(term_ptr, torch.arange(labels).repeat_interleave(terms)[order].int(), torch.rand(labels * terms))
    optimizer = torch.optim.AdamW(head.parameters())
    head({"lexical_ids": torch.tensor([1, 2]), "lexical_values": torch.ones(2),
          "lexical_offsets": torch.tensor([0, 2])}).sum().backward()
    optimizer.step()
    nbytes = lambda tensors: sum(t.numel() * t.element_size() for t in tensors)  # noqa: E731
    for column in ("dense", "sparse"):
        part = estimate_memory(config(lexical_terms=terms), num_labels=labels).parts[column]["lexical_head"]
        assert part.params == part.grads == nbytes(head.parameters())
        assert part.optimizer == nbytes(v for state in optimizer.state.values() for v in state.values() if v.dim())
        assert part.buffers == nbytes(head.buffers())
    capped = estimate_memory(config(lexical_terms=terms, lexical_connections=1200), num_labels=labels)
    assert capped.parts["sparse"]["lexical_head"].params == (1200 + labels) * 4
    assert "lexical_head" not in estimate_memory(config(), num_labels=labels).parts["sparse"]


def test_estimate_counts_the_lexical_negative_evidence_of_a_filled_head(tiny_encoder_dir):
    from xmc_dst.heads import LexicalHead

    features, labels, terms = 400, 50, 2
    config = {"model": {"class_path": "xmc_dst.model.XMCModule", "init_args": {
        "encoder": {"class_path": "xmc_dst.encoders.TransformerEncoder",
                    "init_args": {"trainable_layers": 0, "lexical_dim": 16}},
        "tokenizer": str(tiny_encoder_dir), "intermediate_dim": 64, "lexical_terms": terms,
        "lexical_negatives": 0.5}},
        "data": {"class_path": "datamodules.RawTextXMCDataModule", "init_args": {"lexical_features": features}}}
    head = LexicalHead(features, labels, terms, negative_fraction=0.5)
    term_of = torch.arange(labels * terms) % features  # every label on `terms` distinct terms: the bound, reached
    label_of = torch.arange(labels).repeat_interleave(terms)
    order = torch.argsort(term_of * labels + label_of)
    term_ptr = torch.cat([torch.zeros(1, dtype=torch.int64), torch.bincount(term_of, minlength=features).cumsum(0)])
    head.set_support(term_ptr, label_of[order].int(), torch.rand(labels * terms))
    head.collect_negatives(per_document=labels)  # every label of every document: more evidence than spare slots
    batch = {"lexical_ids": torch.arange(features), "lexical_values": torch.ones(features),
             "lexical_offsets": torch.tensor([0, features])}
    head(batch).backward(torch.ones(1, labels))
    pending = head.pending_negatives()
    assert head.grow_negatives() == round(0.5 * labels * terms) and head.spare_slots == 0
    optimizer = torch.optim.AdamW(head.parameters())
    head(batch).sum().backward()
    optimizer.step()
    nbytes = lambda tensors: sum(t.numel() * t.element_size() for t in tensors)  # noqa: E731
    part = estimate_memory(config, num_labels=labels).parts["sparse"]["lexical_head"]
    assert part.params == part.grads == nbytes(head.parameters())
    assert part.optimizer == nbytes(v for state in optimizer.state.values() for v in state.values() if v.dim())
    recorded_bound = max(8 * round(0.5 * labels * terms), 1 << 22) * 12  # int64 keys + fp32 scores before compaction
    assert part.buffers == nbytes(head.buffers()) + recorded_bound and 0 < nbytes(pending) <= recorded_bound
