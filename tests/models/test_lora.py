"""LoRA adapters with peft: they start as nothing, train while the layers they adapt stay frozen, merge back into
the plain network exactly, and written alone in peft's layout load back through peft itself."""

from __future__ import annotations

import torch
from peft import LoraConfig, inject_adapter_in_model, set_peft_model_state_dict
from safetensors.torch import load_file

from vdm.models import SpaceTimeDiT
from vdm.models.lora import adapter_files, add_lora, merged
from vdm.models.param_groups import set_trainable
from vdm.types import TextCond

ARGS = dict(in_channels=3, text_dim=16, width=32, depth=2, heads=2, patch_size=(1, 2, 2))


def trained_net(seed: int = 0) -> SpaceTimeDiT:
    """A network with every weight random, as a trained one is (the fresh init's zero gates would hide a bug)."""
    torch.manual_seed(seed)
    net = SpaceTimeDiT(**ARGS)
    with torch.no_grad():
        for parameter in net.parameters():
            parameter.copy_(0.1 * torch.randn_like(parameter))
    return net.eval()


def inputs():
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, 3, 8, 8, generator=generator)
    cond = TextCond(torch.randn(2, 4, 16, generator=generator), torch.ones(2, 4, dtype=torch.bool), torch.randn(2, 16))
    return x, torch.tensor([0.3, 0.8]), cond


def adapted(seed: int = 0) -> SpaceTimeDiT:
    net = trained_net(seed)
    add_lora(net, rank=4, alpha=8.0, targets=["spatial_attn", "mlp"])
    return net


def perturb_adapters(net) -> None:
    generator = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name, parameter in net.named_parameters():
            if ".lora_B." in name:  # B starts at zero; a trained one does not
                parameter.copy_(0.1 * torch.randn(parameter.shape, generator=generator))


def test_adapters_start_as_nothing_and_only_they_train_on_the_adapted_layers():
    plain, net = trained_net(), adapted()
    x, t, cond = inputs()
    with torch.no_grad():
        assert torch.equal(net(x, t, cond), plain(x, t, cond))
    counts = set_trainable(net, "temporal")
    trains = {name for name, p in net.named_parameters() if p.requires_grad}
    assert trains and all(".lora_" in n or "temporal" in n for n in trains)
    assert any(".lora_A." in n for n in trains) and not any(".base_layer." in n for n in trains)
    assert counts["spatial"] == sum(p.numel() for n, p in net.named_parameters() if ".lora_" in n)
    set_trainable(net, "all")  # everything else trains; the adapted weights still do not
    assert not any(p.requires_grad for n, p in net.named_parameters() if ".base_layer." in n)
    assert all(p.requires_grad for n, p in net.named_parameters() if ".base_layer." not in n)


def test_merged_weights_are_the_adapted_network():
    net = adapted()
    perturb_adapters(net)
    plain = SpaceTimeDiT(**ARGS).eval()
    plain.load_state_dict(merged(net.state_dict()), strict=True)
    x, t, cond = inputs()
    with torch.no_grad():
        assert (plain(x, t, cond) - net(x, t, cond)).abs().max() <= 1e-5


def test_adapters_written_alone_load_through_peft(tmp_path):
    net = adapted()
    perturb_adapters(net)
    adapter_files(net.state_dict(), tmp_path / "adapters")
    config = LoraConfig.from_pretrained(str(tmp_path / "adapters"))
    assert config.r == 4 and config.lora_alpha == 8.0
    base = trained_net()  # the plain network the adapters were trained on
    inject_adapter_in_model(config, base)
    result = set_peft_model_state_dict(base, load_file(str(tmp_path / "adapters" / "adapter_model.safetensors")))
    assert not result.unexpected_keys
    x, t, cond = inputs()
    with torch.no_grad():
        assert torch.equal(base(x, t, cond), net(x, t, cond))
