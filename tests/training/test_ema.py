"""The EMA of the weights, against its closed form: decay and warm-up, update_every, start_step, swap-in, resume."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from vdm.training.ema import EMA


def scalar_net(value: float) -> nn.Module:
    net = nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        net.weight.fill_(value)
    return net


def run(ema: EMA, values: list[float]) -> list[float | None]:
    """The weight takes values[i] after optimizer step i + 1; the EMA after each step (None: none yet)."""
    net, seen = scalar_net(0.0), []
    for step, value in enumerate(values, start=1):
        with torch.no_grad():
            net.weight.fill_(value)
        ema.step(net.named_parameters(), step)
        seen.append(ema.weights["weight"].item() if ema.weights else None)
    return seen


def test_without_warmup_the_average_is_the_exponential_recurrence():
    values = [1.0, 2.0, 4.0, 8.0, 16.0]
    expected, average = [], None
    for value in values:
        average = value if average is None else 0.5 * average + 0.5 * value  # the first update copies
        expected.append(average)
    assert run(EMA(decay=0.5, warmup=False), values) == pytest.approx(expected)


def test_warmup_ramps_the_decay_as_one_plus_n_over_ten_plus_n():
    ema = EMA(decay=0.9999)
    assert [ema.decay_at(n) for n in (0, 1, 10, 10**6)] == pytest.approx([0.1, 2 / 11, 11 / 20, 0.9999])
    values = [3.0, 5.0, 7.0]
    first = 3.0
    second = 0.1 * first + 0.9 * 5.0  # num_updates = 0: decay 1/10
    third = (2 / 11) * second + (9 / 11) * 7.0  # num_updates = 1: decay 2/11
    assert run(EMA(decay=0.9999), values) == pytest.approx([first, second, third])


def test_update_every_k_steps_uses_decay_to_the_k_so_the_horizon_stays_in_steps():
    values = [1.0, 2.0, 3.0, 4.0, 5.0]
    seen = run(EMA(decay=0.9, warmup=False, update_every=2), values)
    # copied at step 1; updated at the steps that are multiples of 2 after start_step (0), with decay 0.9 ** 2
    after_2 = 0.81 * 1.0 + 0.19 * 2.0
    after_4 = 0.81 * after_2 + 0.19 * 4.0
    assert seen == pytest.approx([1.0, after_2, after_2, after_4, after_4])


def test_start_step_begins_with_a_copy_of_the_weights_then():
    seen = run(EMA(decay=0.5, warmup=False, start_step=3), [1.0, 2.0, 3.0, 5.0])
    assert seen == [None, None, 3.0, 4.0]


def test_disabled_never_averages():
    ema = EMA(enabled=False)
    assert run(ema, [1.0, 2.0]) == [None, None] and ema.num_updates == 0


def test_swapped_in_puts_the_average_in_place_and_restores_the_weights_bit_for_bit():
    net = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    ema = EMA(decay=0.5, warmup=False)
    ema.step(net.named_parameters(), 1)
    before = {name: p.detach().clone() for name, p in net.named_parameters()}
    with torch.no_grad():
        for p in net.parameters():
            p.add_(1.0)
    ema.step(net.named_parameters(), 2)  # average = weights - 0.5
    trained = {name: p.detach().clone() for name, p in net.named_parameters()}
    copies = []  # the values in place each time the swap says it wrote them (a strategy's gathered copies renew)
    with ema.swapped_in(dict(net.named_parameters()), written=lambda: copies.append(net[0].bias.detach().clone())):
        for name, p in net.named_parameters():
            assert torch.allclose(p, before[name] + 0.5)
    for name, p in net.named_parameters():
        assert torch.equal(p, trained[name])
    assert (
        len(copies) == 2
        and torch.allclose(copies[0], before["0.bias"] + 0.5)
        and torch.equal(copies[1], trained["0.bias"])
    )


def test_state_round_trips_in_float32_whatever_the_weights_dtype():
    net = scalar_net(2.0).to(torch.bfloat16)
    ema = EMA(decay=0.5, warmup=False)
    ema.step(net.named_parameters(), 1)
    assert ema.weights["weight"].dtype == torch.float32
    restored = EMA(decay=0.5, warmup=False)
    restored.load_state_dict(ema.state_dict())
    assert restored.num_updates == ema.num_updates and torch.equal(restored.weights["weight"], ema.weights["weight"])


def test_a_checkpoints_ema_must_fit_the_tensors_it_averages():
    # a sharded run resumed with its shards cut another way, or another model: refused by name, not broadcast
    ema = EMA(decay=0.5, warmup=False)
    ema.step({"w": torch.ones(4), "b": torch.ones(2)}, 1)
    with pytest.raises(ValueError, match=r"w is \(4,\) there, \(2,\) here"):
        EMA().load_state_dict(ema.state_dict(), like={"w": torch.zeros(2), "b": torch.zeros(2)})
    with pytest.raises(ValueError, match="missing c; unexpected b"):
        EMA().load_state_dict(ema.state_dict(), like={"w": torch.zeros(4), "c": torch.zeros(2)})
    restored = EMA()
    restored.load_state_dict(ema.state_dict(), like={"w": torch.zeros(4), "b": torch.zeros(2, dtype=torch.bfloat16)})
    assert restored.weights["b"].dtype == torch.float32 and torch.equal(restored.weights["w"], torch.ones(4))


@pytest.mark.parametrize("settings", [{"decay": 1.0}, {"update_every": 0}, {"start_step": -1}])
def test_bad_settings_are_refused_by_name(settings):
    with pytest.raises(ValueError, match=next(iter(settings))):
        EMA(**settings)
