"""Augmented copies for oversampling: a horizontal flip and additive Gaussian noise, plain NumPy.

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
