"""This rank's shard of each parameter, for state kept per parameter beside the strategy's own (the EMA), and
that state in checkpoints. The one place that knows how each strategy lays a parameter out over the ranks.

What `local_shards` gives, by strategy:
  * DDP, ZeRO 1/2, one process ("whole"): every rank holds the parameter; its shard is the parameter itself.
  * DeepSpeed ZeRO-3 ("zero3"): `param.ds_tensor`, this rank's flat partition. The parameter is flattened,
    padded at the end to a multiple of the world size and cut into equal parts, part r on rank r (what
    `assemble_zero3` undoes). `param.data` is empty outside a gather, except for the small "persistent"
    parameters (under stage3_param_persistence_threshold), which DeepSpeed keeps gathered between forwards
    and gathers again after each optimizer step.
  * FSDP2 ("fsdp2"): a DTensor sharded on dim 0 (torch.chunk's split: the last ranks may hold fewer rows, or
    none); `to_local()` is this rank's rows, a view of the storage FSDP all-gathers from before a forward.
    The root module keeps its gathered parameters after a forward without a backward (evaluation).

A shard is a view of the parameter's own storage: writing it changes the parameter. `shards_written` then
drops the gathered copies a strategy keeps (ZeRO-3's persistent parameters, FSDP2's root after a forward), so
the next forward gathers what was written, as it gathers the trained weights after an optimizer step.

In checkpoints (`save_sharded`, `load_sharded`): a whole state goes in the Lightning checkpoint as it is.
ZeRO-3: each rank's DeepSpeed model-states file holds that rank's entry (its partitions, and the layout);
it resumes with the same world size only. FSDP2: Lightning writes only rank 0's entry (meta.pt), so the
shards go into the state dict as DTensors laid out as their parameters; torch.distributed.checkpoint writes
each rank's part and re-shards it on load, with any world size.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import Tensor, nn

WHOLE, ZERO3, FSDP2 = "whole", "zero3", "fsdp2"


def shard_kind(net: nn.Module) -> str:
    """How the running strategy holds `net`'s parameters: WHOLE, ZERO3 or FSDP2."""
    from torch.distributed.fsdp import FSDPModule

    if isinstance(net, FSDPModule):
        return FSDP2
    first = next(net.parameters(), None)
    return ZERO3 if first is not None and hasattr(first, "ds_tensor") else WHOLE


def world() -> tuple[int, int]:
    """(rank, world size) of the default process group; (0, 1) without one."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def local_shards(net: nn.Module) -> dict[str, Tensor]:
    """{parameter name: this rank's shard of it}, each a detached view of the parameter's storage."""
    kind = shard_kind(net)
    if kind == FSDP2:
        _reshard_fsdp(net)  # the sharded DTensors registered, not a root's gathered copies
    with torch.no_grad():
        if kind == ZERO3:
            return {name: p.ds_tensor.detach() for name, p in net.named_parameters()}
        if kind == FSDP2:
            return {name: p.to_local().detach() for name, p in net.named_parameters()}
        return {name: p.detach() for name, p in net.named_parameters()}


@torch.no_grad()
def shards_written(net: nn.Module) -> None:
    """After writing into `local_shards(net)`: the next forward sees what was written (every rank calls it)."""
    kind = shard_kind(net)
    if kind == FSDP2:
        _reshard_fsdp(net)
    elif kind == ZERO3:
        # persistent parameters stay gathered: release and gather them again, as DeepSpeed's own step does
        gathered = [p for p in net.parameters() if p.ds_status.name == "AVAILABLE"]
        if gathered:
            gathered[0].partition(gathered)
            gathered[0].all_gather(gathered)


def _reshard_fsdp(net: nn.Module) -> None:
    # FSDPModule.reshard() is a no-op for a root still in its forward state (it keeps its gathered parameters
    # after a forward without backward); reset_iter_state reshards every group. Outside a step nothing is lost.
    from torch.distributed.tensor import DTensor

    if any(not isinstance(p, DTensor) for p in net.parameters()):
        net.reset_iter_state()


def full_shapes(net: nn.Module) -> dict[str, list[int]]:
    """{parameter name: its whole shape}, whoever holds it."""
    return {name: list(p.ds_shape if hasattr(p, "ds_shape") else p.shape) for name, p in net.named_parameters()}


def layout(net: nn.Module) -> dict:
    """How `local_shards(net)` cuts the parameters, as plain values (kept beside sharded state in checkpoints)."""
    rank, world_size = world()
    return {"kind": shard_kind(net), "rank": rank, "world_size": world_size, "shapes": full_shapes(net)}


def assemble_zero3(parts: list[Tensor], shape: list[int]) -> Tensor:
    """A whole tensor from its ZeRO-3 partitions, in rank order (each ceil(numel / ranks) long, the end padded)."""
    numel = math.prod(shape)
    expected = math.ceil(numel / len(parts)) if parts else 0
    if any(part.numel() != expected for part in parts):
        sizes = [part.numel() for part in parts]
        raise ValueError(
            f"ZeRO-3 partitions of a {shape} tensor over {len(parts)} ranks are {expected} long, not {sizes}"
        )
    return torch.cat([part.reshape(-1) for part in parts])[:numel].reshape(shape)


# ------------------------------------------------------------------ in checkpoints


def save_sharded(state: dict, net: nn.Module, checkpoint: dict, prefix: str) -> dict:
    """The checkpoint entry for `state`, whose "weights" are `local_shards(net)`-shaped tensors by parameter name.

    Whole and ZeRO-3: `state` itself (ZeRO-3's with its layout). FSDP2: the weights go into
    `checkpoint["state_dict"]` under `prefix + name`, as DTensors laid out as their parameters; the entry keeps
    the rest of `state` and the layout.
    """
    kind = shard_kind(net)
    if kind == WHOLE:
        return state
    entry = {**state, "shards": layout(net)}
    if kind == FSDP2:
        from torch.distributed.tensor import DTensor

        _reshard_fsdp(net)
        weights = entry.pop("weights")
        for name, param in net.named_parameters():
            checkpoint["state_dict"][prefix + name] = DTensor.from_local(
                weights[name], param.device_mesh, param.placements, shape=param.shape, stride=param.stride()
            )
    return entry


def load_sharded(entry: dict, net: nn.Module, path: str | Path | None, prefix: str, what: str = "state") -> dict:
    """`state` back from what `save_sharded` wrote, its weights shaped as this run's `local_shards(net)`.

    `path` is the checkpoint being resumed (FSDP2 reads its DTensors from there, re-sharded to this run's
    world size). A ZeRO-3 entry written by another number of processes is refused: its partitions do not fit.
    `what` names the state in messages.
    """
    saved = entry.get("shards")
    kind = shard_kind(net)
    saved_kind = saved["kind"] if saved else WHOLE
    if saved_kind != kind:
        raise ValueError(
            f"the checkpoint's {what} was written {describe(saved_kind)}, "
            f"this run holds the parameters {describe(kind)}: resume it with the strategy that wrote it"
        )
    _, world_size = world()
    if kind == ZERO3 and saved["world_size"] != world_size:
        raise ValueError(
            f"the checkpoint's {what} is partitioned by DeepSpeed ZeRO-3 over "
            f"{saved['world_size']} processes, this run has {world_size}; ZeRO-3 partitions are not re-cut: "
            "resume it with the number of processes that wrote it"
        )
    if kind != FSDP2:
        return entry
    if path is None:
        raise ValueError(f"an FSDP2 checkpoint's {what} is read from the checkpoint directory: none given")
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint import load as load_distributed
    from torch.distributed.tensor import DTensor

    _reshard_fsdp(net)
    templates = {
        prefix + name: DTensor.from_local(
            torch.empty_like(p.to_local()), p.device_mesh, p.placements, shape=p.shape, stride=p.stride()
        )
        for name, p in net.named_parameters()
    }
    load_distributed({"state_dict": templates}, storage_reader=FileSystemReader(str(path)))
    weights = {key[len(prefix) :]: tensor.to_local() for key, tensor in templates.items()}
    return {**{k: v for k, v in entry.items() if k != "shards"}, "weights": weights}


def describe(kind: str) -> str:
    return {WHOLE: "whole on every rank", ZERO3: "as ZeRO-3 partitions", FSDP2: "as FSDP2 shards"}.get(kind, kind)
