"""Allocator policy: defaults, the ``TORCH_WSL_ALLOC_CONF`` variable, keyword arguments.

``TORCH_WSL_ALLOC_CONF`` holds ``key:value`` pairs separated by commas, like
``PYTORCH_CUDA_ALLOC_CONF``. A key applies to every device unless prefixed
with ``cpu.``, ``cuda.`` or ``pinned.``; sizes take K/M/G/T suffixes (powers
of 1024), a budget may be a fraction (``0.9``) or a percentage (``90%``)::

    TORCH_WSL_ALLOC_CONF="cuda.budget:90%,pinned.budget:512M,large_segment_size:40M"
"""

from __future__ import annotations

import os
import re
from typing import Any

__all__ = ["ALLOC_CONF_ENV", "DEVICES", "parse_alloc_conf", "parse_size", "resolve_policy"]

ALLOC_CONF_ENV = "TORCH_WSL_ALLOC_CONF"
DEVICES = ("cpu", "cuda", "pinned")

#: Fields of the C++ core's Policy (csrc/alloc/core/allocator.h).
CORE_FIELDS = (
    "min_block_size",
    "small_size",
    "small_segment_size",
    "large_segment_size",
    "min_large_alloc",
    "large_round",
    "roundup_power2_divisions",
    "max_split_size",
    "large_split_min",
    "budget_bytes",
    "budget_fraction",
    "trace_capacity",
)

#: Keys that are not core fields, per device.
EXTRA_FIELDS = {
    "cpu": ("budget", "alignment", "huge_pages"),
    "cuda": ("budget", "expandable_segments"),
    "pinned": ("budget", "probe_ceiling"),
    "standalone": ("budget",),  # torch_wsl.memory.CachingAllocator: no environment
}

_UNITS = {"": 0, "k": 10, "kb": 10, "kib": 10, "m": 20, "mb": 20, "mib": 20, "g": 30, "gb": 30, "gib": 30,
          "t": 40, "tb": 40, "tib": 40}


def parse_size(text: str | int | float) -> int:
    """``"512M"`` / ``"8GiB"`` / ``4096`` -> bytes (suffixes are powers of 1024)."""
    if isinstance(text, bool):
        raise ValueError(f"not a size: {text!r}")
    if isinstance(text, (int, float)):
        if text < 0 or int(text) != text:
            raise ValueError(f"not a size: {text!r}")
        return int(text)
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", text)
    if not m or m.group(2).lower() not in _UNITS:
        raise ValueError(f"not a size: {text!r} (examples: 4096, 512M, 8GiB)")
    value = float(m.group(1)) * (1 << _UNITS[m.group(2).lower()])
    return int(value)


def _parse_value(key: str, raw: str) -> Any:
    low = raw.strip().lower()
    if low in ("true", "false"):
        return low == "true"
    if key == "budget":
        return raw.strip()  # resolved by _budget()
    try:
        return float(raw) if key == "budget_fraction" else parse_size(raw)
    except ValueError as e:
        raise ValueError(f"{ALLOC_CONF_ENV}: bad value for {key!r}: {e}") from None


def parse_alloc_conf(text: str, device: str) -> dict[str, Any]:
    """The settings in ``text`` (``TORCH_WSL_ALLOC_CONF`` syntax) that apply to ``device``."""
    if device not in DEVICES:
        raise ValueError(f"device must be one of {DEVICES}, not {device!r}")
    out: dict[str, Any] = {}
    prefixed: dict[str, Any] = {}
    for item in (i.strip() for i in text.split(",")):
        if not item:
            continue
        if ":" not in item:
            raise ValueError(f"{ALLOC_CONF_ENV}: expected key:value, got {item!r}")
        key, raw = (s.strip() for s in item.split(":", 1))
        scope, _, name = key.rpartition(".")
        if scope and scope not in DEVICES:
            raise ValueError(f"{ALLOC_CONF_ENV}: unknown device prefix {scope!r} in {item!r} (use cpu., cuda., pinned.)")
        if scope and scope != device:
            continue
        (prefixed if scope else out)[name] = _parse_value(name, raw)
    out.update(prefixed)  # device-specific settings win
    return out


def _budget(value: Any) -> dict[str, Any]:
    """``budget`` -> ``budget_bytes`` or ``budget_fraction``."""
    if value is None:
        return {}
    if isinstance(value, str):
        v = value.strip()
        if v.endswith("%"):
            return {"budget_fraction": float(v[:-1]) / 100, "budget_bytes": 0}
        if re.fullmatch(r"0?\.\d+|1\.0*|0", v):
            return {"budget_fraction": float(v), "budget_bytes": 0}
        return {"budget_bytes": parse_size(v), "budget_fraction": 0.0}
    if isinstance(value, float) and 0 < value <= 1:
        return {"budget_fraction": value, "budget_bytes": 0}
    return {"budget_bytes": parse_size(value), "budget_fraction": 0.0}


def resolve_policy(device: str, kwargs: dict[str, Any], environ: dict[str, str] | None = None,
                   defaults: dict[str, Any] | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
    """Merge defaults < ``TORCH_WSL_ALLOC_CONF`` < keyword arguments.

    Returns ``(core_policy, extras)``: the fields for the C++ core, and the
    device-specific ones (``alignment``, ``huge_pages``, ``expandable_segments``,
    and for ``pinned`` the pinned budget in ``budget_bytes``). Unknown keys
    raise ValueError naming the known ones.
    """
    environ = os.environ if environ is None else environ
    merged: dict[str, Any] = dict(defaults or {})
    if device != "standalone":
        merged.update(parse_alloc_conf(environ.get(ALLOC_CONF_ENV, ""), device))
    merged.update({k: v for k, v in kwargs.items() if v is not None})
    known = set(CORE_FIELDS) | set(EXTRA_FIELDS[device])
    unknown = sorted(set(merged) - known)
    if unknown:
        raise ValueError(f"unknown allocator policy {unknown} for device {device!r}; known: {sorted(known)}")
    extras = {k: merged.pop(k) for k in list(merged) if k in EXTRA_FIELDS[device] and k != "budget"}
    if "budget" in merged:
        merged.update(_budget(merged.pop("budget")))
    if device == "pinned":
        # The pinned budget is where the pool switches to pageable memory, not a hard cap.
        extras["pinned_budget_bytes"] = int(merged.pop("budget_bytes", 0) or 0)
        if merged.pop("budget_fraction", 0):
            raise ValueError("the pinned budget is a size in bytes, not a fraction")
    return merged, extras
