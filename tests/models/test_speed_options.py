"""The speed switches change how the network computes, never what: selective activation checkpointing, the
SDPA kernel choice and regional compilation give the plain network's outputs and gradients."""

from __future__ import annotations

import pytest
import torch

from vdm.models import SpaceTimeDiT
from vdm.models import blocks as blocks_module
from vdm.models import dit as dit_module
from vdm.models.flops import attention_flops, block_flops, forward_flops, train_flops_per_clip
from vdm.types import TextCond


def make(depth: int = 4, **kwargs) -> SpaceTimeDiT:
    torch.manual_seed(0)
    net = SpaceTimeDiT(in_channels=3, text_dim=16, width=32, depth=depth, heads=2, patch_size=(1, 4, 4), **kwargs)
    with torch.no_grad():  # away from the zero init, so every branch and gradient counts
        for p in net.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    return net.train()


def inputs():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, 4, 16, 16, generator=g)
    mask = torch.tensor([[True] * 5, [True, True, False, False, False]])
    cond = TextCond(torch.randn(2, 5, 16, generator=g), mask, torch.randn(2, 16, generator=g))
    return x, torch.tensor([0.3, 0.8]), cond


def forward_backward(net):
    net.zero_grad(set_to_none=True)
    device = next(net.parameters()).device
    x, t, cond = inputs()
    out = net(x.to(device), t.to(device), cond.to(device))
    out.square().mean().backward()
    return out.detach().cpu(), {n: p.grad.cpu() for n, p in net.named_parameters()}


def assert_same(a, b, **tolerance):
    torch.testing.assert_close(a[0], b[0], **tolerance)
    torch.testing.assert_close(a[1], b[1], **tolerance)


@pytest.mark.parametrize("every, scope", [(2, "block"), (1, "attention"), (3, "attention")])
def test_selective_checkpointing_matches_the_plain_network_and_recomputes_what_it_says(monkeypatch, every, scope):
    plain = forward_backward(make())
    calls = []
    for module in (dit_module, blocks_module):
        real = module.checkpoint

        def counting(function, *args, _real=real, **kwargs):
            calls.append(type(function).__name__)
            return _real(function, *args, **kwargs)

        monkeypatch.setattr(module, "checkpoint", counting)
    net = make(grad_checkpointing=True, grad_checkpointing_every=every, grad_checkpointing_scope=scope)
    assert_same(forward_backward(net), plain)
    checkpointed = len(range(0, 4, every))  # blocks 0, k, 2k, ... of 4
    if scope == "block":
        assert calls == ["SpaceTimeBlock"] * checkpointed
    else:  # spatial, temporal and cross-attention of each checkpointed block
        assert calls == ["Attention"] * (3 * checkpointed)


def test_recomputed_flops_follow_the_checkpointing_policy():
    net = make(grad_checkpointing=True, grad_checkpointing_every=2, grad_checkpointing_scope="attention")
    T, H, W, L = 4, 16, 16, 5
    t, s = 4, 16
    extra = train_flops_per_clip(net, T, H, W, L) - 3 * forward_flops(net, T, H, W, L)
    assert extra == 2 * attention_flops(net.blocks[0], t, s, L)  # blocks 0 and 2, their attention only
    whole = make(grad_checkpointing=True, grad_checkpointing_every=3)
    extra = train_flops_per_clip(whole, T, H, W, L) - 3 * forward_flops(whole, T, H, W, L)
    assert extra == 2 * block_flops(whole.blocks[0], t, s, L)  # blocks 0 and 3
    assert attention_flops(net.blocks[0], t, s, L) < block_flops(net.blocks[0], t, s, L)


@pytest.mark.parametrize("backend", ["math", "flash", ["flash", "math"]])
def test_an_sdpa_backend_that_runs_gives_the_same_network(backend):
    reference = forward_backward(make())
    net = make(attention_backend=backend)
    net.check_attention_backend(torch.device("cpu"), torch.float32)
    assert_same(forward_backward(net), reference, rtol=1e-4, atol=1e-5)


def test_a_backend_that_cannot_run_here_is_refused_at_the_check_with_what_can():
    net = make(attention_backend="cudnn")  # no cuDNN kernel on a CPU
    with pytest.raises(ValueError, match=r"attention_backend: \['cudnn'\] cannot run .* usable here one by one: "):
        net.check_attention_backend(torch.device("cpu"), torch.float32)
    with pytest.raises(ValueError, match="attention_backend must be auto, or one or a list of flash, cudnn"):
        make(attention_backend="fastest")
    with pytest.raises(ValueError, match="grad_checkpointing_scope must be block or attention"):
        make(grad_checkpointing_scope="mlp")


def compiled_matches_plain(monkeypatch, backend: str, device: str = "cpu") -> None:
    torch._dynamo.reset()
    real = torch.nn.Module.compile
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, **kw: real(self, **({"backend": backend} | kw)))
    reference = forward_backward(make(depth=1).to(device))
    net = make(depth=1, compile_blocks=True).to(device)
    assert all(block._compiled_call_impl is not None for block in net.blocks)
    assert [n for n, _ in net.named_parameters()] == [n for n, _ in make(depth=1).named_parameters()]  # names stay
    assert_same(forward_backward(net), reference, rtol=1e-4, atol=1e-5)
    net.set_grad_checkpointing(True)  # the compiled block runs inside checkpoint and again in the backward pass
    assert_same(forward_backward(net), reference, rtol=1e-4, atol=1e-5)
    torch._dynamo.reset()


def test_compiled_blocks_trace_and_differentiate_like_the_plain_network(monkeypatch):
    # dynamo's graph capture and AOT autograd, with the eager backend: what can break with checkpointing (2 s)
    compiled_matches_plain(monkeypatch, "aot_eager")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="inductor's kernels are checked where they run: on a GPU")
def test_inductor_compiled_blocks_give_the_plain_networks_outputs_and_gradients(monkeypatch):
    # inductor's Triton kernels for one block, the path compile_blocks takes on a GPU. On a CPU inductor writes
    # C++ kernels instead (45-60 s for one block on the 2-core CI machine): aot_eager above covers the capture.
    compiled_matches_plain(monkeypatch, "inductor", device="cuda")
