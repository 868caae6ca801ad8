"""What the torch backend runs on: the CPU and the vector features that decide its speed, the device,
and the precision chosen for it, with the reason, so a training run says at its start why it is as
fast (or as slow) as it is.

bf16 autocast pays only where the CPU computes bf16 natively (AVX512-BF16, or AMX's tiles): elsewhere
oneDNN emulates it and training is slower than in fp32. On CUDA the same holds from compute capability 8.0
(Ampere) on; older GPUs get fp16 autocast, whose narrow range needs loss scaling (the trainer's GradScaler).
"""
import os
import platform
from pathlib import Path
from typing import FrozenSet, NamedTuple, Tuple

from caffekit.errors import KitError

# (name shown, /proc/cpuinfo flags of which any one means the CPU has it)
FEATURES = (("AVX2", ("avx2",)), ("AVX-512", ("avx512f",)), ("AVX512-BF16", ("avx512_bf16",)),
            ("AMX", ("amx_bf16",)), ("VNNI", ("avx512_vnni", "avx_vnni")))
NATIVE_BF16 = ("AVX512-BF16", "AMX")
ISA_LIMITS = ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA")  # torch's and oneDNN's caps on the vector ISA


class Cpu(NamedTuple):
    model: str
    flags: FrozenSet[str]

    def has(self, feature: str) -> bool:
        return any(flag in self.flags for flag in dict(FEATURES)[feature])

    def summary(self) -> str:
        """``AMD EPYC (AVX2, AVX-512, AVX512-BF16, VNNI; no AMX)``"""
        if not self.flags:
            return f"{self.model} (features unknown: no CPU flags in /proc/cpuinfo)"
        have = [name for name, _ in FEATURES if self.has(name)]
        lack = [name for name, _ in FEATURES if not self.has(name)]
        parts = ([", ".join(have)] if have else []) + (["no " + ", ".join(lack)] if lack else [])
        return f"{self.model} ({'; '.join(parts)})"


def read_cpu(cpuinfo: Path = Path("/proc/cpuinfo")) -> Cpu:
    """The first processor's model name and flags (Linux); elsewhere the platform's name and no flags."""
    model, flags = "", frozenset()
    try:
        lines = cpuinfo.read_text(errors="replace").splitlines()
    except OSError:
        lines = []
    for line in lines:
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "model name" and not model:
            model = value.strip()
        elif key == "flags" and not flags:
            flags = frozenset(value.split())
    return Cpu(model or platform.processor() or platform.machine() or "unknown CPU", flags)


def choose_device(device: str):
    import torch

    if device == "cuda" and not torch.cuda.is_available():
        raise KitError("--device cuda: no CUDA device is available to torch")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(device)


def _onednn_has_bf16() -> bool:
    import torch

    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a torch without the query: trust the CPU flags
        return True


PRECISION_NAMES = {"fp32": "fp32", "bf16": "bf16 autocast", "fp16": "fp16 autocast with loss scaling"}


def choose_precision(requested: str, device, cpu: Cpu) -> Tuple[str, str]:
    """(fp32 | bf16 | fp16, the reason in words) for --precision ``requested`` on ``device``."""
    import torch

    if requested == "fp16" and device.type != "cuda":
        raise KitError("--precision fp16 needs a CUDA device (on the CPU: bf16 or fp32)")
    if requested != "auto":
        note = ""
        if requested == "bf16" and device.type == "cpu" and not any(map(cpu.has, NATIVE_BF16)):
            note = "; no AVX512-BF16/AMX: emulated, slower than fp32"
        elif requested == "fp32" and device.type == "cuda":
            note = "; TF32 off, so convolutions and products round as Caffe's fp32"
        return requested, f"{PRECISION_NAMES[requested]} (--precision{note})"
    if device.type == "cuda":
        # is_bf16_supported() also says yes where bf16 is emulated: ask for the hardware instead.
        major, minor = torch.cuda.get_device_capability(device)
        if major >= 8:
            return "bf16", f"bf16 autocast: the GPU computes bf16 (compute capability {major}.{minor}) (auto)"
        return "fp16", f"{PRECISION_NAMES['fp16']}: the GPU has no bf16 (compute capability {major}.{minor}) (auto)"
    native = [name for name in NATIVE_BF16 if cpu.has(name)]
    if not native:
        return "fp32", "fp32: no AVX512-BF16/AMX, bf16 would be emulated (auto)"
    if not _onednn_has_bf16():
        return "fp32", f"fp32: the CPU has {' and '.join(native)} but torch's oneDNN has no bf16 kernels for it (auto)"
    return "bf16", f"bf16 autocast: the CPU has {' and '.join(native)} (auto)"


def describe(cpu: Cpu, device, threads: int, reason: str) -> str:
    """The one line a run starts with: CPU, its features, device and threads, precision and why."""
    import torch

    where = f"{threads} threads" if device.type == "cpu" else f"{device} ({torch.cuda.get_device_name(device)})"
    # Set to time a wider CPU as a narrower one (e.g. AVX2): the features above are then not all used.
    limits = [f"{name}={os.environ[name]}" for name in ISA_LIMITS if os.environ.get(name)]
    return f"cpu: {cpu.summary()}{' limited by ' + ' '.join(limits) if limits else ''}; {where}; {reason}"


M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)
MMAP_THRESHOLD_MAX = 32 * 1024 * 1024  # glibc's largest on 64-bit Linux: mallopt refuses more
TRIM_THRESHOLD = 1024 * 1024 * 1024


def keep_freed_tensors() -> bool:
    """Let glibc's allocator keep freed tensors (up to 32 MiB each) for reuse; True where it could.

    By default glibc gives each freed block above its mmap threshold back to the kernel, so every training
    step's activations arrive as fresh pages, each zeroed on a page fault: a JointNet run on two cores took
    92 million faults and 13% of its CPU time in the kernel (`/usr/bin/time -v`). Raising the mmap and trim
    thresholds made its steps 10-15% faster. Other C libraries (macOS, musl) are left as they are."""
    if platform.system() != "Linux":
        return False
    import ctypes

    try:
        libc = ctypes.CDLL(None)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_MAX)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
