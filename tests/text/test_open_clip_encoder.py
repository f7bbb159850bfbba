from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from vdm.text import OpenCLIPTextEncoder
from vdm.text.open_clip_models import MODEL_CONFIG_DIR

import open_clip  # isort: skip  (after vdm, which makes torchvision importable first)

CAPTIONS = ["a photo of a cat", "dog", ""]


def tiny(seed: int = 0, **kwargs) -> OpenCLIPTextEncoder:
    return OpenCLIPTextEncoder("clip-tiny", seed=seed, **kwargs)


def full_model(name: str, seed: int = 0) -> torch.nn.Module:
    # the full open_clip model, built exactly as the encoder builds it
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return open_clip.create_model(name, pretrained=None).eval()


def caption_lengths(captions: list[str], context_length: int = 32) -> list[int]:
    ids = open_clip.get_tokenizer("clip-tiny")(captions, context_length=context_length)
    return (ids != 0).sum(dim=1).tolist()


def register_variant(tmp_path, name: str, **overrides) -> str:
    # a clip-tiny variant registered with open_clip under a new name
    config = json.loads((MODEL_CONFIG_DIR / "clip-tiny.json").read_text())
    config.update(overrides)
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(config))
    open_clip.add_model_config(path)
    return name


@pytest.fixture(scope="module")
def encoder() -> OpenCLIPTextEncoder:
    return tiny()


def test_clip_tiny_is_registered():
    assert "clip-tiny" in open_clip.list_models()
    assert open_clip.get_model_config("clip-tiny")["text_cfg"]["context_length"] == 32


def test_shapes_mask_and_trim(encoder):
    cond = encoder.encode(CAPTIONS)
    lengths = caption_lengths(CAPTIONS)  # SOT + words + EOT
    L = max(lengths)
    assert L < 32  # padding was trimmed
    assert cond.tokens.shape == (3, L, encoder.dim) and cond.tokens.dtype == torch.float32
    assert cond.pooled.shape == (3, encoder.pooled_dim) and cond.pooled.dtype == torch.float32
    assert cond.mask.shape == (3, L) and cond.mask.dtype == torch.bool
    for row, n in zip(cond.mask, lengths, strict=True):
        assert row[:n].all() and not row[n:].any()
    assert cond.mask[2].tolist() == [True, True] + [False] * (L - 2)  # "" is SOT + EOT
    assert encoder.dim == encoder.width == encoder.pooled_dim == 64
    assert encoder.device == torch.device("cpu")


def test_max_length_truncates():
    enc = tiny(max_length=4)
    cond = enc.encode(["a photo of a very long caption", "dog"])
    assert cond.tokens.shape[1] == 4
    assert cond.mask.sum(dim=1).tolist() == [4, 3]
    assert tiny(max_length=1000).context_length == 32  # never longer than the position table
    with pytest.raises(ValueError, match="max_length"):
        tiny(max_length=1)


def test_rejects_bad_captions(encoder):
    for bad in ["a single string", [], ["ok", 3]]:
        with pytest.raises(ValueError, match="captions"):
            encoder.encode(bad)


def test_deterministic_init_independent_of_caller_rng():
    torch.manual_seed(123)
    a = tiny(seed=7).encode(CAPTIONS)
    torch.manual_seed(456)
    torch.rand(1000)
    b = tiny(seed=7).encode(CAPTIONS)
    c = tiny(seed=8).encode(CAPTIONS)
    assert torch.equal(a.tokens, b.tokens) and torch.equal(a.pooled, b.pooled)
    assert not torch.allclose(a.tokens, c.tokens)


def test_does_not_touch_caller_rng():
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    tiny(seed=9)
    assert torch.equal(torch.rand(3), expected)


def test_frozen(encoder):
    assert not any(p.requires_grad for p in encoder.parameters())
    assert not encoder.training
    parent = torch.nn.ModuleDict({"text": encoder}).train()
    assert parent.training and not encoder.training
    assert not any(m.training for m in encoder.modules())
    cond = encoder.encode(CAPTIONS)
    assert cond.tokens.grad_fn is None and cond.pooled.grad_fn is None


def test_vision_tower_dropped(encoder):
    keys = encoder.text_state_dict().keys()
    assert not any(k.startswith("visual.") for k in keys) and "logit_scale" not in keys
    assert "token_embedding.weight" in keys and "text_projection" in keys


def test_pooled_equals_open_clip_encode_text(encoder):
    full = full_model("clip-tiny")
    ids = open_clip.get_tokenizer("clip-tiny")(CAPTIONS)
    with torch.no_grad():
        expected = full.encode_text(ids)
    assert encoder.pooled_is_projected
    torch.testing.assert_close(encoder.encode(CAPTIONS).pooled, expected)


def test_custom_text_clip_matches_encode_text(tmp_path):
    name = register_variant(tmp_path, "vdm-test-clip-tiny-custom", custom_text=True)
    enc = OpenCLIPTextEncoder(name)
    assert isinstance(enc.model, open_clip.CustomTextCLIP)
    full = full_model(name)
    ids = open_clip.get_tokenizer(name)(CAPTIONS)
    with torch.no_grad():
        expected = full.encode_text(ids)
    torch.testing.assert_close(enc.encode(CAPTIONS).pooled, expected)


def test_pooled_is_unprojected_eot_feature_when_projection_changes_width(tmp_path):
    name = register_variant(tmp_path, "vdm-test-clip-tiny-embed32", embed_dim=32)
    enc = OpenCLIPTextEncoder(name)
    assert not enc.pooled_is_projected and enc.embed_dim == 32
    assert enc.dim == enc.pooled_dim == 64
    cond = enc.encode(CAPTIONS)
    assert cond.pooled.shape == (3, 64)
    eot = torch.tensor(caption_lengths(CAPTIONS)) - 1
    torch.testing.assert_close(cond.pooled, cond.tokens[torch.arange(3), eot])


@pytest.mark.parametrize("layout", ["text-only", "full"])
def test_safetensors_checkpoint_round_trip(tmp_path, encoder, layout):
    state = encoder.text_state_dict() if layout == "text-only" else full_model("clip-tiny").state_dict()
    path = tmp_path / "text.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    loaded = tiny(seed=1, checkpoint=path)
    assert not any(p.requires_grad for p in loaded.parameters())
    a, b = encoder.encode(CAPTIONS), loaded.encode(CAPTIONS)
    assert torch.equal(a.tokens, b.tokens) and torch.equal(a.pooled, b.pooled)


def test_checkpoint_with_wrong_keys_is_refused(tmp_path, encoder):
    state = dict(encoder.text_state_dict())
    del state["ln_final.weight"]
    state["transformer.extra"] = torch.zeros(1)
    path = tmp_path / "bad.safetensors"
    save_file(state, str(path))
    with pytest.raises(ValueError, match=r"ln_final\.weight.*transformer\.extra"):
        tiny(checkpoint=path)


@pytest.mark.parametrize("suffix", [".pt", ".bin", ".ckpt"])
def test_pickle_checkpoints_are_refused(tmp_path, suffix):
    path = tmp_path / f"weights{suffix}"
    path.write_bytes(b"not read")
    with pytest.raises(ValueError, match="safetensors"):
        tiny(checkpoint=path)


def test_features_are_causal(encoder):
    # open_clip's text transformer is causal: a token's feature ignores the tokens after it
    a, b = encoder.encode(["a b c", "a b d"]).tokens
    torch.testing.assert_close(a[:3], b[:3], rtol=0, atol=0)  # SOT, 'a', 'b'
    assert not torch.allclose(a[3], b[3])


def test_vit_b_32_random_weights():
    enc = OpenCLIPTextEncoder("ViT-B-32")
    assert enc.dim == enc.width == enc.pooled_dim == 512 and enc.context_length == 77
    cond = enc.encode(CAPTIONS)
    L = max(caption_lengths(CAPTIONS, 77))
    assert cond.tokens.shape == (3, L, 512) and cond.pooled.shape == (3, 512) and cond.mask.shape == (3, L)
