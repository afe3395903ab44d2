"""Input checks shared by every layer (schedules, critic, data, methods, eval): one wording for bad choices."""

from __future__ import annotations


def check_choice(name: str, value, choices) -> None:
    """A one-line ``ValueError`` unless ``value`` is one of ``choices``: "NAME must be one of A, B, not 'x'."."""
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(str, choices))}, not {value!r}.")


__all__ = ["check_choice"]
