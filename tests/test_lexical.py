"""The lexical channel: the TF-IDF vocabulary against scikit-learn and a brute-force count, the DataModule's cached
features against the vocabulary, the projection against a naive weighted sum of rows, and the lazy sparse AdamW
against ``torch.optim.SparseAdam``."""

from __future__ import annotations

import random
import zlib
from collections import Counter

import numpy as np
import pytest
import torch
from conftest import write_topic_dataset

from xmc_dst.encoders import EncoderInputs, LexicalProjection, TransformerEncoder
from xmc_dst.lexical import LexicalVocabulary, terms
from xmc_dst.optim import GroupwiseOptimizer

WORDS = ["python", "library", "http", "game", "network", "data", "file", "tool", "x11", "gnome", "perl", "ruby"]


def corpus(num_docs: int = 200, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    docs = []
    for _ in range(num_docs):
        words = [rng.choice(WORDS) + ("" if rng.random() < 0.8 else str(rng.randint(0, 9))) for _ in range(6)]
        docs.append(f"{words[0]}-{words[1]}: " + " ".join(words[2:]).capitalize() + ", v2.0 (é)")
    return docs


def test_features_equal_scikit_learns_tfidf() -> None:
    text = pytest.importorskip("sklearn.feature_extraction.text")
    docs = corpus()
    vocabulary = LexicalVocabulary.fit(lambda: docs, max_features=10_000, ngrams=2, min_df=2)
    reference = text.TfidfVectorizer(ngram_range=(1, 2), min_df=2, dtype=np.float64).fit(docs)
    assert len(vocabulary) == len(reference.vocabulary_)
    expected = reference.transform(docs[:50]).tocsr()
    for row, doc in enumerate(docs[:50]):
        ids, values = vocabulary.transform(doc)
        assert ids.dtype == np.int32 and list(ids) == sorted(ids)
        np.testing.assert_allclose(np.sort(values), np.sort(expected[row].data), rtol=1e-6)


def test_the_cap_keeps_the_terms_in_most_documents() -> None:
    docs = corpus(seed=1)
    df = Counter(term for doc in docs for term in set(terms(doc, 2)))
    frequent = sorted(df.values(), reverse=True)
    cap = next(i for i in range(20, len(frequent)) if frequent[i] < frequent[i - 1])  # a cap that splits no tie
    vocabulary = LexicalVocabulary.fit(lambda: docs, max_features=cap, ngrams=2, min_df=1)
    assert len(vocabulary) == cap
    kept = {t for t, c in df.items() if c >= frequent[cap - 1]}
    assert len(kept) == cap
    assert vocabulary.kept.tolist() == sorted(zlib.crc32(t.encode()) for t in kept)
    idf = {zlib.crc32(t.encode()): np.log((1 + len(docs)) / (1 + df[t])) + 1 for t in kept}
    np.testing.assert_allclose(vocabulary.idf, [idf[key] for key in vocabulary.kept.tolist()], rtol=1e-6)
    unseen_ids, unseen_values = vocabulary.transform("zzz-unknown qqq")
    assert len(unseen_ids) == 0 and len(unseen_values) == 0


def test_vocabulary_round_trip(tmp_path) -> None:
    vocabulary = LexicalVocabulary.fit(lambda: corpus(), 50, 3, 1)
    vocabulary.save(tmp_path)
    loaded = LexicalVocabulary.load(tmp_path)
    assert loaded.ngrams == 3 and np.array_equal(loaded.kept, vocabulary.kept)
    for doc in corpus(5, seed=3):
        for a, b in zip(vocabulary.transform(doc), loaded.transform(doc), strict=True):
            np.testing.assert_array_equal(a, b)


def test_datamodule_batches_carry_each_documents_tfidf(tiny_encoder_dir, tmp_path) -> None:
    from datamodules import RawTextXMCDataModule

    data_dir = write_topic_dataset(tmp_path / "data")
    module = RawTextXMCDataModule(data_dir, tokenizer=str(tiny_encoder_dir), cache_dir=tmp_path / "cache",
                                  max_length=4, batch_size=5, lexical_features=30, lexical_min_df=1)
    module.setup("test")
    texts = (data_dir / "test_texts.txt").read_text(encoding="utf-8").splitlines()
    reference = LexicalVocabulary.fit(lambda: (data_dir / "train_texts.txt").read_text().splitlines(), 30, 2, 1)
    assert module.num_lexical_features == len(reference)
    seen = 0
    for batch in module.test_dataloader():
        offsets = batch["lexical_offsets"]
        for row, doc in enumerate(batch["doc_index"].tolist()):
            ids, values = reference.transform(texts[doc])  # the whole text, though max_length keeps 4 tokens
            part = slice(int(offsets[row]), int(offsets[row + 1]))
            assert batch["lexical_ids"][part].tolist() == ids.tolist()
            torch.testing.assert_close(batch["lexical_values"][part], torch.from_numpy(values))
            seen += 1
    assert seen == len(texts)
    plain = RawTextXMCDataModule(data_dir, tokenizer=str(tiny_encoder_dir), cache_dir=tmp_path / "cache",
                                 max_length=4)
    assert plain.cache_path != module.cache_path and plain.num_lexical_features is None


def test_projection_is_the_weighted_sum_of_its_rows() -> None:
    torch.manual_seed(0)
    projection = LexicalProjection(20, 6)
    batch = {"lexical_ids": torch.tensor([3, 7, 19, 7, 0]), "lexical_values": torch.tensor([0.5, 0.2, 0.3, 1.0, 0.1]),
             "lexical_offsets": torch.tensor([0, 3, 3, 5])}  # the middle document has no known term
    weight = projection.bag.weight.detach()
    expected = torch.stack([0.5 * weight[3] + 0.2 * weight[7] + 0.3 * weight[19], torch.zeros(6),
                            1.0 * weight[7] + 0.1 * weight[0]])
    torch.testing.assert_close(projection(batch), expected)
    projection(batch).sum().backward()
    grad = projection.bag.weight.grad
    assert grad.is_sparse and set(grad.coalesce().indices()[0].tolist()) == {0, 3, 7, 19}


def test_projection_featurizes_texts_from_the_vocabulary_it_holds() -> None:
    docs = corpus()
    vocabulary = LexicalVocabulary.fit(lambda: docs, 40, 2, 2)
    projection = LexicalProjection(len(vocabulary), 4)
    with pytest.raises(RuntimeError, match="no vocabulary"):
        projection.featurize(docs[:2])
    projection.set_vocabulary(vocabulary)
    batch = projection.featurize(docs[:3])
    for row, doc in enumerate(docs[:3]):
        ids, values = vocabulary.transform(doc)
        part = slice(int(batch["lexical_offsets"][row]), int(batch["lexical_offsets"][row + 1]))
        assert batch["lexical_ids"][part].tolist() == ids.tolist()
        torch.testing.assert_close(batch["lexical_values"][part], torch.from_numpy(values))
    with pytest.raises(ValueError, match="lexical features"):
        LexicalProjection(len(vocabulary) + 1, 4).set_vocabulary(vocabulary)


def test_encoder_concatenates_the_projection_and_trains_it_with_a_frozen_transformer(tiny_encoder_dir) -> None:
    plain = TransformerEncoder(EncoderInputs(tokenizer=str(tiny_encoder_dir)), trainable_layers=0)
    with pytest.raises(ValueError, match="lexical_features"):
        TransformerEncoder(EncoderInputs(tokenizer=str(tiny_encoder_dir)), trainable_layers=0, lexical_dim=5)
    inputs = EncoderInputs(tokenizer=str(tiny_encoder_dir), num_lexical_features=12)
    encoder = TransformerEncoder(inputs, trainable_layers=0, lexical_dim=5, lexical_lr=0.02, cache_features=True)
    assert encoder.output_dim == plain.output_dim + 5
    batch = {"input_ids": torch.tensor([[2, 10, 11, 3], [2, 12, 3, 0]]),
             "attention_mask": torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]]),
             "lexical_ids": torch.tensor([1, 4, 9]), "lexical_values": torch.tensor([0.6, 0.8, 1.0]),
             "lexical_offsets": torch.tensor([0, 2, 3])}
    out = encoder(batch)
    torch.testing.assert_close(out[:, : plain.output_dim], plain(batch))
    torch.testing.assert_close(out[:, plain.output_dim:], encoder.lexical(batch))
    (group,) = encoder.own_optimizer_groups()
    assert group["name"] == "lexical" and group["lr"] == 0.02 and group["params"] == [encoder.lexical.bag.weight]


def test_lazy_adamw_matches_sparse_adam_and_leaves_untouched_rows() -> None:
    torch.manual_seed(0)
    ours, reference = (torch.nn.EmbeddingBag(30, 4, mode="sum", sparse=True) for _ in range(2))
    reference.weight.data.copy_(ours.weight.data)
    # SparseAdam adds eps before the bias correction, AdamW after: equal with eps = 0
    optimizers = [GroupwiseOptimizer([ours.weight], lr=0.01, eps=0.0),
                  torch.optim.SparseAdam([reference.weight], lr=0.01, eps=1e-30)]
    start = ours.weight.detach().clone()
    for _ in range(15):
        ids, weights = torch.randint(0, 20, (9,)), torch.rand(9)  # rows 20..29 are never touched
        for bag, optimizer in zip((ours, reference), optimizers, strict=True):
            optimizer.zero_grad()
            (bag(ids, torch.tensor([0, 4, 6]), per_sample_weights=weights) ** 2).sum().backward()
            optimizer.step()
    torch.testing.assert_close(ours.weight, reference.weight, rtol=0, atol=1e-6)
    assert torch.equal(ours.weight[20:], start[20:])
    decayed = torch.nn.EmbeddingBag(30, 4, mode="sum", sparse=True)
    before = decayed.weight.detach().clone()
    optimizer = GroupwiseOptimizer([decayed.weight], lr=0.1, weight_decay=0.5)
    decayed(torch.tensor([2]), torch.tensor([0])).sum().backward()
    optimizer.step()
    assert torch.equal(decayed.weight[3:], before[3:]) and not torch.equal(decayed.weight[2], before[2])


def test_label_term_support_is_each_labels_strongest_cooccurring_terms_term_major():
    from xmc_dst.lexical import label_term_support

    rng = np.random.default_rng(0)
    docs, labels, terms_count, max_terms = 60, 9, 40, 5
    label_rows = [rng.choice(labels, size=rng.integers(0, 4), replace=False) for _ in range(docs)]
    term_rows = [rng.choice(terms_count, size=rng.integers(1, 8), replace=False) for _ in range(docs)]
    value_rows = [rng.random(len(t)).astype(np.float32) for t in term_rows]
    label_rows[0] = np.array([8])  # label 8: one document only, fewer terms than max_terms
    for d in range(1, docs):
        label_rows[d] = label_rows[d][label_rows[d] != 8]
    term_rows[0], value_rows[0] = np.array([3, 17]), np.array([0.5, 0.25], dtype=np.float32)

    def csr(rows):
        return np.cumsum([0] + [len(r) for r in rows]), np.concatenate(rows)

    (lo, li), (to, ti), tv = csr(label_rows), csr(term_rows), np.concatenate(value_rows)
    # brute force: the dense centroid sums; each label keeps its max_terms largest (ties by term), normalised
    dense = np.zeros((labels, terms_count))
    for d in range(docs):
        for label in label_rows[d]:
            dense[label, term_rows[d]] += value_rows[d]
    expected = np.zeros_like(dense)
    for label in range(labels):
        top = np.argsort(-dense[label], kind="stable")[:max_terms]
        top = top[dense[label, top] > 0]
        expected[label, top] = dense[label, top] / np.linalg.norm(dense[label, top])
    for max_pairs in (1 << 25, 7):  # one block, and many small blocks
        term_ptr, rows, values = label_term_support(lo, li, to, ti, tv, labels, terms_count, max_terms,
                                                    max_pairs=max_pairs)
        assert term_ptr.shape == (terms_count + 1,) and term_ptr[0] == 0 and term_ptr[-1] == rows.size == values.size
        got = np.zeros_like(dense)
        for term in range(terms_count):
            span = rows[term_ptr[term]:term_ptr[term + 1]]
            assert (np.diff(span) > 0).all()  # labels ascending, distinct within a term
            got[span, term] = values[term_ptr[term]:term_ptr[term + 1]]
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-7)
    assert set(np.flatnonzero(got[8]).tolist()) == {3, 17}
    assert (np.count_nonzero(got, axis=1) <= max_terms).all() and np.count_nonzero(got, axis=1).max() == max_terms
    # a connection budget: the largest per-label cap whose support fits it, found by trying every cap
    distinct = np.count_nonzero(dense, axis=1)
    for budget in (distinct.sum(), 20, 9):
        cap = max(k for k in range(1, distinct.max() + 1) if np.minimum(distinct, k).sum() <= budget or k == 1)
        _, rows, _ = label_term_support(lo, li, to, ti, tv, labels, terms_count, 10**6, max_connections=int(budget))
        per_label = np.bincount(rows, minlength=labels)
        np.testing.assert_array_equal(per_label, np.minimum(distinct, cap))
        assert rows.size <= budget or cap == 1
