"""The encoders against direct computations: pooling against the Hugging Face model itself, freezing, length
chunks and the feature cache against whole-batch results, the bag of words against a dense product (the lexical
projection: tests/test_lexical.py)."""

from __future__ import annotations

import pytest
import torch

from xmc_dst.encoders import BagOfWordsEncoder, EncoderInputs, TransformerEncoder, masked_mean


def _text_batch(tiny_encoder_dir, texts=("the python library", "a game", "network data file tool python")):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_encoder_dir)
    enc = tok(list(texts), padding=True, return_tensors="pt")
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}


def test_masked_mean_matches_loop():
    hidden = torch.randn(3, 5, 4)
    mask = torch.tensor([[1, 1, 0, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]])
    expected = torch.stack([hidden[i, : int(mask[i].sum())].mean(0) for i in range(3)])
    torch.testing.assert_close(masked_mean(hidden, mask), expected)


@pytest.mark.parametrize("pooling,num_layers,layers", [("mean", 1, None), ("cls", 1, None), ("cls_concat", 2, None),
                                                        ("mean", 1, [-1, 0]), ("cls", 1, [1, -1])])
def test_transformer_pooling_matches_direct_model(tiny_encoder_dir, pooling, num_layers, layers):
    from transformers import AutoModel

    batch = _text_batch(tiny_encoder_dir)
    encoder = TransformerEncoder(EncoderInputs(tokenizer=str(tiny_encoder_dir)), pooling=pooling,
                                 num_layers=num_layers, layers=layers).eval()
    reference = AutoModel.from_pretrained(tiny_encoder_dir).eval()
    with torch.no_grad():
        out = reference(**batch, output_hidden_states=True)
        got = encoder(batch)
    mask = batch["attention_mask"]
    wanted = layers or ([-1, -2] if pooling == "cls_concat" else [-1])
    parts = []
    for layer in wanted:  # naive pooling, document by document
        state = out.hidden_states[layer]
        if pooling == "mean":
            parts.append(torch.stack([state[i, mask[i].bool()].mean(0) for i in range(len(mask))]))
        else:
            parts.append(state[:, 0])
    assert encoder.output_dim == 32 * len(wanted)
    torch.testing.assert_close(got, torch.cat(parts, dim=1), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="layers"):
        TransformerEncoder(EncoderInputs(tokenizer=str(tiny_encoder_dir)), layers=[3])  # 2 layers + embeddings


def test_transformer_freezing_and_architecture_only(tiny_encoder_dir):
    inputs = EncoderInputs(tokenizer=str(tiny_encoder_dir))
    top = TransformerEncoder(inputs, trainable_layers=1)
    trainable = {name for name, p in top.named_parameters() if p.requires_grad}
    assert trainable and all(name.startswith("transformer.encoder.layer.1.") for name in trainable)
    frozen = TransformerEncoder(inputs, trainable_layers=0, dropout=0.5).train()
    assert not any(p.requires_grad for p in frozen.parameters()) and not frozen.transformer.training
    batch = _text_batch(tiny_encoder_dir)
    assert not frozen(batch).requires_grad
    bare = TransformerEncoder(EncoderInputs(tokenizer=str(tiny_encoder_dir), pretrained_weights=False))
    full = TransformerEncoder(inputs)
    assert bare.state_dict().keys() == full.state_dict().keys()
    with pytest.raises(ValueError, match="model location"):
        TransformerEncoder(EncoderInputs())


def test_length_chunks_give_the_whole_batch_result(tiny_encoder_dir):
    texts = ("a", "the python library tool", "game", "network data file tool python and the data", "of", "file")
    batch = _text_batch(tiny_encoder_dir, texts)
    inputs = EncoderInputs(tokenizer=str(tiny_encoder_dir))
    for pooling in ("mean", "cls"):
        whole = TransformerEncoder(inputs, pooling=pooling).eval()
        chunked = TransformerEncoder(inputs, pooling=pooling, length_chunks=3).eval()
        with torch.no_grad():
            torch.testing.assert_close(chunked(batch), whole(batch), rtol=1e-5, atol=1e-5)


def test_feature_cache_is_exact_and_computes_each_document_once(tiny_encoder_dir):
    inputs = EncoderInputs(tokenizer=str(tiny_encoder_dir))
    plain = TransformerEncoder(inputs, trainable_layers=0).eval()
    cached = TransformerEncoder(inputs, trainable_layers=0, cache_features=True, dropout=0.3)
    seen = []
    cached.transformer.register_forward_hook(
        lambda module, args, kwargs, out: seen.append(kwargs["input_ids"].shape[0]), with_kwargs=True)
    first = _text_batch(tiny_encoder_dir, ("the python library", "a game", "file tool"))
    second = _text_batch(tiny_encoder_dir, ("a game", "network data", "the python library", "file tool"))
    cached.eval()
    with torch.no_grad():
        torch.testing.assert_close(cached(first), plain(first), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(cached(second), plain(second), rtol=1e-5, atol=1e-5)
    assert seen == [3, 1]  # the second batch computes only its new document
    assert len(cached.cache) == 4
    cached.train()  # dropout still applies to cached vectors in training
    assert not torch.equal(cached(second), plain(second))
    with pytest.raises(ValueError, match="frozen"):
        TransformerEncoder(inputs, cache_features=True)


def test_transformer_compile_keeps_outputs_and_state_keys(tiny_encoder_dir):
    inputs = EncoderInputs(tokenizer=str(tiny_encoder_dir))
    plain = TransformerEncoder(inputs).eval()
    compiled = TransformerEncoder(inputs, compile=True, compile_options={"backend": "eager"}).eval()
    assert compiled.state_dict().keys() == plain.state_dict().keys()
    batch = _text_batch(tiny_encoder_dir)
    with torch.no_grad():
        torch.testing.assert_close(compiled(batch), plain(batch))


def test_bag_of_words_matches_dense_product():
    torch.manual_seed(0)
    encoder = BagOfWordsEncoder(EncoderInputs(num_features=10), embedding_dim=6, hidden_dim=4, normalize=True)
    ids = torch.tensor([1, 4, 4, 9, 0, 2])  # a repeated feature id sums
    values = torch.tensor([0.5, 1.0, 2.0, 0.3, 1.5, 0.7])
    offsets = torch.tensor([0, 3, 3, 6])  # the middle document is empty
    dense = torch.zeros(3, 10)
    for row in range(3):
        for j in range(offsets[row], offsets[row + 1]):
            dense[row, ids[j]] += values[j]
    norms = torch.zeros(3)
    for row in range(3):
        norms[row] = values[offsets[row]:offsets[row + 1]].pow(2).sum().sqrt().clamp(min=1e-12)
    expected = torch.relu(encoder.dense(torch.relu((dense / norms[:, None]) @ encoder.embedding.weight)))
    got = encoder({"feature_ids": ids, "feature_values": values, "feature_offsets": offsets})
    torch.testing.assert_close(got, expected)
    assert encoder.output_dim == 4
    with pytest.raises(ValueError, match="number of features"):
        BagOfWordsEncoder(EncoderInputs())
