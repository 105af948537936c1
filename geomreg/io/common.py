"""Small helpers shared by the readers: one-line exception text, number tests, parse errors."""

from __future__ import annotations

from pathlib import Path

from ..errors import InputError


def short(exc: BaseException, limit: int = 160) -> str:
    """Describe an exception in one line of at most ``limit`` characters."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    if len(text) > limit:
        text = text[: limit - 3] + "..."
    return text


def is_number(token: str) -> bool:
    """Whether ``token`` parses as a float."""
    try:
        float(token)
    except ValueError:
        return False
    return True


def corrupt(path: Path, kind: str, detail: str = "") -> InputError:
    """The error for a file that cannot be parsed as ``kind`` (PLY, PCD, ...)."""
    msg = f"could not parse as {kind} (corrupt or truncated?)"
    return InputError(str(path), f"{msg}: {detail}" if detail else msg)
