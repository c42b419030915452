"""The transformer encoder's bag of tokens against a naive per-document sum."""

from __future__ import annotations

import math

import pytest
import torch

from xmc_dst.encoders import EncoderInputs, TransformerEncoder


def naive_bag(encoder: TransformerEncoder, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Sum of the embedding rows of each real token and each bigram of two real tokens, over sqrt(their count)."""
    weight, vocab, buckets = encoder.token_bag.weight, encoder.vocab_size, encoder.token_bag_buckets
    rows = []
    for ids, mask in zip(input_ids.tolist(), attention_mask.tolist(), strict=True):
        terms = [t for t, m in zip(ids, mask, strict=True) if m]
        if buckets:
            terms += [vocab + (a * 1_000_003 + b) % buckets
                      for a, b, ma, mb in zip(ids, ids[1:], mask, mask[1:], strict=False) if ma and mb]
        total = torch.zeros(weight.shape[1], dtype=torch.float64)
        for term in terms:
            total += weight[term].double()
        rows.append(total / math.sqrt(max(len(terms), 1)))
    return torch.stack(rows)


@pytest.mark.parametrize("buckets", [0, 97])
def test_bag_of_tokens_matches_naive_sum(tiny_encoder_dir, buckets: int) -> None:
    encoder = TransformerEncoder(EncoderInputs(tokenizer=str(tiny_encoder_dir)), trainable_layers=0,
                                 token_bag_dim=8, token_bag_buckets=buckets)
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(0, encoder.vocab_size, (5, 7), generator=generator)
    attention_mask = torch.ones(5, 7, dtype=torch.long)
    attention_mask[1, 4:] = 0  # padded
    attention_mask[3, 1:] = 0  # a single token: no bigram
    got = encoder.bag_of_tokens(input_ids, attention_mask)
    torch.testing.assert_close(got.double(), naive_bag(encoder, input_ids, attention_mask), rtol=1e-5, atol=1e-6)


def test_bag_of_tokens_is_concatenated_and_trains_with_a_frozen_transformer(tiny_encoder_dir) -> None:
    plain = TransformerEncoder(EncoderInputs(tokenizer=str(tiny_encoder_dir)), trainable_layers=0)
    encoder = TransformerEncoder(EncoderInputs(tokenizer=str(tiny_encoder_dir)), trainable_layers=0,
                                 token_bag_dim=6, token_bag_buckets=11, cache_features=True)
    assert encoder.output_dim == plain.output_dim + 6
    batch = {"input_ids": torch.tensor([[2, 10, 11, 3], [2, 12, 3, 0]]),
             "attention_mask": torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]])}
    out = encoder(batch)
    assert out.shape == (2, encoder.output_dim)
    torch.testing.assert_close(out[:, : plain.output_dim], plain(batch))  # same weights (seeded build), same pooling
    out.sum().backward()
    assert encoder.token_bag.weight.grad is not None
    assert all(p.grad is None for p in encoder.transformer.parameters())
    touched = encoder.token_bag.weight.grad.abs().sum(1).nonzero().flatten()
    assert set(touched.tolist()) >= {2, 3, 10, 11, 12}  # every real token's row (and none of the padding: 0 unused)
    assert 0 not in touched.tolist()
