from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from einops import rearrange

from vdm.models.attention import Attention


def reference_attention(attn: Attention, x, context=None, mask=None, qk_norm=False):
    # Written out with an explicit softmax, independent of scaled_dot_product_attention.
    source = x if context is None else context
    q = rearrange(attn.to_q(x), "n s (h d) -> n h s d", h=attn.heads)
    k, v = rearrange(attn.to_kv(source), "n l (two h d) -> two n h l d", two=2, h=attn.heads)
    if qk_norm:
        q = F.rms_norm(q, q.shape[-1:], attn.q_norm.weight, attn.q_norm.eps)
        k = F.rms_norm(k, k.shape[-1:], attn.k_norm.weight, attn.k_norm.eps)
    logits = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5  # (n, h, s, l)
    if mask is not None:
        logits = logits.masked_fill(~rearrange(mask, "n l -> n 1 1 l"), float("-inf"))
    out = rearrange(logits.softmax(dim=-1) @ v, "n h s d -> n s (h d)")
    return attn.proj(out)


def test_self_attention_matches_reference():
    torch.manual_seed(0)
    attn = Attention(32, heads=4, qk_norm=False)
    x = torch.randn(3, 7, 32)
    torch.testing.assert_close(attn(x), reference_attention(attn, x))


def test_cross_attention_with_mask_matches_reference():
    torch.manual_seed(0)
    attn = Attention(32, heads=4, context_dim=12, qk_norm=False)
    x, context = torch.randn(2, 5, 32), torch.randn(2, 6, 12)
    mask = torch.tensor([[True, True, True, False, False, False], [True] * 6])
    torch.testing.assert_close(attn(x, context, mask), reference_attention(attn, x, context, mask))


def test_qk_norm_matches_reference_with_rmsnorm():
    torch.manual_seed(0)
    attn = Attention(32, heads=2, qk_norm=True)
    with torch.no_grad():  # non-trivial norm weights, so a missing or misplaced norm is visible
        attn.q_norm.weight.normal_(1.0, 0.5)
        attn.k_norm.weight.normal_(1.0, 0.5)
    x = torch.randn(2, 9, 32)
    torch.testing.assert_close(attn(x), reference_attention(attn, x, qk_norm=True))
    assert not torch.allclose(attn(x), reference_attention(attn, x, qk_norm=False))


def test_masked_context_tokens_have_no_effect():
    torch.manual_seed(0)
    attn = Attention(16, heads=2, context_dim=8)
    x, context = torch.randn(2, 4, 16), torch.randn(2, 5, 8)
    mask = torch.tensor([[True, True, False, False, False], [True, False, True, False, True]])
    changed = context.clone()
    changed[~mask] = torch.randn(int((~mask).sum()), 8) * 100
    torch.testing.assert_close(attn(x, context, mask), attn(x, changed, mask), rtol=0, atol=0)
    # ...while a real token does matter
    changed[0, 0] += 1.0
    assert not torch.allclose(attn(x, context, mask)[0], attn(x, changed, mask)[0])


def test_fully_masked_row_is_finite_and_reads_as_no_text():
    torch.manual_seed(0)
    attn = Attention(16, heads=2, context_dim=8)
    x, context = torch.randn(2, 4, 16), torch.randn(2, 3, 8)
    mask = torch.tensor([[False, False, False], [True, True, False]])
    out = attn(x, context, mask)
    assert torch.isfinite(out).all()
    # no token to read: the attention result is zero, leaving only the output bias
    torch.testing.assert_close(out[0], attn.proj.bias.expand(4, 16))
    torch.testing.assert_close(out[1:], attn(x[1:], context[1:], mask[1:]))


def test_output_shape_and_batch_independence():
    torch.manual_seed(0)
    attn = Attention(24, heads=3)
    x = torch.randn(4, 6, 24)
    out = attn(x)
    assert out.shape == x.shape
    torch.testing.assert_close(out[2:3], attn(x[2:3]))


def test_heads_must_divide_dim():
    with pytest.raises(ValueError, match="heads"):
        Attention(30, heads=4)
