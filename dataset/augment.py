"""Augmented copies: for oversampling a horizontal flip and additive Gaussian noise, plain NumPy; and "wild" copies,
a face as the edge runner cuts it out of a photo (below).

Copy k of a face is a pure function of (seed, file name, k), so it is the same in whichever thread
makes it and in whichever order: odd copies are mirrored, even copies are not (so two copies of one
face differ by more than their noise), and every copy gets zero-mean Gaussian noise with a standard
deviation drawn from NOISE_SIGMA (0..255 pixel units), rounded and clipped back to uint8.

Speed: drawing 200,000 normal samples per copy cost about 2 ms, most of a build's CPU time. So each
seed draws one long bank of standard-normal samples once, and each copy takes a window of it at a
seeded random offset: within a copy the noise is still independent Gaussian per pixel value; two
copies share samples only as shifted windows of the same sequence.
"""
import hashlib
import threading

import cv2
import numpy as np

NOISE_SIGMA = (3.0, 10.0)
BANK_MIN_VALUES = 1 << 22  # 16 MB of float32

_banks = {}
_banks_lock = threading.Lock()


def copy_rng(seed: int, name: str, copy: int) -> np.random.Generator:
    name_key = int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "little")
    return np.random.default_rng([seed, name_key, copy])


def noise_bank(seed: int, values: int) -> np.ndarray:
    """Standard-normal float32 samples, at least 4 x ``values`` of them, the same for the same seed."""
    length = max(BANK_MIN_VALUES, 4 * values)
    with _banks_lock:
        bank = _banks.get((seed, length))
        if bank is None:
            bank = np.random.default_rng([seed, 0x6E6F697365]).standard_normal(length, dtype=np.float32)
            if len(_banks) >= 2:
                _banks.clear()
            _banks[(seed, length)] = bank
    return bank


def augment(image: np.ndarray, seed: int, name: str, copy: int) -> np.ndarray:
    """Augmented copy ``copy`` (>= 1) of a uint8 H x W x C image."""
    if copy < 1:
        raise ValueError("copy 0 is the original; augmented copies count from 1")
    rng = copy_rng(seed, name, copy)
    if copy % 2 == 1:
        image = image[:, ::-1]
    sigma = rng.uniform(*NOISE_SIGMA)
    bank = noise_bank(seed, image.size)
    offset = int(rng.integers(0, len(bank) - image.size))
    noisy = bank[offset:offset + image.size].reshape(image.shape) * np.float32(sigma)
    noisy += image
    np.clip(noisy, 0, 255, out=noisy)
    return np.rint(noisy, out=noisy).astype(np.uint8)


# Wild copies (JOINT_PLAN=wild): what the runner's detector and alignment make of a face in a photo: the chip rotated
# by up to WILD_ANGLE degrees and scaled by WILD_SCALE, pasted over a background, then cut out again by a slightly
# wrong inverse (keypoints a few pixels off), at the 200 px chip size and resized as the dataset resizes. So the
# face is resampled twice and framed a little off, with background where the cut misses the chip. Measured, the
# framing error is what costs accuracy (resampling costs none), and the runner's second look at each face removes
# most of it; fine-tuning on these copies gained nothing on top (docs/experiments.md).
WILD_ANGLE = 30.0
WILD_SCALE = (0.5, 2.0)
# The cut's error, standard deviations (shift in chip sides): what experiments/alignment_error.py measured for the
# photo default (tiled BlazeFace) aligned from its first keypoints, before the second look, on 400 train chips pasted
# as above: 4.2 degrees, 0.096 log scale, 0.020 / 0.031 shift (2.6 degrees and 0.06 at scales of 0.8x and over, 6.0
# and 0.13 under it).
WILD_JITTER = {"degrees": 4.2, "log_scale": 0.096, "shift": 0.025}
WILD_CHIP = 200  # pixels: UTKFace's chip, where the runner warps


BACKGROUNDS = 3  # kinds of backdrop: flat colour, horizontal gradient, blurred noise


def background(rng: np.random.Generator, kind: int, height: int, width: int) -> np.ndarray:
    """A ``height`` x ``width`` backdrop of one of the BACKGROUNDS kinds, drawn from ``rng`` (scripts/robustness.py
    paints its frames with it too)."""
    if kind == 0:
        return np.full((height, width, 3), rng.integers(0, 256, 3), np.uint8)
    if kind == 1:
        a, b = rng.integers(0, 256, 3), rng.integers(0, 256, 3)
        t = np.linspace(0, 1, width)[np.newaxis, :, np.newaxis]
        return np.broadcast_to(a + (b - a) * t, (height, width, 3)).astype(np.uint8)
    noise = rng.integers(0, 256, (max(2, height // 16), max(2, width // 16), 3), dtype=np.uint8)
    return cv2.resize(noise, (width, height), interpolation=cv2.INTER_CUBIC)


def wild(chip: np.ndarray, seed: int, name: str, copy: int, side: int) -> np.ndarray:
    """Wild copy ``copy`` (>= 1) of a uint8 chip (any size; best the original), ``side`` pixels square; the same
    for the same arguments."""
    if copy < 1:
        raise ValueError("wild copies count from 1")
    if chip.shape[:2] != (WILD_CHIP, WILD_CHIP):
        chip = cv2.resize(chip, (WILD_CHIP, WILD_CHIP), interpolation=cv2.INTER_AREA)
    rng = np.random.default_rng([seed, copy_rng(seed, name, copy).integers(1 << 62), 0x77696C64])
    angle = rng.uniform(-WILD_ANGLE, WILD_ANGLE)
    scale = float(np.exp(rng.uniform(*np.log(WILD_SCALE))))
    canvas = int(np.ceil(WILD_CHIP * scale * 1.5))
    centre = canvas / 2.0
    paste = cv2.getRotationMatrix2D((WILD_CHIP / 2.0, WILD_CHIP / 2.0), angle, scale)
    paste[:, 2] += centre - WILD_CHIP / 2.0
    frame = background(rng, int(rng.integers(BACKGROUNDS)), canvas, canvas)
    warped = cv2.warpAffine(chip, paste, (canvas, canvas), flags=cv2.INTER_LINEAR)
    inside = cv2.warpAffine(np.full((WILD_CHIP, WILD_CHIP), 255, np.uint8), paste, (canvas, canvas)) > 127
    frame[inside] = warped[inside]
    off = WILD_JITTER["shift"] * WILD_CHIP * scale
    cut = cv2.getRotationMatrix2D((WILD_CHIP / 2.0, WILD_CHIP / 2.0), angle + rng.normal(0, WILD_JITTER["degrees"]),
                                  scale * float(np.exp(rng.normal(0, WILD_JITTER["log_scale"]))))
    cut[:, 2] += centre - WILD_CHIP / 2.0 + rng.normal(0, off, 2)
    out = cv2.warpAffine(frame, cv2.invertAffineTransform(cut), (WILD_CHIP, WILD_CHIP), flags=cv2.INTER_LINEAR,
                         borderMode=cv2.BORDER_REPLICATE)
    return out if side == WILD_CHIP else cv2.resize(out, (side, side), interpolation=cv2.INTER_LINEAR)
