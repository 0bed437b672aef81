"""Errors that carry one sentence meant for a person.

Everything a user can get wrong (a bad size, an unknown model name, an unreadable image) raises
`UserInputError`.  The CLI prints its message and exits non-zero without a traceback; the Gradio
app turns it into `gr.Error`.  Anything else is a bug and keeps its traceback, except running out
of memory (`out_of_memory_message`): that is a request too large for the machine, so it gets one
sentence saying what to lower, and the server frees what the failed request held
(`release_memory`) and goes on serving (docs/reliability.md).
"""

from __future__ import annotations

import errno
import gc
import re
import sys
import traceback


class UserInputError(ValueError):
    """A mistake in what the user sent; `str(error)` is one clear sentence."""


#: what to lower, in the order that usually helps most (the number of steps hardly matters:
#: memory is held per step, not summed over them)
LOWER = ("lower the image size or the number of frames, use fewer images at once (batch size, "
         "prior images, results per image) or a smaller model, then try again")

# torch's CPU allocator (c10/core/impl/alloc_cpu.cpp): "DefaultCPUAllocator: can't allocate memory:
# you tried to allocate N bytes" (POSIX) and "DefaultCPUAllocator: not enough memory: ..." (Windows)
_CPU_ALLOCATOR = re.compile(r"DefaultCPUAllocator: (?:can't allocate memory|not enough memory)")
# accelerators: the CUDA/ROCm caching allocator ("CUDA out of memory", "HIP out of memory"), a CUDA
# call that could not allocate ("CUDA error: out of memory"), cuBLAS/cuDNN workspaces, Apple MPS
# ("MPS backend out of memory") and Intel XPU ("XPU out of memory")
_GPU = re.compile(r"\b(?:CUDA|HIP|XPU) out of memory|CUDA error: out of memory|CUBLAS_STATUS_ALLOC_FAILED"
                  r"|CUDNN_STATUS_ALLOC_FAILED|MPS backend out of memory")
# how much the failed allocation asked for: torch ("Tried to allocate 20.00 GiB", "you tried to
# allocate 134217728 bytes") and numpy ("Unable to allocate 1.00 EiB for an array ...")
_TRIED = re.compile(r"(?:[Tt]ried to|Unable to) allocate ([\d.]+) ?(bytes|[KMGTPE]iB|[KMGTPE]B)")


def _amount(text: str) -> str:
    """ "20.0 GiB" from "Tried to allocate 20.00 GiB", "... allocate 134217728 bytes" (see `_TRIED`)."""
    found = _TRIED.search(text)
    if not found:
        return ""
    number, unit = float(found.group(1)), found.group(2)
    if unit == "bytes":
        for unit in ("bytes", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"):
            if number < 1024 or unit == "EiB":
                break
            number /= 1024
    return f"{number:.0f} {unit}" if unit == "bytes" else f"{number:.1f} {unit}"


def out_of_memory_message(error: BaseException) -> str | None:
    """One sentence for a request that ran out of GPU or CPU memory, saying what to lower; None
    when `error` is not an out-of-memory error.

    Recognised: `torch.OutOfMemoryError` (CUDA, ROCm, MPS, XPU), torch's CPU allocator failures
    (a RuntimeError "DefaultCPUAllocator: can't allocate memory ..."), accelerator library
    allocation failures, Python's `MemoryError` (numpy, PIL, Python objects) and an OSError ENOMEM
    (a helper process that could not start)."""
    text = str(error)
    torch = sys.modules.get("torch")  # no torch imported: no torch error to recognise
    if isinstance(error, MemoryError) or (isinstance(error, OSError) and error.errno == errno.ENOMEM):
        where = "CPU"
    elif torch is not None and isinstance(error, getattr(torch, "OutOfMemoryError", ())):
        where = "CPU" if _CPU_ALLOCATOR.search(text) else "GPU"
    elif isinstance(error, RuntimeError) and _CPU_ALLOCATOR.search(text):
        where = "CPU"
    elif isinstance(error, RuntimeError) and _GPU.search(text):
        where = "GPU"
    else:
        return None
    amount = _amount(text)
    memory = "The GPU ran out of memory" if where == "GPU" else "The computer's memory (CPU RAM) ran out"
    return f"{memory}{f' while allocating {amount}' if amount else ''}: {LOWER}."


def release_memory(error: BaseException | None = None) -> None:
    """Free what a failed request held: the local variables of the frames in `error`'s traceback
    (tensors the failed call made), Python's garbage, and the GPU allocator's cached blocks, so
    that the next request starts with the memory the failed one used."""
    if error is not None:
        traceback.clear_frames(error.__traceback__)
        error.__traceback__ = None
    gc.collect()
    torch = sys.modules.get("torch")
    if torch is None:
        return
    if torch.cuda.is_available():
        torch.cuda.empty_cache()  # a no-op where CUDA was never initialised
    for backend in ("mps", "xpu"):
        module = getattr(torch, backend, None)
        available = getattr(module, "is_available", None)
        if available is not None and available() and hasattr(module, "empty_cache"):
            module.empty_cache()
