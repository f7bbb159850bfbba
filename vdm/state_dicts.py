"""How one set of named tensors differs from the set it should match: missing, unexpected, other shapes."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from torch import Tensor


@dataclass(frozen=True)
class StateDictDiff:
    missing: list[str]  # expected, not given
    unexpected: list[str]  # given, not expected
    wrong_shape: list[tuple[str, tuple, tuple]]  # (name, given shape, expected shape)

    def __bool__(self) -> bool:
        return bool(self.missing or self.unexpected or self.wrong_shape)


def diff_state_dicts(expected: Mapping[str, Tensor], given: Mapping[str, Tensor]) -> StateDictDiff:
    return StateDictDiff(
        missing=sorted(set(expected) - set(given)),
        unexpected=sorted(set(given) - set(expected)),
        wrong_shape=sorted(
            (name, tuple(tensor.shape), tuple(expected[name].shape))
            for name, tensor in given.items()
            if name in expected and tensor.shape != expected[name].shape
        ),
    )
