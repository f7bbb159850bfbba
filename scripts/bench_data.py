"""How fast the data pipeline turns shards into clips, against a plain PyAV decoding loop on the same files.

    python scripts/bench_data.py [--clips 96] [--frames 16] [--size 256] [--repeats 3] [--workers 2]

Builds mp4 shards in a temporary folder (H.264 from vdm.data.video.encode_mp4, with B-frames), from real
photographs panned and zoomed across frames when scikit-image is installed (its bundled astronaut,
coffee, chelsea and rocket), else from synthetic moving shapes over a moving pattern with noise. Two
source sizes: exactly size x size (no resize) and 3:2-larger 4:3 frames (the resize path). Then times,
on the same shards, each measurement `--repeats` times (median reported):

  (a) baseline: read each mp4 from the tars, PyAV-decode its first `frames` frames to rgb24 numpy
  (b) the vdm pipeline, one process: VideoShardDataset over the shards -> normalized float clips
  (c) the same with a DataLoader of `--workers` worker processes (0: skipped)
  and, to show where (b) spends its time: vdm's decode_frames alone, frames_to_clip alone.

Per core = clips per CPU-second of the process (its threads, and its DataLoader workers for (c)), so it
holds when other programs share the machine. The share of step time a training run waits for data is
in the data_wait column of a train.py run's metrics.csv, not measured here.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import pstats
import resource
import statistics
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import av
import numpy as np
import torch
from PIL import Image

import vdm.data as vdm_data
from vdm.data.shard_writer import write_shard
from vdm.data.transforms import frames_to_clip
from vdm.data.video import decode_frames, encode_mp4

FPS = 24
CLIPS_PER_SHARD = 32
BATCH_SIZE = 8


def photographs() -> list[np.ndarray] | None:
    try:
        from skimage import data
    except ImportError:
        return None
    return [data.astronaut(), data.coffee(), data.chelsea(), data.rocket()]


def photo_clip(image: np.ndarray, num_frames: int, height: int, width: int, rng: np.random.Generator) -> np.ndarray:
    """A camera panning across a photograph and zooming in: crops of a moving, shrinking window."""
    image_h, image_w = image.shape[:2]
    aspect = width / height
    crop_h0 = min(image_h, image_w / aspect) * rng.uniform(0.7, 0.9)
    zoom = rng.uniform(0.8, 0.95)  # the window's size at the last frame, relative to the first
    start = rng.uniform(0, 1, 2)
    direction = rng.choice([-1, 1], 2)
    frames = []
    for t in range(num_frames):
        crop_h = crop_h0 * (1 + (zoom - 1) * t / max(1, num_frames - 1))
        crop_w = crop_h * aspect
        room_y, room_x = image_h - crop_h, image_w - crop_w
        fy = np.clip(start[0] + direction[0] * 0.4 * t / num_frames, 0, 1)
        fx = np.clip(start[1] + direction[1] * 0.6 * t / num_frames, 0, 1)
        box = (fx * room_x, fy * room_y, fx * room_x + crop_w, fy * room_y + crop_h)
        frame = np.asarray(Image.fromarray(image).resize((width, height), Image.BILINEAR, box=box), dtype=np.float32)
        frames.append(frame + rng.normal(0, 2, frame.shape))  # a little sensor noise
    return np.clip(np.stack(frames), 0, 255).astype(np.uint8)


def synthetic_clip(num_frames: int, height: int, width: int, rng: np.random.Generator) -> np.ndarray:
    """Moving coloured discs over a drifting smooth pattern, with noise."""
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    freq = rng.uniform(0.02, 0.08, 3)
    phase = rng.uniform(0, 6.3, 3)
    discs = [
        (
            rng.uniform(0, height),
            rng.uniform(0, width),
            rng.uniform(-4, 4, 2),
            rng.uniform(10, 50),
            rng.integers(0, 256, 3),
        )
        for _ in range(4)
    ]
    frames = []
    for t in range(num_frames):
        frame = np.stack(
            [120 + 80 * np.sin(freq[c] * (xx + 2 * t) + 0.7 * freq[c] * yy + phase[c]) for c in range(3)], -1
        )
        for cy, cx, (vy, vx), radius, colour in discs:
            frame[(yy - cy - vy * t) ** 2 + (xx - cx - vx * t) ** 2 < radius**2] = colour
        frames.append(frame + rng.normal(0, 4, frame.shape))
    return np.clip(np.stack(frames), 0, 255).astype(np.uint8)


def make_sample(args: tuple[int, int, int, int, bool]) -> tuple[str, dict[str, bytes]]:
    index, num_frames, height, width, use_photos = args
    rng = np.random.default_rng(index)
    images = photographs() if use_photos else None
    if images:
        frames = photo_clip(images[index % len(images)], num_frames, height, width, rng)
    else:
        frames = synthetic_clip(num_frames, height, width, rng)
    meta = {"frames": num_frames, "fps": FPS, "width": width, "height": height}
    sample = {"mp4": encode_mp4(frames, FPS), "txt": f"clip {index}".encode(), "json": json.dumps(meta).encode()}
    return f"clip{index:05d}", sample


def build_shards(folder: Path, clips: int, num_frames: int, height: int, width: int, use_photos: bool) -> list[str]:
    with ProcessPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        samples = list(pool.map(make_sample, [(i, num_frames, height, width, use_photos) for i in range(clips)]))
    paths = []
    for start in range(0, clips, CLIPS_PER_SHARD):
        path = folder / f"{width}x{height}-{start // CLIPS_PER_SHARD:04d}.tar"
        write_shard(path, samples[start : start + CLIPS_PER_SHARD])
        paths.append(str(path))
    return paths


def mp4s(shards: list[str]):
    for shard in shards:
        with tarfile.open(shard) as tar:
            for member in tar:
                if member.name.endswith(".mp4"):
                    yield tar.extractfile(member).read()


def baseline(shards: list[str], frames: int) -> int:
    """(a): the plain loop: PyAV decode of the first `frames` frames to rgb24 numpy, nothing else."""
    count = 0
    for data in mp4s(shards):
        with av.open(io.BytesIO(data)) as container:
            for index, frame in enumerate(container.decode(video=0)):
                frame.to_ndarray(format="rgb24")
                if index == frames - 1:
                    break
        count += 1
    return count


def dataset(shards: list[str], frames: int, size: int) -> vdm_data.VideoShardDataset:
    bucket = vdm_data.Bucket(frames=frames, height=size, width=size, batch_size=BATCH_SIZE)
    sampling = vdm_data.FrameSampling(frame_stride=1, random_start=False, random_crop=False)
    return vdm_data.VideoShardDataset(shards, vdm_data.ClipMaker([bucket], sampling), resampled=False)


def normalized_count(batch, frames: int, size: int) -> int:
    """The batch as the training step sees it: float in [-1, 1] (on the CPU here, on the GPU in training)."""
    pixels = batch.pixels()
    assert pixels.shape[1:] == (3, frames, size, size) and pixels.dtype == torch.float32
    return pixels.shape[0]


def pipeline(shards: list[str], frames: int, size: int) -> int:
    """(b): clips out of the pipeline in this process, as normalized float tensors."""
    return sum(normalized_count(batch, frames, size) for batch in dataset(shards, frames, size))


def pipeline_uint8(shards: list[str], frames: int, size: int) -> int:
    """(b0): the loader's own output, uint8 clips (training scales them to [-1, 1] on its device)."""
    return sum(len(batch) for batch in dataset(shards, frames, size))


def decode_only(inputs: list[bytes], frames: int) -> int:
    for data in inputs:
        decode_frames(data, range(frames))
    return len(inputs)


def transform_only(decoded: list[np.ndarray], size: int) -> int:
    for frames in decoded:
        frames_to_clip(frames, size, size)
    return len(decoded)


def collate_only(decoded: list[np.ndarray], size: int) -> int:
    """Stacking uint8 clips into batches, as the pipeline's collate does in one process (8 clips reused)."""
    clips = [frames_to_clip(frames, size, size) for frames in decoded[:BATCH_SIZE]]
    batches = len(decoded) // BATCH_SIZE
    for _ in range(batches):
        torch.stack(clips)
    return batches * BATCH_SIZE


@dataclass
class Timing:
    clips: int
    wall: float  # seconds
    cpu: float  # CPU seconds of this process's threads and of its loader workers

    @property
    def per_second(self) -> float:
        return self.clips / self.wall

    @property
    def per_cpu_second(self) -> float:
        return self.clips / self.cpu


def cpu_seconds(pids: list[int] = ()) -> float:
    """CPU time of this process (all threads) and of the live processes `pids` (from /proc)."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    total = own.ru_utime + own.ru_stime
    for pid in pids:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime
    return total


def median_timing(run: Callable[[], int], repeats: int, pids: Callable[[], list[int]] = list) -> Timing:
    timings = []
    for _ in range(repeats):
        cpu, wall = cpu_seconds(pids()), time.perf_counter()
        clips = run()
        timings.append(Timing(clips, time.perf_counter() - wall, cpu_seconds(pids()) - cpu))
    return Timing(
        timings[0].clips, statistics.median(t.wall for t in timings), statistics.median(t.cpu for t in timings)
    )


def loader_timing(shards: list[str], frames: int, size: int, workers: int, repeats: int) -> Timing:
    """(c): persistent workers, started and warmed by one untimed pass; their CPU time read from /proc."""
    loader = torch.utils.data.DataLoader(
        dataset(shards, frames, size), batch_size=None, num_workers=workers, persistent_workers=True
    )

    def one_pass() -> int:
        count = 0
        for batch in loader:
            count += normalized_count(batch, frames, size)
        return count

    one_pass()
    worker_pids = [process.pid for process in loader._iterator._workers]  # private, but only a benchmark reads it
    timing = median_timing(one_pass, repeats, lambda: worker_pids)
    loader._iterator._shutdown_workers()
    return timing


def measure_case(paths: list[str], args: argparse.Namespace) -> Iterator[tuple[str, Timing, float]]:
    """(name, timing, per-core ratio to the baseline) for each measurement on one set of shards."""
    frames, size, repeats = args.frames, args.size, args.repeats
    inputs = list(mp4s(paths))
    decoded = [decode_frames(data, range(frames)) for data in inputs]
    runs: list[tuple[str, Callable[[], Timing]]] = [
        ("(a) baseline: PyAV decode + to_ndarray", partial(median_timing, partial(baseline, paths, frames), repeats)),
        (
            "(b) pipeline -> float [-1, 1], 1 process",
            partial(median_timing, partial(pipeline, paths, frames, size), repeats),
        ),
        (
            "(b0) pipeline -> uint8 clips, 1 process",
            partial(median_timing, partial(pipeline_uint8, paths, frames, size), repeats),
        ),
    ]
    if args.workers:
        name = f"(c) pipeline, DataLoader {args.workers} workers"
        runs.append((name, partial(loader_timing, paths, frames, size, args.workers, repeats)))
    runs += [
        ("    in (b): decode_frames", partial(median_timing, partial(decode_only, inputs, frames), repeats)),
        ("    in (b): frames_to_clip", partial(median_timing, partial(transform_only, decoded, size), repeats)),
        ("    in (b): collate (stack)", partial(median_timing, partial(collate_only, decoded, size), repeats)),
    ]
    reference = None
    for name, measure in runs:
        timing = measure()
        reference = reference or timing
        yield name, timing, timing.per_cpu_second / reference.per_cpu_second


def profile(run: Callable[[], int], lines: int = 25) -> None:
    profiler = cProfile.Profile()
    profiler.runcall(run)
    pstats.Stats(profiler).sort_stats("tottime").print_stats(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clips", type=int, default=64, help="clips per source size")
    parser.add_argument("--frames", type=int, default=16, help="frames per clip (the sources have 4 more)")
    parser.add_argument("--size", type=int, default=256, help="clip height and width")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers for (c); 0 skips it")
    parser.add_argument("--synthetic", action="store_true", help="synthetic content even if scikit-image is there")
    parser.add_argument("--profile", action="store_true", help="also cProfile one pass of (b)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    use_photos = not args.synthetic and photographs() is not None
    content = "photographs (scikit-image), panned and zoomed" if use_photos else "synthetic moving shapes with noise"
    size = args.size
    sources = {"exact": (size, size), "resize": (size * 9 // 8 // 2 * 2, size * 3 // 2 // 2 * 2)}  # (h, w)
    print(
        f"vdm data benchmark: {args.clips} clips per source size, {args.frames} frames -> {size}x{size}, "
        f"median of {args.repeats}; content: {content}; H.264 mp4 (encode_mp4: x264 qp 20, B-frames), {FPS} fps"
    )
    print(
        f"PyAV {av.__version__}, torch {torch.__version__} with 1 thread, {os.cpu_count()} CPU cores, "
        f"load average {os.getloadavg()[0]:.1f} at the start"
    )
    with tempfile.TemporaryDirectory() as folder:
        started = time.perf_counter()
        shards = {
            case: build_shards(Path(folder), args.clips, args.frames + 4, h, w, use_photos)
            for case, (h, w) in sources.items()
        }
        megabytes = sum(os.path.getsize(p) for paths in shards.values() for p in paths) / 1e6
        seconds = time.perf_counter() - started
        print(f"built {sum(map(len, shards.values()))} shards ({megabytes:.1f} MB) in {seconds:.0f} s")
        header = f"{'case':7s} {'source':>8s}  {'measurement':44s} {'clips/s':>8s} {'per core':>9s} {'vs (a)':>7s}"
        print("\n" + header + "\n" + "-" * len(header))
        for case, (h, w) in sources.items():
            for name, timing, ratio in measure_case(shards[case], args):
                print(
                    f"{case:7s} {w:>4d}x{h:<3d}  {name:44s} {timing.per_second:8.1f} {timing.per_cpu_second:9.1f} "
                    f"{ratio:7.2f}",
                    flush=True,
                )
            if args.profile:
                profile(partial(pipeline, shards[case], args.frames, args.size))
    print("\nclips/s: wall clock. per core: clips per CPU-second used (threads and loader workers included), which")
    print("holds when other programs share the cores. vs (a): per core, relative to (a) of the same case and run.")
    print("Goal: (b) at least 50 clips/s per core and at least 0.9 of (a).")
    print("(b0) is what the loader hands to training; (b) adds the scaling to float [-1, 1] on the CPU, which a")
    print("GPU run does on the device (on a CPU, mostly page faults on the fresh float tensor).")
    print("Time a training run waits for data: the data_wait column of metrics.csv from a train.py run.")


if __name__ == "__main__":
    sys.exit(main())
