"""Which device to run on and in which number format, chosen for the hardware in one place.

    resolve_device("auto")                 # cuda:0 when there is a GPU, else cpu
    resolve_precision("auto", device)      # training/eval autocast: "bf16" or "fp32"
    weight_dtype("auto", device, stored)   # inference weights: as stored, if native, else fp32
    check_dtype("int8")                    # also weight-only int8 (lmkit.load quantises)

bf16 is only fast where the hardware computes it: a CUDA GPU with bf16 units (Ampere and
later) or a CPU with AVX512-BF16 or AMX tiles that ATen runs its AVX512 kernels on. An
AVX2-only CPU emulates it, several times slower than fp32, so "auto" picks fp32 there and an
explicit bf16 still runs but warns once.
"""

from __future__ import annotations

import re
import warnings

import torch

PRECISIONS = ("auto", "fp32", "bf16")  # training autocast; weights and optimizer stay fp32
DTYPE_NAMES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}  # short -> torch
INT8 = "int8"  # weights for inference only: lmkit.model.quant, never trained or saved
DEVICE_PATTERN = re.compile(r"auto|cpu|cuda(:\d+)?")
EMULATED_BF16 = ("measured on a 2-core AVX2 CPU: `lmkit finetune` of MiniLM, 4 steps, 48.6 s "
                 "in bf16 vs 3.4 s in fp32")
_warned: set[str] = set()  # device types already warned about (emulated bf16; "int8:cuda")


def check_device(device: str) -> str:
    """`device` if it names a supported device (auto, cpu, cuda, cuda:N), else a ValueError."""
    if not isinstance(device, str) or not DEVICE_PATTERN.fullmatch(device):
        raise ValueError(f"device={device!r} is not supported; choose auto, cpu, cuda or "
                         "cuda:N")
    return device


def check_precision(precision: str) -> str:
    """`precision` if it is one of PRECISIONS, else a ValueError."""
    if precision not in PRECISIONS:
        hint = " (int8 is a weight format for inference: dtype int8)" if precision == INT8 else ""
        raise ValueError(f"precision={precision!r} is not supported; choose one of "
                         f"{PRECISIONS}{hint}")
    return precision


def check_dtype(dtype: str | torch.dtype | None) -> str | torch.dtype | None:
    """`dtype` if `lmkit.load` takes it (None, auto, int8, or a float format `as_dtype` knows),
    else a ValueError naming the choices."""
    if dtype in (None, "auto", INT8) or isinstance(dtype, torch.dtype) or (
            DTYPE_NAMES.get(dtype, dtype) in DTYPE_NAMES.values()):
        return dtype
    raise ValueError(f"dtype={dtype!r} is not supported; choose auto, fp32, bf16, fp16 or "
                     "int8 (weight-only int8 for inference)")


def resolve_device(device: str | torch.device = "auto", local_rank: int = 0) -> torch.device:
    """"auto": this process's GPU when there is one, else the CPU; or "cpu", "cuda",
    "cuda:N" (plain "cuda" is the GPU of this process's local rank)."""
    device = check_device(str(device) if isinstance(device, torch.device) else device)
    if device == "auto":
        device = f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device={device!r} asked for but no GPU is available: use cpu "
                             "(or auto)")
        if dev.index is None:
            dev = torch.device("cuda", local_rank)
        if dev.index >= torch.cuda.device_count():
            raise ValueError(f"device={device!r}: this machine has {torch.cuda.device_count()} "
                             "GPU(s), numbered from 0")
    return dev


def cpu_native_bf16() -> bool:
    """True when this CPU computes bf16 in hardware. ATen runs the kernels named by
    get_cpu_capability() (which honours ATEN_CPU_CAPABILITY); bf16 is native only under its
    AVX512 kernels on a CPU with AVX512-BF16 or AMX tiles."""
    return (torch.backends.cpu.get_cpu_capability().startswith("AVX512")
            and (torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()))


def native_bf16(device: torch.device) -> bool:
    """True when `device` computes bf16 in hardware (not emulated)."""
    if device.type == "cuda":  # bf16 units from Ampere (compute capability 8) on; ROCm has them
        return bool(torch.version.hip) or torch.cuda.get_device_capability(device)[0] >= 8
    return device.type == "cpu" and cpu_native_bf16()


def _warn_if_emulated(device: torch.device) -> None:
    if native_bf16(device) or device.type in _warned:
        return
    _warned.add(device.type)
    if device.type == "cpu":
        why = (f"this CPU (ATen {torch.backends.cpu.get_cpu_capability()} kernels, without "
               f"AVX512-BF16/AMX) only emulates it, several times slower than fp32 "
               f"({EMULATED_BF16})")
    else:
        why = f"{device} has no bf16 units (older than Ampere) and emulates it"
    warnings.warn(f"bf16 asked for but {why}; use precision/dtype auto or fp32",
                  RuntimeWarning, stacklevel=3)


def warn_int8(device: torch.device) -> None:
    """One warning where int8 weights save memory but not time: off the CPU no int8 kernel is
    used (each forward dequantises the weights: more bytes moved than bf16/fp16 weights)."""
    if device.type == "cpu" or f"int8:{device.type}" in _warned:
        return
    _warned.add(f"int8:{device.type}")
    warnings.warn(f"dtype int8 on {device} dequantises the weights in every forward (lmkit "
                  "uses an int8 kernel on the CPU only): it saves memory, not time; use dtype "
                  "auto, bf16 or fp16 for speed", RuntimeWarning, stacklevel=3)


def resolve_precision(precision: str, device: torch.device) -> str:
    """The autocast format to train/evaluate in: "auto" is "bf16" where `device` computes it
    natively, else "fp32"; an explicit "bf16" is kept (with one warning where emulated)."""
    if check_precision(precision) == "auto":
        return "bf16" if native_bf16(device) else "fp32"
    if precision == "bf16":
        _warn_if_emulated(device)
    return precision


def as_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """torch.float32 / bfloat16 / float16 from itself, "fp32"/"bf16"/"fp16" or the torch
    names ("float32", ...)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    name = DTYPE_NAMES.get(dtype, dtype)
    if name not in DTYPE_NAMES.values():
        raise ValueError(f"dtype={dtype!r} is not supported; choose auto, fp32, bf16 or fp16")
    return getattr(torch, name)


def weight_dtype(dtype: str | torch.dtype | None, device: torch.device,
                 stored: str | torch.dtype) -> torch.dtype:
    """The dtype to hold a checkpoint's weights in on `device`. None: as `stored`; "auto": as
    stored where `device` computes that format natively, else fp32; fp32 / bf16 / fp16: as
    asked (bf16 warns once where emulated; fp16 needs a GPU)."""
    stored = as_dtype(stored)
    if dtype is None:
        return stored
    if isinstance(dtype, str) and dtype == "auto":
        native = (stored == torch.float32 or (stored == torch.float16 and device.type == "cuda")
                  or (stored == torch.bfloat16 and native_bf16(device)))
        return stored if native else torch.float32
    dtype = as_dtype(dtype)
    if dtype == torch.float16 and device.type != "cuda":
        raise ValueError("fp16 weights need a GPU (CPU fp16 kernels are slow or missing): use "
                         "dtype bf16 or fp32 on the CPU, or device cuda")
    if dtype == torch.bfloat16:
        _warn_if_emulated(device)
    return dtype
