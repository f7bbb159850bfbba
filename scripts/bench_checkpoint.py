"""How long a checkpoint takes to save and to load, and how big it is, per model preset.

A checkpoint as vdm writes it under DDP: fp32 weights, AdamW's two moments, the fp32 EMA (plus a few
KB of loop and data-stream state). Saving is torch.save to `<name>.partial`, fsync, rename (as
Checkpointing does); loading is torch.load (memory-mapped) and load_state_dict into the model and
optimizer. The baseline, measured in the same run, is a plain write + fsync of the same number of
bytes, and a plain read: the ratio says how close to the disk's speed the checkpoint path is.

    python scripts/bench_checkpoint.py --presets dit_tiny dit_s dit_b --dir /tmp/ckpt-bench
"""

from __future__ import annotations

import argparse
import functools
import os
import shutil
import time
from pathlib import Path

import torch
import yaml

import vdm  # noqa: F401  (first: makes torchvision importable on CPU-only torch)

ROOT = Path(__file__).resolve().parents[1]


def build(preset: str) -> torch.nn.Module:
    from vdm.models.dit import SpaceTimeDiT

    config = yaml.safe_load((ROOT / "conf" / "model" / f"{preset}.yaml").read_text())
    config.pop("_target_")
    return SpaceTimeDiT(in_channels=4, text_dim=512, **config)


def training_state(net: torch.nn.Module) -> tuple[dict, torch.optim.Optimizer]:
    """The checkpoint's tensors after one real AdamW step (so both moments exist)."""
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-4)
    for param in net.parameters():
        param.grad = torch.randn_like(param)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    checkpoint = {
        "state_dict": net.state_dict(),
        "optimizer_states": [optimizer.state_dict()],
        "ema": {"weights": {k: v.detach().float().clone() for k, v in net.named_parameters()}, "num_updates": 1},
        "global_step": 1,
    }
    return checkpoint, optimizer


def synced_write(path: Path, write) -> float:
    start = time.perf_counter()
    with open(path, "wb") as file:
        write(file)
        file.flush()
        os.fsync(file.fileno())
    return time.perf_counter() - start


def drop_page_cache(path: Path) -> None:
    # reads after a write come from memory otherwise; POSIX_FADV_DONTNEED evicts the file's pages
    with open(path, "rb") as file:
        os.posix_fadvise(file.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)


def bench(preset: str, folder: Path) -> dict:
    net = build(preset)
    params = sum(p.numel() for p in net.parameters())
    checkpoint, optimizer = training_state(net)
    final, partial = folder / f"{preset}.ckpt", folder / f"{preset}.ckpt.partial"

    save = synced_write(partial, functools.partial(torch.save, checkpoint))
    start = time.perf_counter()
    os.replace(partial, final)
    save += time.perf_counter() - start
    size = final.stat().st_size

    chunk = torch.empty(64 << 20, dtype=torch.uint8).numpy().tobytes()  # 64 MiB

    def write_raw(file):
        for _ in range(size // len(chunk)):
            file.write(chunk)
        file.write(chunk[: size % len(chunk)])

    raw = folder / "raw.bin"
    raw_write = synced_write(raw, write_raw)
    drop_page_cache(raw)
    start = time.perf_counter()
    with open(raw, "rb") as file:
        while file.read(64 << 20):
            pass
    raw_read = time.perf_counter() - start
    raw.unlink()

    del checkpoint
    drop_page_cache(final)
    start = time.perf_counter()
    loaded = torch.load(final, map_location="cpu", mmap=True, weights_only=True)
    net.load_state_dict(loaded["state_dict"])
    optimizer.load_state_dict(loaded["optimizer_states"][0])
    ema = {k: v.clone() for k, v in loaded["ema"]["weights"].items()}  # the EMA leaves the mapped file
    load = time.perf_counter() - start
    del loaded, ema
    final.unlink()
    return {
        "preset": preset,
        "params_M": params / 1e6,
        "size_GB": size / 1e9,
        "bytes_per_param": size / params,
        "save_s": save,
        "load_s": load,
        "save_vs_raw_write": raw_write / save,
        "load_vs_raw_read": raw_read / load,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", nargs="+", default=["dit_tiny", "dit_s", "dit_b"])
    parser.add_argument("--dir", type=Path, default=Path("/tmp/vdm-checkpoint-bench"))
    args = parser.parse_args()
    args.dir.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(args.dir).free / 1e9
    print(
        f"{'preset':>9} {'params':>9} {'size':>9} {'B/param':>8} {'save':>8} {'load':>8} "
        f"{'save/raw':>9} {'load/raw':>9}   (free disk {free:.0f} GB)"
    )
    for preset in args.presets:
        r = bench(preset, args.dir)
        print(
            f"{r['preset']:>9} {r['params_M']:>8.1f}M {r['size_GB']:>8.3f}G {r['bytes_per_param']:>8.1f} "
            f"{r['save_s']:>7.2f}s {r['load_s']:>7.2f}s {r['save_vs_raw_write']:>9.2f} {r['load_vs_raw_read']:>9.2f}",
            flush=True,
        )


if __name__ == "__main__":
    main()
