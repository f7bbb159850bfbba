"""The T5 text encoder: transformers' own T5EncoderModel features, from a seeded config or a local folder of
safetensors, frozen; the run builds the network's text width from it."""

from __future__ import annotations

import shutil

import pytest
import torch
from transformers import ByT5Tokenizer, T5Config, T5EncoderModel

from tests.runs import train_two_steps
from vdm.text.t5_encoder import T5TextEncoder

CONFIG = dict(vocab_size=384, d_model=32, d_ff=64, d_kv=8, num_layers=2, num_heads=4)
CAPTIONS = ["a red digit 3 moves left", "", "7"]


def test_tokens_are_t5s_own_features_at_every_real_token_whatever_the_padding():
    encoder = T5TextEncoder(config=CONFIG, seed=3)
    cond = encoder.encode(CAPTIONS)
    assert cond.tokens.shape == (3, len("a red digit 3 moves left") + 1, 32)  # bytes and </s>
    assert cond.mask.sum(1).tolist() == [25, 1, 2]
    # PixArt's pipeline pads every caption to max_length: the real tokens' features are the same
    batch = ByT5Tokenizer()(CAPTIONS, padding="max_length", max_length=120, return_tensors="pt")
    with torch.no_grad():
        padded = encoder.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).last_hidden_state
    for row, length in enumerate(cond.mask.sum(1).tolist()):
        assert torch.allclose(cond.tokens[row, :length], padded[row, :length], atol=1e-6)
        assert torch.allclose(cond.pooled[row], padded[row, :length].mean(0), atol=1e-6)


def test_random_weights_depend_only_on_config_and_seed_and_leave_the_callers_rng_alone():
    torch.manual_seed(0)
    before = torch.random.get_rng_state()
    a, b = T5TextEncoder(config=CONFIG, seed=1), T5TextEncoder(config=CONFIG, seed=1)
    assert torch.equal(torch.random.get_rng_state(), before)
    assert all(torch.equal(x, y) for x, y in zip(a.model.state_dict().values(), b.model.state_dict().values()))
    c = T5TextEncoder(config=CONFIG, seed=2)
    assert not torch.equal(a.model.shared.weight, c.model.shared.weight)


def test_a_local_folder_of_safetensors_loads_and_a_pickled_one_is_refused(tmp_path):
    torch.manual_seed(5)
    model = T5EncoderModel(T5Config(**CONFIG)).eval()
    model.save_pretrained(tmp_path / "text_encoder", safe_serialization=True)
    ByT5Tokenizer().save_pretrained(tmp_path / "tokenizer")
    encoder = T5TextEncoder(path=tmp_path / "text_encoder", tokenizer=tmp_path / "tokenizer")
    assert encoder.dim == 32 and not any(p.requires_grad for p in encoder.parameters())
    encoder.train()
    assert not encoder.training  # frozen: eval mode whatever the parent does
    cond = encoder.encode(CAPTIONS)
    with torch.no_grad():
        ids = ByT5Tokenizer()(CAPTIONS, padding="longest", return_tensors="pt")
        expected = model(input_ids=ids.input_ids, attention_mask=ids.attention_mask).last_hidden_state
    assert torch.equal(cond.tokens, expected)

    pickled = tmp_path / "pickled"  # as older transformers wrote it: config.json and a pickled state dict
    pickled.mkdir()
    shutil.copy(tmp_path / "text_encoder" / "config.json", pickled)
    torch.save(model.state_dict(), pickled / "pytorch_model.bin")
    with pytest.raises(ValueError, match="pickles, never read"):
        T5TextEncoder(path=pickled, tokenizer=tmp_path / "tokenizer")
    with pytest.raises(ValueError, match="exactly one of path"):
        T5TextEncoder(path=tmp_path / "text_encoder", config=CONFIG)


def test_train_py_trains_with_t5_features(tmp_path):
    run = train_two_steps(tmp_path, "text=t5_tiny", "data.eval_clips=16", "sampling.steps=2")
    config = (run / "config.yaml").read_text()
    assert "text_dim: 64" in config and "T5TextEncoder" in config
