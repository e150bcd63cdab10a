"""``modules_to_not_convert`` patterns: compiled once, validated early, matched at a bounded cost.

A pattern ``p`` skips a module path ``name`` when (transformers' rules, plus one of ours):

1. ``p`` matches from the start of ``name`` up to a module boundary, as a regex
   (``"layer.1"`` matches ``layer.1.attn`` but not ``layer.11.attn``; ``"layer.*"`` matches both);
2. ``name`` ends with ``p`` (plain text: ``"fc1"`` matches ``model.decoder.layers.23.fc1``);
3. ``p`` matches a whole run of path components anywhere, as a regex (``"intermediate"`` skips
   ``bert.encoder.layer.0.intermediate.dense``).

Patterns come from ``config.json`` files written by strangers, so a pattern that is not a valid
regex fails when the config is built (a ``ValueError`` naming ``modules_to_not_convert``), and each
match runs in the ``regex`` engine (a dependency of transformers) with a time limit: a pattern with
catastrophic backtracking raises a clear ``ValueError`` instead of hanging the load.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import lru_cache

import regex

__all__ = ["CompiledPattern", "compile_module_patterns", "matches_any", "MATCH_TIMEOUT_SECONDS"]

#: Longest time one pattern may spend on one module path before the match is abandoned.
MATCH_TIMEOUT_SECONDS = 0.25
#: Longest accepted pattern (a module path is far shorter).
MAX_PATTERN_LENGTH = 1000
_BOUNDARY = r"(?:(?<=\.)|(?=\.|$))"


@dataclass(frozen=True)
class CompiledPattern:
    """One ``modules_to_not_convert`` entry, ready to match."""

    text: str
    from_start: regex.Pattern
    component_run: regex.Pattern


def _compile(pattern: str, index: int) -> CompiledPattern:
    if len(pattern) > MAX_PATTERN_LENGTH:
        raise ValueError(f"`modules_to_not_convert[{index}]` is {len(pattern)} characters long; at most "
                         f"{MAX_PATTERN_LENGTH} are accepted")
    try:
        re.compile(pattern)  # the syntax transformers itself accepts
        from_start = regex.compile(rf"(?:{pattern}){_BOUNDARY}")
        component_run = regex.compile(rf"(?:^|\.)(?:{pattern})(?:\.|$)")
    except (re.error, regex.error) as err:
        raise ValueError(
            f"`modules_to_not_convert[{index}]` = {pattern!r} is not a valid regular expression ({err}); "
            "escape special characters (e.g. `\\(`) or give a plain module path"
        ) from None
    return CompiledPattern(pattern, from_start, component_run)


@lru_cache(maxsize=64)
def _compile_all(patterns: tuple[str, ...]) -> tuple[CompiledPattern, ...]:
    return tuple(_compile(p, i) for i, p in enumerate(patterns))


def compile_module_patterns(patterns: Iterable[str] | None) -> tuple[CompiledPattern, ...]:
    """Compile ``modules_to_not_convert`` entries (cached by value).

    Raises:
        ValueError: an entry is not a string or not a valid regular expression; the message names
            ``modules_to_not_convert`` and the entry.
    """
    if patterns is None:
        return ()
    if isinstance(patterns, str):
        raise ValueError(f"`modules_to_not_convert` must be a list of module names, got the string {patterns!r}")
    patterns = tuple(patterns)
    for index, pattern in enumerate(patterns):
        if not isinstance(pattern, str):
            raise ValueError(f"`modules_to_not_convert[{index}]` must be a string, got {pattern!r}")
    return _compile_all(patterns)


def _search(pattern: regex.Pattern, name: str, text: str, anchored: bool) -> bool:
    try:
        found = pattern.match(name, timeout=MATCH_TIMEOUT_SECONDS) if anchored else pattern.search(
            name, timeout=MATCH_TIMEOUT_SECONDS)
    except TimeoutError:
        raise ValueError(
            f"`modules_to_not_convert` pattern {text!r} took over {MATCH_TIMEOUT_SECONDS} s to match the module "
            f"path `{name}` (catastrophic backtracking, e.g. nested repeats like `(a|a)+`); simplify it or list "
            "module paths"
        ) from None
    return found is not None


def matches_any(name: str, compiled: Sequence[CompiledPattern]) -> bool:
    """Whether module path ``name`` matches one of the ``compiled`` patterns (rules in the module doc).

    Each regex match is bounded by :data:`MATCH_TIMEOUT_SECONDS`.

    Raises:
        ValueError: a pattern exceeded the time limit (naming the pattern and the module path).
    """
    for pattern in compiled:
        if name.endswith(pattern.text):
            return True
        if _search(pattern.from_start, name, pattern.text, anchored=True):
            return True
        if _search(pattern.component_run, name, pattern.text, anchored=False):
            return True
    return False
