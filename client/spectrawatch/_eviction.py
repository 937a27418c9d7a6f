"""Which queued items to drop so that a new one fits: the sender's queue and the spool's cap."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TypeVar

T = TypeVar("T")


def oldest_droppable(
    items: Iterable[T],
    droppable: Callable[[T], bool],
    size: Callable[[T], int],
    extra_bytes: int,
    extra_items: int = 0,
) -> list[T] | None:
    """The oldest droppable ``items`` (given oldest first) whose removal takes ``extra_items``
    items and ``extra_bytes`` bytes over their bounds back to them (none when neither is over),
    or None when removing every droppable one would not: then none is dropped for a new item
    that is refused anyway."""
    victims: list[T] = []
    for item in items:
        if extra_items <= 0 and extra_bytes <= 0:
            break
        if droppable(item):
            victims.append(item)
            extra_items -= 1
            extra_bytes -= size(item)
    return victims if extra_items <= 0 and extra_bytes <= 0 else None
