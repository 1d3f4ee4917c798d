"""The offline text encoder, and transformers' T5 encoder importable beside vgen's `kernels` package."""

import torch

from vgen.models.text_encoder import TextEncoder


def test_default_encoder_is_offline_and_pretrained():
    enc = TextEncoder(max_length=16)
    emb, mask = enc(["a red circle moving left", "a blue square moving up", ""])
    assert emb.shape == (3, 16, 384) and mask.shape == (3, 16)
    assert mask[2].sum() == 2  # [CLS] [SEP] of the empty prompt
    # pretrained weights: related captions are closer than unrelated ones
    pooled = torch.nn.functional.normalize((emb * mask[..., None]).sum(1) / mask.sum(1, keepdim=True), dim=-1)
    paraphrase = enc(["a red circle moving to the left"])[0][0]
    near = torch.nn.functional.normalize(paraphrase[mask[0]].mean(0), dim=0)
    assert (near @ pooled[0]) > (near @ pooled[1])


def test_cache_returns_identical_embeddings():
    enc = TextEncoder(max_length=8)
    a = enc(["x y z", "hello"])[0]
    b = enc(["hello", "x y z"])[0]
    assert torch.equal(a[0], b[1]) and torch.equal(a[1], b[0])


def test_transformers_t5_encoder_imports_with_vgen_installed():
    import kernels  # noqa: F401  (vgen's own package of this name)
    from transformers import T5Config, T5EncoderModel

    model = T5EncoderModel(T5Config(vocab_size=32, d_model=16, d_ff=32, num_layers=1, num_heads=2, d_kv=8))
    out = model(input_ids=torch.tensor([[1, 2, 3]])).last_hidden_state
    assert out.shape == (1, 3, 16)


def test_missing_encoder_directory_is_named(tmp_path):
    import pytest

    with pytest.raises(FileNotFoundError, match="text.encoder_path"):
        TextEncoder(tmp_path / "nope")
