"""Memory discipline around a model run: wired memory on Metal, fit warnings, cache release.

On Apple silicon, memory the GPU uses can be paged out ("unwired") under pressure, and
re-wiring a model's weights on every step makes generation crawl. `wired_limit(model)` raises
Metal's wired limit to cover the model (never beyond the device's recommended working set)
for the duration of a run and restores the previous limit afterwards. Everywhere else (CPU,
CUDA) it is a no-op, so callers can use it unconditionally.

A model bigger than the memory available is not refused (the OS may still page it), but it
gets a warning naming both sizes, because the likely outcome is swapping, not speed.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from typing import Iterator

import mlx.core as mx
import mlx.nn as nn


def model_nbytes(model: nn.Module) -> int:
    """Bytes held by the model's parameters (quantized weights count as stored)."""
    return sum(w.nbytes for _, w in nn.utils.tree_flatten(model.parameters()))


def metal_available() -> bool:
    metal = getattr(mx, "metal", None)
    return bool(metal is not None and metal.is_available())


def device_info() -> dict:
    info = getattr(mx, "device_info", None) or getattr(mx.metal, "device_info")
    return dict(info())


def system_memory_available() -> int | None:
    """Bytes the OS could give us now (Linux MemAvailable), else physical memory, else None."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def available_memory() -> int | None:
    """Bytes a model can use: Metal's recommended working set, or the system's free memory."""
    if metal_available():
        size = device_info().get("max_recommended_working_set_size")
        if size:
            return int(size)
    return system_memory_available()


def fit_warning(model: nn.Module, extra_bytes: int = 0) -> str | None:
    """A one-line warning if the model (plus `extra_bytes`, e.g. a KV budget) cannot fit."""
    need = model_nbytes(model) + extra_bytes
    have = available_memory()
    if have is None or need <= have:
        return None
    return (
        f"the model needs {need / 1e9:.2f} GB but only {have / 1e9:.2f} GB is available: "
        "expect heavy swapping; use a smaller or more quantized model"
    )


@contextmanager
def wired_limit(model: nn.Module, extra_bytes: int = 0) -> Iterator[None]:
    """Raise Metal's wired memory limit to cover the model for the block, then restore it.

    A no-op where Metal is not available; the limit is never lowered. It does not warn: it
    runs around every generation, so the fit warning is the caller's, once per load
    (`fit_warning`, printed by the CLI and logged by the server).
    """
    if not metal_available():
        yield
        return
    ceiling = int(device_info().get("max_recommended_working_set_size") or 0)
    target = model_nbytes(model) + extra_bytes
    if ceiling:
        target = min(target, ceiling)
    previous = mx.set_wired_limit(target)
    if previous > target:
        mx.set_wired_limit(previous)  # already higher: leave it as it was
    try:
        yield
    finally:
        mx.synchronize()  # nothing in flight may depend on the wired memory we give back
        mx.set_wired_limit(previous)


def release_cached_memory() -> None:
    """Give MLX's buffer cache back to the system (between requests; cached != leaked)."""
    mx.clear_cache()


def peak_memory_gb() -> float:
    return mx.get_peak_memory() / 1e9
