"""Moving Digits quality: does a video draw the prompted digit, moving the prompted way?

A small classifier, fit on the same digit scans the training clips are made of, reads a crop around
each frame's centre of mass; a clip's digit is the vote of its frames. Its motion is the compass
direction of the centre of mass's least-squares velocity. Both are checked against the prompt.

What "correct" means:
    digit   the clip's vote equals the prompted digit. Frames with nothing drawn do not vote; a clip
            where no frame does reads as no digit, which is never correct.
    motion  the centre-of-mass velocity over the clip, as one of 8 compass directions (45-degree
            sectors, so a straight move tolerates up to 22.5 degrees of drift and a diagonal one needs
            both components), equals the prompted direction, and the digit travels at least
            `MIN_TRAVEL` canvas pixels. For "... and bounces back" prompts the first half of the clip
            must move the prompted way and the second half the opposite way: the dataset turns a clip
            somewhere in its middle third, so its first half always ends ahead of where it started and
            its second half always goes backwards. A clip with a blank frame has no trajectory: wrong.
    consistency  (the prompt not read) the clip is temporally coherent: every frame is drawn, at least
            `PERSISTENT_SHARE` of them read as the clip's digit, and the digit moves steadily in some
            direction: it travels at least `STEADY_TRAVEL` and its centres keep within `STEADY_RESIDUAL`
            (RMS) of a straight line at constant speed. Real clips that do not bounce all pass (they travel
            14 pixels over 8 frames and fit the line to 0.01 pixels); their frames shuffled leave it by 4.5
            pixels, and a blob that drifts a pixel or two is not motion. A model shows this
            before it follows the prompt's direction: temporal learning, measured on its own.

Frames of any size are resized to the 32 x 32 canvas the dataset draws on, so pixel figures below
are canvas pixels. The constants mirror scripts/make_moving_digits.py's defaults (a test holds them
equal); the classifier sees only the scans that script keeps for training clips.

Shape legend (see vdm/types.py): N clips, C channels, T frames, H height, W width, M frames of all
clips (N * T), F classifier features.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from einops import rearrange
from PIL import Image
from torch import Tensor

# (dy, dx) per direction in image coordinates (y grows downwards): scripts/make_moving_digits.py
DIRECTIONS = {
    "up": (-1, 0),
    "down": (1, 0),
    "left": (0, -1),
    "right": (0, 1),
    "up and to the left": (-1, -1),
    "up and to the right": (-1, 1),
    "down and to the left": (1, -1),
    "down and to the right": (1, 1),
}
CANVAS = 32  # side of the frames, pixels
DIGIT_SIZE = 14  # side of the upscaled digit scan
EVAL_DIGITS = 297  # scans held out for eval clips: the first of a seeded permutation of sklearn's 1,797
SEED = 0

CROP = 16  # side of the window read around the centre of mass: the digit and a pixel of margin
FLOOR = 0.25  # intensity in [0, 1] below which a pixel is not part of a stroke, however dim the frame
RELATIVE_FLOOR = 0.5  # ...and below this share of the frame's brightest pixel: ignores a haze of noise
BACKGROUND = 0.1  # intensity taken off every pixel before the classifier reads a crop
MIN_TRAVEL = 1.0  # canvas pixels a clip (or a bounce's leg) must move to have a direction at all
PERSISTENT_SHARE = 0.75  # of a clip's frames that must read as its digit for it to persist
STEADY_RESIDUAL = 1.0  # canvas pixels (RMS) the centres may stray from a constant-velocity line
STEADY_TRAVEL = 4.0  # canvas pixels a consistent clip travels at least (real ones: 14 over 8 frames)
BLURS = (0.0, 0.5, 1.0, 1.5)  # Gaussian sigmas (pixels) of the copies of each scan the classifier learns from

_CAPTION = re.compile(r"^the digit (\d) moves (.+?)( and bounces back)?$")


@dataclass(frozen=True)
class DigitPrompt:
    """What a caption asks for."""

    digit: int
    direction: str  # a key of DIRECTIONS
    bounces: bool = False

    @property
    def caption(self) -> str:
        return f"the digit {self.digit} moves {self.direction}" + (" and bounces back" if self.bounces else "")


def parse_caption(caption: str) -> DigitPrompt:
    """The inverse of DigitPrompt.caption (and of the dataset's captions); ValueError for anything else."""
    match = _CAPTION.match(caption.strip())
    if match is None or match.group(2) not in DIRECTIONS:
        raise ValueError(f"not a Moving Digits caption: {caption!r}")
    return DigitPrompt(int(match.group(1)), match.group(2), match.group(3) is not None)


def prompt_set() -> list[str]:
    """The fixed evaluation prompts: every digit x every direction, no bounce (80, digit-major)."""
    return [DigitPrompt(digit, direction).caption for digit in range(10) for direction in DIRECTIONS]


def compass(displacement: np.ndarray) -> str | None:
    """(dy, dx) -> the nearest of the 8 directions, or None when it is shorter than MIN_TRAVEL (or NaN)."""
    dy, dx = float(displacement[0]), float(displacement[1])
    if not np.hypot(dy, dx) >= MIN_TRAVEL:  # also catches NaN
        return None
    return _SECTORS[_sector(dy, dx)]


def _sector(dy: float, dx: float) -> int:
    # 45-degree sectors of the angle, 0 = right; with y pointing down, +90 degrees is down
    return round(np.degrees(np.arctan2(dy, dx)) / 45) % 8


_SECTORS = {_sector(dy, dx): name for name, (dy, dx) in DIRECTIONS.items()}
_OPPOSITE = {name: next(o for o, v in DIRECTIONS.items() if v == (-dy, -dx)) for name, (dy, dx) in DIRECTIONS.items()}


def travel(trajectory: np.ndarray) -> np.ndarray:
    """(T, 2) centre-of-mass positions -> (2,) least-squares velocity x (T - 1): the displacement of a
    straight-line fit, steadier than last minus first when single frames are noisy."""
    t = np.arange(len(trajectory), dtype=np.float64)
    t -= t.mean()
    velocity = (t[:, None] * (trajectory - trajectory.mean(axis=0))).sum(axis=0) / (t**2).sum()
    return velocity * (len(trajectory) - 1)


def motion_correct(trajectory: np.ndarray, prompt: DigitPrompt) -> bool:
    """Whether a (T, 2) trajectory (canvas pixels, NaN where a frame is blank) moves as `prompt` says."""
    if len(trajectory) < 2 or np.isnan(trajectory).any():
        return False
    if not prompt.bounces:
        return compass(travel(trajectory)) == prompt.direction
    if len(trajectory) < 4:
        return False  # a leg needs two frames
    half = len(trajectory) // 2  # first half: frames [0, half); second: [T - half, T) (T odd: skips the middle)
    out, back = travel(trajectory[:half]), travel(trajectory[-half:])
    return compass(out) == prompt.direction and compass(back) == _OPPOSITE[prompt.direction]


def steady(trajectory: np.ndarray) -> bool:
    """Whether a (T, 2) trajectory (NaN where blank) moves at least STEADY_TRAVEL along a straight line at constant
    speed, to within STEADY_RESIDUAL pixels RMS."""
    if len(trajectory) < 2 or np.isnan(trajectory).any():
        return False
    t = np.arange(len(trajectory), dtype=np.float64)
    t -= t.mean()
    velocity = travel(trajectory) / (len(trajectory) - 1)
    fit = trajectory.mean(axis=0) + t[:, None] * velocity
    residual = np.sqrt(((trajectory - fit) ** 2).sum(axis=1).mean())
    return bool(np.hypot(*travel(trajectory)) >= STEADY_TRAVEL and residual <= STEADY_RESIDUAL)


def consistent(frame_digits: np.ndarray, trajectory: np.ndarray) -> bool:
    """Temporal consistency of one clip (the module docstring): its (T,) per-frame digits (-1: blank) and (T, 2)
    trajectory, no prompt needed."""
    digit = vote(frame_digits)
    persists = digit >= 0 and (frame_digits == digit).mean() >= PERSISTENT_SHARE
    return bool(persists and steady(trajectory))


def intensity(videos: Tensor) -> Tensor:
    """(N, C, T, H, W) float in [-1, 1] or uint8 -> (N, T, CANVAS, CANVAS) float grey in [0, 1]."""
    grey = videos.float().mean(dim=1)  # (N, T, H, W)
    grey = grey / 255.0 if videos.dtype == torch.uint8 else (grey + 1) / 2
    n = grey.shape[0]
    if grey.shape[-2:] != (CANVAS, CANVAS):
        frames = rearrange(grey, "n t h w -> (n t) 1 h w")
        frames = F.interpolate(frames, size=(CANVAS, CANVAS), mode="bilinear", antialias=True, align_corners=False)
        grey = rearrange(frames, "(n t) 1 h w -> n t h w", n=n)
    return grey.clamp(0, 1)


def centres_of_mass(frames: Tensor) -> Tensor:
    """(M, H, W) grey in [0, 1] -> (M, 2) (y, x) pixel centres of the bright strokes; NaN for a blank frame.

    Only pixels above FLOOR and above RELATIVE_FLOOR of the frame's peak count, by how far above:
    a dim haze or speckle of noise over the canvas would otherwise pull the centre towards the middle.
    """
    peak = frames.flatten(1).amax(dim=1)  # (M,)
    floor = torch.clamp(peak * RELATIVE_FLOOR, min=FLOOR)[:, None, None]
    weight = (frames - floor).clamp(min=0)  # (M, H, W)
    mass = weight.sum(dim=(1, 2))  # (M,)
    ys = torch.arange(frames.shape[1], dtype=frames.dtype, device=frames.device)
    xs = torch.arange(frames.shape[2], dtype=frames.dtype, device=frames.device)
    y = (weight.sum(dim=2) * ys).sum(dim=1) / mass
    x = (weight.sum(dim=1) * xs).sum(dim=1) / mass
    centre = torch.stack([y, x], dim=1)
    return torch.where((peak > FLOOR)[:, None], centre, torch.full_like(centre, float("nan")))


def crops(frames: Tensor, centres: Tensor) -> Tensor:
    """(M, H, W), (M, 2) -> (M, F = 64): the CROP x CROP window centred (bilinearly, to a fraction of a
    pixel) on each centre, averaged down to 8 x 8 (the scans' own resolution) and scaled to a peak of 1,
    so that a dim but well-drawn digit reads like a bright one. Blank frames give zeros."""
    m, h, w = frames.shape
    centres = torch.nan_to_num(centres, nan=0.0)
    offsets = torch.arange(CROP, dtype=frames.dtype, device=frames.device) - (CROP - 1) / 2  # (CROP,)
    ys = centres[:, 0, None] + offsets  # (M, CROP) pixel rows
    xs = centres[:, 1, None] + offsets
    # grid_sample's coordinates: -1 and 1 are the outer edges of the first and last pixel (align_corners=False)
    grid = torch.stack(
        [
            ((2 * xs + 1) / w - 1)[:, None, :].expand(m, CROP, CROP),
            ((2 * ys + 1) / h - 1)[:, :, None].expand(m, CROP, CROP),
        ],
        dim=-1,
    )  # (M, CROP, CROP, 2) as (x, y)
    window = F.grid_sample(frames[:, None], grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    small = F.adaptive_avg_pool2d(window, 8).flatten(1)  # (M, 64)
    return small / small.amax(dim=1, keepdim=True).clamp(min=1e-6)


def frame_features(frames: Tensor) -> tuple[Tensor, Tensor]:
    """(M, H, W) grey -> (M, F) classifier features and (M, 2) centres of mass (NaN: blank)."""
    centres = centres_of_mass(frames)
    # the crop is rescaled to a peak of 1, which would blow faint background noise up to strokes: drop it first
    return crops((frames - BACKGROUND).clamp(min=0), centres), centres


@functools.lru_cache(maxsize=1)
def _sklearn_digits():
    from sklearn.datasets import load_digits  # 1,797 8x8 scans shipped inside scikit-learn: no download

    return load_digits()


def split_scans(eval_digits: int = EVAL_DIGITS, seed: int = SEED) -> dict[str, np.ndarray]:
    """Indices into sklearn's digits of the scans behind training and held-out clips (the script's split)."""
    order = np.random.default_rng(seed).permutation(len(_sklearn_digits().images))
    return {"eval": order[:eval_digits], "train": order[eval_digits:]}


def blur(frames: Tensor, sigma: float) -> Tensor:
    """(K, H, W) -> the same, smoothed by a Gaussian of `sigma` pixels (zero padding: the canvas is black)."""
    if sigma <= 0:
        return frames
    radius = int(np.ceil(3 * sigma))
    taps = torch.arange(-radius, radius + 1, dtype=frames.dtype)
    kernel = torch.exp(-(taps**2) / (2 * sigma**2))
    kernel = kernel / kernel.sum()
    x = frames[:, None]  # (K, 1, H, W)
    x = F.conv2d(x, kernel.view(1, 1, -1, 1), padding=(radius, 0))
    x = F.conv2d(x, kernel.view(1, 1, 1, -1), padding=(0, radius))
    return x[:, 0]


def render_scans(indices: np.ndarray, blurs: tuple[float, ...] = BLURS, seed: int = SEED) -> tuple[Tensor, np.ndarray]:
    """Scans drawn as the dataset draws them (upscaled to DIGIT_SIZE, pasted at a random place on a black
    canvas), once per entry of `blurs` (Gaussian sigma in pixels, 0: sharp): (K, CANVAS, CANVAS) grey in
    [0, 1] and (K,) labels, K = len(indices) x len(blurs), copies of one scan next to each other.

    Generated frames are often soft, so the classifier also learns blurred digits; each copy sits
    somewhere else, because the crop's alignment to the pixel grid depends on where a digit sits."""
    digits = _sklearn_digits()
    rng = np.random.default_rng(seed)
    copies = len(blurs)
    frames = np.zeros((len(indices) * copies, CANVAS, CANVAS), dtype=np.float32)
    corners = rng.integers(0, CANVAS - DIGIT_SIZE + 1, size=(len(frames), 2))  # (K, 2) top-left (y, x)
    for i, index in enumerate(indices):
        scan = Image.fromarray((digits.images[index] * (255 / 16)).astype(np.uint8))  # as the script upscales it
        digit = np.asarray(scan.resize((DIGIT_SIZE,) * 2, Image.BILINEAR)) / 255.0
        for k in range(i * copies, (i + 1) * copies):
            y, x = corners[k]
            frames[k, y : y + DIGIT_SIZE, x : x + DIGIT_SIZE] = digit
    frames = torch.from_numpy(frames)
    for j, sigma in enumerate(blurs):
        frames[j::copies] = blur(frames[j::copies], sigma)
    return frames, np.repeat(digits.target[indices], copies)


class DigitClassifier:
    """An RBF support-vector classifier on centre-of-mass crops (fit in about a second, deterministic)."""

    def __init__(self, model):
        self.model = model

    @classmethod
    def fit(cls, frames: Tensor, labels: np.ndarray) -> DigitClassifier:
        """From (K, H, W) grey frames in [0, 1] that each show one digit, and their (K,) labels."""
        from sklearn.svm import SVC

        features, _ = frame_features(frames)
        return cls(SVC(C=10.0, gamma="scale").fit(features.numpy(), labels))

    @torch.no_grad()
    def predict(self, frames: Tensor) -> tuple[np.ndarray, np.ndarray]:
        """(M, H, W) grey -> (M,) digits (-1 for a blank frame) and (M, 2) centres of mass (NaN: blank)."""
        features, centres = frame_features(frames.float().cpu())
        digits = np.full(len(frames), -1, dtype=np.int64)
        drawn = ~torch.isnan(centres[:, 0]).numpy()
        if drawn.any():
            digits[drawn] = self.model.predict(features.numpy()[drawn])
        return digits, centres.numpy()


@functools.lru_cache(maxsize=1)
def training_classifier() -> DigitClassifier:
    """The classifier fit on the scans behind training clips only (cached: the same one every call)."""
    return DigitClassifier.fit(*render_scans(split_scans()["train"]))


def vote(digits: np.ndarray) -> int:
    """(T,) per-frame digits (-1: blank) -> the most common digit (ties: the smaller), or -1 if none."""
    drawn = digits[digits >= 0]
    return int(np.bincount(drawn, minlength=10).argmax()) if len(drawn) else -1


@dataclass
class Reading:
    """What the classifier reads from a batch of clips."""

    digits: np.ndarray  # (N,) each clip's voted digit, -1 where no frame has one
    trajectories: np.ndarray  # (N, T, 2) centre of mass (y, x) per frame in canvas pixels, NaN where blank
    frame_digits: np.ndarray  # (N, T) each frame's digit, -1 where blank


def read_videos(videos: Tensor, classifier: DigitClassifier | None = None) -> Reading:
    """(N, C, T, H, W) float in [-1, 1] (generated) or uint8 (real clips) -> Reading."""
    classifier = classifier or training_classifier()
    grey = intensity(videos.detach().cpu())  # (N, T, CANVAS, CANVAS)
    n, t = grey.shape[:2]
    digits, centres = classifier.predict(rearrange(grey, "n t h w -> (n t) h w"))
    per_clip = digits.reshape(n, t)
    return Reading(np.array([vote(d) for d in per_clip]), centres.reshape(n, t, 2), per_clip)


def score(videos: Tensor, prompts: list[str], classifier: DigitClassifier | None = None) -> dict[str, float]:
    """Digit and motion accuracy in [0, 1] of (N, C, T, H, W) videos against their N prompts, and the share of
    temporally consistent clips (which does not read the prompts)."""
    if len(videos) != len(prompts):
        raise ValueError(f"{len(videos)} videos but {len(prompts)} prompts")
    parsed = [parse_caption(p) for p in prompts]
    reading = read_videos(videos, classifier)
    digit = np.array([d == p.digit for d, p in zip(reading.digits, parsed)])
    motion = np.array([motion_correct(tr, p) for tr, p in zip(reading.trajectories, parsed)])
    steady_clips = np.array([consistent(d, tr) for d, tr in zip(reading.frame_digits, reading.trajectories)])
    return {
        "digit_acc": float(digit.mean()),
        "motion_acc": float(motion.mean()),
        "consistency": float(steady_clips.mean()),
    }
