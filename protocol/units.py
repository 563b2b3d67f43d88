"""Sizes and durations as people and QEMU's monitors write them: one parser
for every command line, workload spec, drive option and HMP argument."""

from __future__ import annotations

_SHIFTS = {"B": 0, "K": 10, "M": 20, "G": 30, "T": 40, "P": 50, "E": 60}
_SECONDS = {"ns": 1e-9, "us": 1e-6, "ms": 1e-3, "s": 1.0}


def parse_size(text: str | int, default_shift: int = 0) -> int:
    """'64M', '1.5G', '4096', '2MiB', '16kb' -> bytes (binary multiples).

    A bare number is scaled by `default_shift` (QEMU's HMP reads a bare
    max-bandwidth in MiB). Raises ValueError on anything else or a negative."""
    if isinstance(text, int) and not isinstance(text, bool):
        value, shift = float(text), default_shift
    else:
        s = str(text).strip().upper().removesuffix("IB")
        if len(s) > 1 and s.endswith("B") and s[-2] in _SHIFTS:
            s = s[:-1]  # '16KB' -> '16K'
        shift = default_shift
        if s and s[-1] in _SHIFTS:
            s, shift = s[:-1], _SHIFTS[s[-1]]
        try:
            value = float(s)
        except ValueError:
            raise ValueError(f"not a size: {text!r} (examples: 4096, 64K, 256M, 1G)") from None
    if value < 0 or value != value:
        raise ValueError(f"size must not be negative: {text!r}")
    return int(value * (1 << shift))


def parse_seconds(text: str | float) -> float:
    """'0.03', '30ms', '30000us', '30000000ns', '0.3s' -> seconds."""
    t = str(text).strip().lower()
    suffix = next((u for u in ("ns", "us", "ms", "s") if t.endswith(u)), "")
    try:
        value = float(t.removesuffix(suffix)) * _SECONDS.get(suffix, 1.0)
    except ValueError:
        raise ValueError(f"not a duration: {text!r} (examples: 0.3, 300ms, 0.3s)") from None
    if value < 0 or value != value:
        raise ValueError(f"duration must not be negative: {text!r}")
    return value
