"""Sequence parallelism for the factorized space-time DiT: each clip's frames split over a group of ranks.

Why split by frames. The block's spatial attention, cross-attention and MLP read one frame (or one token) at a
time, so with whole frames on each rank they run locally with no communication. Only the temporal attention needs
every frame of a spatial position: around it, one all-to-all scatters the heads and gathers the frames, so each rank
attends over the whole clip for nh / sp of the heads, and a second all-to-all brings the frames back (DeepSpeed-
Ulysses, Jacobs et al. 2023; Open-Sora 1.2's STDiT3 does the same). Per block that is 4 all-to-alls of the
temporal branch's (N, nh, t, hd) tensors (q, k, v forward, the output back), each moving (sp - 1) / sp of them.

Why our own all-to-all rather than `deepspeed.sequence.layer.DistributedAttention`. DistributedAttention wraps the
whole attention call in DeepSpeed's sequence-first layout ([s, b, h, d], scatter and gather indices); vdm's
attention keeps (N, nh, S, hd) for SDPA and its qk-norm, and SP must run under DDP and FSDP2 without DeepSpeed
installed or imported. Both end in `torch.distributed.all_to_all_single`; the one here is that call with its
exact adjoint as the backward (an all-to-all is a permutation of blocks, so its adjoint is the reverse
all-to-all), about 30 lines, and gloo runs it, so the equality tests run on CPU processes.

The model side (vdm/models, pure PyTorch) only calls the methods of a `FrameSplit`; `enable(net, group)` hands
one to the network (`SpaceTimeDiT.set_sequence_parallel`). The network's input and output stay whole: every rank
of a group is given the same clip, the network cuts out its frames, and its output is gathered again, so the
objective, the loss, the held-out loss and the sampler see exactly the unsplit model's tensors. The gather's
backward sums the output gradients of the group's ranks (a reduce-scatter, done as an all-to-all): with every
rank of the group computing the same clip loss L, each rank's parameters get its share of d(sp * L), and the
data-parallel mean over all world = dp * sp ranks is the mean over the dp groups of dL, the unsplit gradient.

Shape legend: N attention batch (B * s for the temporal branch), nh heads, t frames of this rank, T = sp * t all
frames, hd head width; B batch, C channels.
"""

from __future__ import annotations

import logging

import torch
import torch.distributed as dist
from einops import rearrange
from torch import Tensor

log = logging.getLogger(__name__)


def _all_to_all(blocks: Tensor, group) -> Tensor:
    """Send blocks[j] to rank j of `group`; return (sp, ...) whose [j] came from rank j."""
    blocks = blocks.contiguous()
    out = torch.empty_like(blocks)  # contiguous too: empty_like keeps a view's strides, the collective does not
    dist.all_to_all_single(out, blocks, group=group)
    return out


class _AllToAll(torch.autograd.Function):
    """An all-to-all over the leading dim, differentiable: the backward is the same all-to-all of the gradients
    (block j sent to rank j came back as block r of rank j's output, so its gradient goes back the same way)."""

    @staticmethod
    def forward(ctx, blocks: Tensor, group) -> Tensor:
        ctx.group = group
        return _all_to_all(blocks, group)

    @staticmethod
    def backward(ctx, grad: Tensor):
        return _all_to_all(grad, ctx.group), None


class _GatherFrames(torch.autograd.Function):
    """(sp, ...) local block on every rank -> all ranks' blocks (sp, ...) stacked; backward: this rank's block
    of the sum of all ranks' gradients (a reduce-scatter, done as an all-to-all and a sum: gloo has no
    reduce-scatter)."""

    @staticmethod
    def forward(ctx, local: Tensor, group, size: int) -> Tensor:
        ctx.group = group
        local = local.contiguous()
        parts = [torch.empty_like(local) for _ in range(size)]
        dist.all_gather(parts, local, group=group)
        return torch.stack(parts)

    @staticmethod
    def backward(ctx, grad: Tensor):
        return _all_to_all(grad, ctx.group).sum(dim=0), None, None


class FrameSplit:
    """This rank's place in a sequence-parallel group, and the collectives the network calls.

    `group` is a torch.distributed process group (None: the default, all ranks); `rank` and `size` are this
    rank's index in it and its size.
    """

    def __init__(self, group=None):
        self.group = group
        self.rank = dist.get_rank(group)
        self.size = dist.get_world_size(group)

    def check(self, what: str, value: int) -> None:
        if value % self.size:
            raise ValueError(
                f"sequence parallelism over {self.size} ranks needs {what} divisible by {self.size} "
                f"(got {what}={value}); change the clip length, patch size or heads, or sequence_parallel_size"
            )

    def local_frames(self, x: Tensor, dim: int, frames: int) -> Tensor:
        """This rank's `frames // size` frames of `x` along `dim` (frames = x.shape[dim] in patch frames)."""
        self.check("the patch frames (T / pt)", frames)
        chunk = x.shape[dim] // self.size
        return x.narrow(dim, self.rank * chunk, chunk)

    def frame_offset(self, local_frames: int) -> int:
        """The global index of this rank's first frame (the temporal position encoding needs global indices)."""
        return self.rank * local_frames

    def gather_frames(self, x: Tensor, dim: int) -> Tensor:
        """All ranks' frames of `x` concatenated along `dim`, in rank order (differentiable)."""
        parts = _GatherFrames.apply(x, self.group, self.size)  # (sp, ...)
        return torch.cat(parts.unbind(0), dim=dim)

    def heads_to_frames(self, x: Tensor) -> Tensor:
        """(N, nh, t, hd) this rank's frames, all heads -> (N, nh / sp, T, hd) all frames, this rank's heads."""
        self.check("heads", x.shape[1])
        blocks = rearrange(x, "n (sp h) t d -> sp n h t d", sp=self.size)  # block j: the heads rank j attends with
        received = _AllToAll.apply(blocks, self.group)  # [j]: rank j's frames of my heads
        return rearrange(received, "sp n h t d -> n h (sp t) d")

    def frames_to_heads(self, x: Tensor) -> Tensor:
        """The inverse: (N, nh / sp, T, hd) -> (N, nh, t, hd)."""
        blocks = rearrange(x, "n h (sp t) d -> sp n h t d", sp=self.size)  # block j: rank j's frames
        received = _AllToAll.apply(blocks, self.group)  # [j]: my frames of rank j's heads
        return rearrange(received, "sp n h t d -> n (sp h) t d")


def enable(net, group=None) -> FrameSplit:
    """Split `net`'s clips by frames over `group` (a SpaceTimeDiT or anything with `set_sequence_parallel`)."""
    split = FrameSplit(group)
    net.set_sequence_parallel(split)
    log.info(
        "sequence parallelism: rank %d is %d of %d in its group; each clip's frames are split %d ways",
        dist.get_rank(),
        split.rank,
        split.size,
        split.size,
    )
    return split


def sequence_groups(world_size: int, size: int):
    """Create the process groups of `size` consecutive ranks (every rank must call it, in the same order) and
    return this rank's. Ranks r with the same r // size form one group: they get the same clips (data rank
    r // size); the data-parallel mean runs over all ranks (see the module docstring for why that is right)."""
    if size < 1 or world_size % size:
        raise ValueError(f"world size {world_size} is not divisible by sequence_parallel_size={size}")
    rank = dist.get_rank()
    mine = None
    for first in range(0, world_size, size):
        group = dist.new_group(list(range(first, first + size)))
        if first <= rank < first + size:
            mine = group
    return mine
