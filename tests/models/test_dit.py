from __future__ import annotations

import pytest
import torch

import vdm.models.dit as dit_module
from vdm.models import SpaceTimeBlock, SpaceTimeDiT
from vdm.models.embeddings import PatchEmbed3d, TimestepEmbedding, sincos_1d, sincos_2d
from vdm.types import TextCond

C, DT = 4, 16  # latent channels, text width
TINY = dict(in_channels=C, text_dim=DT, width=32, depth=2, heads=2)


def make(**overrides) -> SpaceTimeDiT:
    torch.manual_seed(0)
    return SpaceTimeDiT(**{**TINY, **overrides})


def randomize(module: torch.nn.Module, std: float = 0.05) -> None:
    with torch.no_grad():
        for p in module.parameters():
            torch.nn.init.normal_(p, std=std)


def text(batch: int = 2, length: int = 5, seed: int = 1) -> TextCond:
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(batch, length, dtype=torch.bool)
    mask[0, 3:] = False  # first caption is padded
    return TextCond(torch.randn(batch, length, DT, generator=g), mask, torch.randn(batch, DT, generator=g))


def video(batch=2, T=4, H=8, W=8, seed=2) -> torch.Tensor:
    return torch.randn(batch, C, T, H, W, generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------- embeddings


def test_sincos_2d_layout():
    emb = sincos_2d(3, 5, 16)
    assert emb.shape == (15, 16) and emb.dtype == torch.float32
    grid = emb.reshape(3, 5, 16)
    # first half encodes the row only, second half the column only
    assert torch.equal(grid[:, 0, :8], grid[:, 4, :8])
    assert torch.equal(grid[0, :, 8:], grid[2, :, 8:])
    torch.testing.assert_close(grid[2, 4, :8], sincos_1d(torch.tensor([2.0]), 8)[0])
    assert len({tuple(row.tolist()) for row in emb}) == 15  # every position distinct


def test_patch_embed_layout_and_divisibility():
    embed = PatchEmbed3d(3, 8, (2, 2, 2))
    tokens, grid = embed(torch.randn(1, 3, 4, 6, 8))
    assert tokens.shape == (1, 2, 12, 8) and grid == (2, 3, 4)
    with pytest.raises(ValueError, match="patch"):
        embed(torch.randn(1, 3, 3, 6, 8))


def test_timestep_embedding_separates_times():
    torch.manual_seed(0)
    emb = TimestepEmbedding(32)
    out = emb(torch.tensor([0.0, 0.001, 0.5, 1.0]))
    assert out.shape == (4, 32)
    assert torch.cdist(out, out).add(torch.eye(4)).min() > 0


# ---------------------------------------------------------------- shapes and dtypes


@pytest.mark.parametrize(
    "patch, thw",
    [
        ((1, 2, 2), (1, 8, 8)),
        ((1, 2, 2), (4, 16, 8)),
        ((1, 2, 2), (6, 8, 16)),
        ((2, 2, 2), (4, 16, 8)),
        ((2, 2, 2), (6, 8, 16)),
    ],
)
def test_output_shape_equals_input_shape(patch, thw):
    model = make(patch_size=patch)
    x = video(T=thw[0], H=thw[1], W=thw[2])
    out = model(x, torch.rand(2), text())
    assert out.shape == x.shape and out.dtype == x.dtype


def test_patch_size_list_is_accepted_and_output_dtype_follows_input():
    model = make(patch_size=[1, 2, 2])
    assert model.patch_size == (1, 2, 2)
    x = video(T=2).to(torch.bfloat16)
    assert model(x, torch.rand(2), text()).dtype == torch.bfloat16


def test_fresh_model_predicts_zero():
    # zero-initialized output layer (DiT): the untrained network starts from a zero prediction
    model = make()
    assert torch.equal(model(video(), torch.rand(2), text()), torch.zeros(2, C, 4, 8, 8))


def test_block_class_names_the_block():
    model = make()
    assert model.block_class is SpaceTimeBlock
    assert all(isinstance(b, SpaceTimeDiT.block_class) for b in model.blocks)


# ---------------------------------------------------------------- conditioning


def test_timestep_changes_output():
    model = make()
    randomize(model)
    x, cond = video(), text()
    a = model(x, torch.tensor([0.1, 0.1]), cond)
    b = model(x, torch.tensor([0.9, 0.9]), cond)
    assert not torch.allclose(a, b)


def test_caption_changes_output_but_padding_does_not():
    model = make()
    randomize(model)
    x, t, cond = video(), torch.rand(2), text()
    out = model(x, t, cond)
    padded = TextCond(cond.tokens.clone(), cond.mask, cond.pooled)
    padded.tokens[0, 3:] = 30.0
    assert torch.equal(out, model(x, t, padded))
    other = TextCond(cond.tokens.clone(), cond.mask, cond.pooled)
    other.tokens[0, 0] += 1.0
    assert not torch.allclose(out[0], model(x, t, other)[0])


def test_samples_in_a_batch_are_independent():
    model = make()
    randomize(model)
    x, t, cond = video(), torch.rand(2), text()
    single = TextCond(cond.tokens[1:], cond.mask[1:], cond.pooled[1:])
    torch.testing.assert_close(model(x, t, cond)[1:], model(x[1:], t[1:], single))


# ---------------------------------------------------------------- space-time structure


def test_image_model_treats_frames_independently():
    model = make(temporal=False)
    randomize(model)
    x, t, cond = video(), torch.rand(2), text()
    changed = x.clone()
    changed[:, :, 0] += 1.0
    out, out_changed = model(x, t, cond), model(changed, t, cond)
    assert torch.equal(out[:, :, 3], out_changed[:, :, 3])
    assert not torch.allclose(out[:, :, 0], out_changed[:, :, 0])


def test_video_model_mixes_frames():
    model = make(temporal=True)
    randomize(model)
    x, t, cond = video(), torch.rand(2), text()
    changed = x.clone()
    changed[:, :, 0] += 1.0
    assert not torch.allclose(model(x, t, cond)[:, :, 3], model(changed, t, cond)[:, :, 3])


def test_inflated_video_model_equals_image_model_at_init():
    image = make(temporal=False)
    randomize(image)  # nonzero outputs, so equality means something
    video_model = make(temporal=True)
    result = video_model.load_state_dict(image.state_dict(), strict=False)
    assert result.unexpected_keys == []
    assert result.missing_keys and all(
        k.startswith("temporal_modulation.") or ".temporal_attn." in k or k.endswith(".temporal_modulation")
        for k in result.missing_keys
    )
    temporal_keys = {k for k in video_model.state_dict() if "temporal" in k}
    assert set(result.missing_keys) == temporal_keys

    x, t, cond = video(), torch.rand(2), text()
    out_image, out_video = image(x, t, cond), video_model(x, t, cond)
    assert out_image.abs().max() > 0
    assert torch.equal(out_video, out_image)
    for f in range(x.shape[2]):
        torch.testing.assert_close(out_video[:, :, f : f + 1], image(x[:, :, f : f + 1], t, cond))


# ---------------------------------------------------------------- training machinery


def test_grad_checkpointing_matches_plain_forward_and_backward():
    model = make()
    randomize(model)
    model.train()
    x, t, cond = video(), torch.rand(2), text()

    def run():
        model.zero_grad(set_to_none=True)
        out = model(x, t, cond)
        out.square().mean().backward()
        return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    out_plain, grads_plain = run()
    model.set_grad_checkpointing(True)
    assert model.grad_checkpointing
    out_ckpt, grads_ckpt = run()
    torch.testing.assert_close(out_ckpt, out_plain)
    torch.testing.assert_close(grads_ckpt, grads_plain)


def test_grad_checkpointing_used_only_when_training_with_grad(monkeypatch):
    calls = []
    real = dit_module.checkpoint

    def counting(*args, **kwargs):
        calls.append(kwargs.get("use_reentrant"))
        return real(*args, **kwargs)

    monkeypatch.setattr(dit_module, "checkpoint", counting)
    model = make(grad_checkpointing=True)
    x, t, cond = video(), torch.rand(2), text()
    model.train()
    model(x, t, cond)
    assert calls == [False, False]  # one per block, non-reentrant
    with torch.no_grad():
        model(x, t, cond)
    model.eval()
    model(x, t, cond)
    assert len(calls) == 2


def test_initialize_weights_sets_every_parameter():
    # A meta-built model materialized with to_empty() is fully defined by initialize_weights().
    reference = make()
    torch.manual_seed(123)
    reference.initialize_weights()
    with torch.device("meta"):
        lazy = SpaceTimeDiT(**TINY)
    lazy.to_empty(device="cpu")
    torch.manual_seed(123)
    lazy.initialize_weights()
    ref_state, lazy_state = reference.state_dict(), lazy.state_dict()
    assert ref_state.keys() == lazy_state.keys()
    for k in ref_state:
        assert torch.equal(ref_state[k], lazy_state[k]), k


def test_xl_preset_parameter_count():
    with torch.device("meta"):
        model = SpaceTimeDiT(in_channels=4, text_dim=1024, width=1152, depth=28, heads=16, patch_size=(1, 2, 2))
    n = sum(p.numel() for p in model.parameters())
    assert 650e6 < n < 800e6


# ---------------------------------------------------------------- validation


@pytest.mark.parametrize(
    "overrides, name",
    [
        (dict(width=100, heads=3), "heads"),
        (dict(width=0), "width"),
        (dict(depth=0), "depth"),
        (dict(heads=-1), "heads"),
        (dict(in_channels=0), "in_channels"),
        (dict(text_dim=2.5), "text_dim"),
        (dict(patch_size=(1, 2)), "patch_size"),
        (dict(patch_size=(1, 0, 2)), "patch_size"),
        (dict(mlp_ratio=0.0), "mlp_ratio"),
        (dict(max_frames=0), "max_frames"),
        (dict(max_size=-4), "max_size"),
        (dict(width=30, heads=3), "width"),
    ],
)
def test_bad_arguments_name_themselves(overrides, name):
    with pytest.raises(ValueError, match=name):
        SpaceTimeDiT(**{**TINY, **overrides})


@pytest.mark.parametrize(
    "shape, name",
    [
        ((2, C, 5, 8, 8), "max_frames"),
        ((2, C, 2, 16, 8), "max_size"),
        ((2, C, 2, 8, 7), "patch_size"),
        ((2, 3, 2, 8, 8), "in_channels"),
    ],
)
def test_bad_inputs_are_rejected(shape, name):
    model = make(max_frames=4, max_size=8)
    with pytest.raises(ValueError, match=name):
        model(torch.randn(shape), torch.rand(2), text())
