"""Model weights as one .safetensors file: the network, its EMA (optional) and the config that builds it.

Layout of a file written by `save_weights`:

    <name>                      the network's weights under their plain names (`blocks.0.attn.qkv.weight`)
    ema.<name>                  the EMA of the same weights, when there is one (same names, same shapes)
    metadata["vdm_model_config"] JSON of the SpaceTimeDiT constructor arguments, in_channels and text_dim included
    metadata["format"]          "pt"

Reading never unpickles: only .safetensors files are accepted, so a weights file from anywhere is safe to
load. Training checkpoints (Lightning files; DeepSpeed and FSDP2 directories) become weights files with
`scripts/export.py`.
"""

from __future__ import annotations

import inspect
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from vdm.models.dit import SpaceTimeDiT
from vdm.models.inflate import inflate
from vdm.state_dicts import diff_state_dicts

CONFIG_KEY = "vdm_model_config"
EMA_PREFIX = "ema."
SUFFIX = ".safetensors"


def _check_suffix(path: Path) -> None:
    if path.suffix != SUFFIX:
        raise ValueError(
            f"{path}: weights files must be {SUFFIX} (pickled formats such as .ckpt, .pt and .bin can run code "
            f"when loaded and are never read here); convert a training checkpoint with scripts/export.py"
        )


def model_kwargs() -> set[str]:
    """The SpaceTimeDiT constructor arguments a config may hold."""
    return set(inspect.signature(SpaceTimeDiT.__init__).parameters) - {"self"}


def _check_config(config: dict) -> None:
    if not isinstance(config, dict):
        raise ValueError(f"config must be a dict of SpaceTimeDiT arguments (got {type(config).__name__})")
    unknown = sorted(set(config) - model_kwargs())
    if unknown:
        raise ValueError(f"config has keys that are not SpaceTimeDiT arguments: {unknown}")
    missing = sorted(k for k in ("in_channels", "text_dim", "width", "depth", "heads") if k not in config)
    if missing:
        raise ValueError(f"config lacks required SpaceTimeDiT arguments: {missing}")


def _for_saving(tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    """Detached, contiguous CPU tensors, each owning its whole storage (safetensors refuses shared memory).

    A tensor is cloned only when it needs to be: when it is a view into a larger storage (e.g. the flat
    buffers that DeepSpeed's zero_to_fp32 returns views of) or shares its storage with another tensor.
    """
    out: dict[str, Tensor] = {}
    seen: set[tuple[str, int]] = set()
    for name, tensor in tensors.items():
        if not isinstance(tensor, Tensor):
            raise ValueError(f"{name}: expected a Tensor, got {type(tensor).__name__}")
        t = tensor.detach().to("cpu").contiguous()
        storage = t.untyped_storage()
        key = (str(storage.device), storage.data_ptr())
        whole = t.storage_offset() == 0 and storage.nbytes() == t.numel() * t.element_size()
        if key in seen or not whole:
            t = t.clone()
            key = (str(t.device), t.untyped_storage().data_ptr())
        if t.numel() > 0:  # empty tensors may all report the same (null) pointer
            seen.add(key)
        out[name] = t
    return out


def save_weights(
    path: str | os.PathLike,
    state_dict: dict[str, Tensor],
    config: dict,
    ema_state_dict: dict[str, Tensor] | None = None,
    extra_metadata: dict[str, str] | None = None,
) -> Path:
    """Write the network's weights, its EMA (optional) and its config to one .safetensors file.

    `state_dict` holds the network's weights under their plain names; `ema_state_dict`, when given, must
    have the same names and shapes. `config` is the SpaceTimeDiT constructor arguments (JSON-serializable,
    in_channels and text_dim included). The file is written under a temporary name and renamed when
    complete. `extra_metadata` (str to str, e.g. where the weights came from) is stored beside the config.
    Returns the path written.
    """
    path = Path(path)
    _check_suffix(path)
    _check_config(config)
    try:
        config_json = json.dumps(config, sort_keys=True)
    except (TypeError, ValueError) as error:
        raise ValueError(f"config must be JSON-serializable: {error}") from error
    if not state_dict:
        raise ValueError("state_dict is empty")
    clashing = sorted(k for k in state_dict if k.startswith(EMA_PREFIX))
    if clashing:
        raise ValueError(f"state_dict keys may not start with {EMA_PREFIX!r} (reserved for the EMA): {clashing[:5]}")

    tensors = dict(state_dict)
    if ema_state_dict is not None:
        diff = diff_state_dicts(state_dict, ema_state_dict)
        if diff:
            wrong_shape = [f"{k}: {given} != {expected}" for k, given, expected in diff.wrong_shape]
            raise ValueError(
                "ema_state_dict must have the names and shapes of state_dict: "
                f"missing {diff.missing[:5]}, unexpected {diff.unexpected[:5]}, wrong shapes {wrong_shape[:5]}"
            )
        tensors.update({EMA_PREFIX + k: v for k, v in ema_state_dict.items()})

    metadata = dict(extra_metadata or {})
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        raise ValueError("extra_metadata must map str to str")
    metadata.update({CONFIG_KEY: config_json, "format": "pt"})
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    save_file(_for_saving(tensors), str(partial), metadata=metadata)
    os.replace(partial, path)
    return path


def read_weights_file(path: str | os.PathLike, ema: bool = False) -> tuple[dict, dict[str, Tensor]]:
    """(config, state_dict) from a weights file; ema=True gives the EMA weights instead of the raw ones.

    Only .safetensors files are read: nothing is ever unpickled.
    """
    path = Path(path)
    _check_suffix(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such weights file")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as file:
            metadata = file.metadata() or {}
            if CONFIG_KEY not in metadata:
                raise ValueError(
                    f"{path}: not a vdm weights file (no {CONFIG_KEY!r} in its metadata); write one with "
                    "vdm.models.weights.save_weights or scripts/export.py"
                )
            config = json.loads(metadata[CONFIG_KEY])
            names = list(file.keys())
            wanted = [k for k in names if k.startswith(EMA_PREFIX) == ema]
            if ema and not wanted:
                raise ValueError(f"{path}: has no EMA weights (no {EMA_PREFIX}* tensors); load it with ema=False")
            state_dict = {k.removeprefix(EMA_PREFIX) if ema else k: file.get_tensor(k) for k in wanted}
    except SafetensorError as error:
        raise ValueError(f"{path}: not a readable .safetensors file: {error}") from error
    return config, state_dict


def read_metadata(path: str | os.PathLike) -> dict[str, str]:
    """A weights file's metadata (the config as JSON under "vdm_model_config", and what else was stored)."""
    path = Path(path)
    _check_suffix(path)
    try:
        with safe_open(str(path), framework="pt", device="cpu") as file:
            return dict(file.metadata() or {})
    except SafetensorError as error:
        raise ValueError(f"{path}: not a readable .safetensors file: {error}") from error


def has_ema(path: str | os.PathLike) -> bool:
    """Whether a weights file holds EMA weights."""
    path = Path(path)
    _check_suffix(path)
    try:
        with safe_open(str(path), framework="pt", device="cpu") as file:
            return any(k.startswith(EMA_PREFIX) for k in file.keys())
    except SafetensorError as error:
        raise ValueError(f"{path}: not a readable .safetensors file: {error}") from error


def build_from_weights(path: str | os.PathLike, ema: bool = False, device: str | torch.device = "cpu") -> SpaceTimeDiT:
    """The SpaceTimeDiT a weights file describes, with its weights (or EMA weights) loaded strictly, in eval mode.

    The network is built on the meta device and takes the file's tensors as its parameters, so no time
    or memory goes into an initialization that would be overwritten. Parameters keep the file's dtype.
    """
    config, state_dict = read_weights_file(path, ema=ema)
    _check_config(config)
    with torch.device("meta"):
        net = SpaceTimeDiT(**config)
    _compare(net, state_dict, strict=True, source=Path(path))
    net.load_state_dict(state_dict, strict=True, assign=True)
    return net.to(device).eval()


def load_weights(
    path: str | os.PathLike, temporal: bool | None = None, ema: bool = False, device: str | torch.device = "cpu"
) -> SpaceTimeDiT:
    """The SpaceTimeDiT of a weights file, in eval mode: as it was saved (temporal=None, or the file's own kind),
    or, with temporal=True for an image model's file, the video model inflated from it, which equals the image
    model on every frame (vdm/models/inflate.py). A video model's file is never made an image model."""
    saved = json.loads(read_metadata(path).get(CONFIG_KEY, "{}")).get("temporal", True)
    if temporal is None or temporal == saved:
        return build_from_weights(path, ema=ema, device=device)
    if not temporal:
        raise ValueError(f"{path}: holds a video model (temporal=true); it cannot be loaded as an image model")
    config, state_dict = read_weights_file(path, ema=ema)
    _check_config(config)
    net = SpaceTimeDiT(**{**config, "temporal": True})
    inflate(net, state_dict, strict=True)
    return net.to(device).eval()


@dataclass
class LoadReport:
    """What `load_into` did: the names it loaded and, with strict=False, those it could not."""

    loaded: list[str]
    missing: list[str] = field(default_factory=list)  # in the network, not in the file: left as they were
    unexpected: list[str] = field(default_factory=list)  # in the file, not in the network: ignored
    config: dict = field(default_factory=dict)  # the config stored in the file

    def __str__(self) -> str:
        return f"loaded {len(self.loaded)} tensors; missing {len(self.missing)}; unexpected {len(self.unexpected)}"


def _names(names: list[str], limit: int = 10) -> str:
    """A list of names for an error message: the first `limit`, then how many more."""
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return f"{names[:limit]}{more}"


def _compare(net: nn.Module, state_dict: dict[str, Tensor], strict: bool, source: Path) -> tuple[list, list]:
    diff = diff_state_dicts(net.state_dict(), state_dict)
    missing, unexpected = diff.missing, diff.unexpected
    wrong_shape = [f"{k}: file {given} vs network {expected}" for k, given, expected in diff.wrong_shape]
    if wrong_shape:
        raise ValueError(
            f"{source}: shapes do not match the network for {len(wrong_shape)} keys: {_names(wrong_shape)}"
        )
    if strict and (missing or unexpected):
        raise ValueError(
            f"{source}: keys do not match the network (strict): missing {_names(missing)}, "
            f"unexpected {_names(unexpected)}; load with strict=False to initialize only the matching part "
            "(e.g. an image model into a video model)"
        )
    return missing, unexpected


def load_into(net: nn.Module, path: str | os.PathLike, ema: bool = False, strict: bool = True) -> LoadReport:
    """Copy a weights file's tensors into an existing network (fine-tuning init), in place.

    strict=True: the file's names must be exactly the network's. strict=False: the matching names are
    loaded, the network's other tensors keep their values (e.g. the temporal layers of a video model
    initialized from an image model, which start silent), and the file's extra names are ignored; the
    report lists both. A shape mismatch is always refused, naming the keys. Nothing is changed when an
    error is raised. Values are converted to each parameter's dtype and device.
    """
    config, state_dict = read_weights_file(path, ema=ema)
    return load_state_into(net, state_dict, strict=strict, source=path, config=config)


def load_state_into(
    net: nn.Module, state_dict: dict[str, Tensor], strict: bool = True, source: str | os.PathLike = "", config=None
) -> LoadReport:
    """`load_into` for tensors already read (`source` names where they came from in errors)."""
    missing, unexpected = _compare(net, state_dict, strict=strict, source=Path(source))
    matching = {k: v for k, v in state_dict.items() if k not in unexpected}
    net.load_state_dict(matching, strict=False)
    return LoadReport(loaded=sorted(matching), missing=missing, unexpected=unexpected, config=config or {})
