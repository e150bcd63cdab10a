"""Evaluation inputs from the caller's own text: read a text file, cut token blocks.

The library ships no dataset: :func:`hf_splitquant.evaluation.evaluate_model` and
``hf-splitquant evaluate --text-file FILE`` take the texts (or ready token blocks) from the user.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

__all__ = ["read_texts", "token_blocks_from_texts"]

#: Separator placed between texts before tokenizing them into perplexity blocks.
TEXT_SEPARATOR = "\n\n"


def _text_of(record: Any, where: str) -> str:
    """The text of one JSON record: a string, or an object's ``"text"`` field."""
    if isinstance(record, str):
        return record
    if isinstance(record, dict) and isinstance(record.get("text"), str):
        return record["text"]
    raise ValueError(f"{where}: expected a JSON string or an object with a string 'text' field, "
                     f"got {type(record).__name__}")


def read_texts(path: str | os.PathLike) -> list[str]:
    """Read evaluation texts from a local file.

    * ``.jsonl`` / ``.json``: JSON lines, one text per line -- a JSON string or an object with a
      ``"text"`` field (other fields are ignored); a ``.json`` file holding one JSON array of such
      values is accepted too. Texts may contain newlines.
    * anything else: plain UTF-8 text, one text per non-empty line (lines are stripped).

    Args:
        path: the file.

    Returns:
        The texts, in file order (empty texts dropped).

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: a JSON line is malformed or has no text, or the file holds no text.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"text file {path} not found")
    raw = path.read_text(encoding="utf-8")
    texts: list[str] = []
    if path.suffix.lower() in (".jsonl", ".json"):
        stripped = raw.lstrip()
        if path.suffix.lower() == ".json" and stripped.startswith("["):
            try:
                records = json.loads(stripped)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}: not valid JSON ({err})") from None
            texts = [_text_of(record, f"{path} item {i}") for i, record in enumerate(records)]
        else:
            for number, line in enumerate(raw.splitlines(), start=1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as err:
                    raise ValueError(f"{path}:{number}: not a JSON line ({err})") from None
                texts.append(_text_of(record, f"{path}:{number}"))
    else:
        texts = [line.strip() for line in raw.splitlines()]
    texts = [text for text in texts if text.strip()]
    if not texts:
        raise ValueError(f"{path} holds no text")
    return texts


def token_blocks_from_texts(tokenizer: Any, texts: Sequence[str], num_blocks: int, block_len: int) -> torch.Tensor:
    """Cut consecutive, non-overlapping token blocks from the start of ``texts``.

    The texts are joined with a blank line (``"\\n\\n"``) and tokenized without special tokens (no
    BOS/EOS/CLS); block ``b`` holds tokens ``b * block_len`` to ``(b + 1) * block_len - 1``. Only as
    many whole texts as needed are tokenized (a character budget of ``8 * num_blocks * block_len +
    2048``, doubled until enough tokens come out).

    Args:
        tokenizer: a Hugging Face tokenizer (anything callable like one returning ``input_ids``).
        texts: the texts, in order.
        num_blocks: number of blocks (rows), at least 1.
        block_len: tokens per block, at least 1.

    Returns:
        A ``torch.long`` tensor of shape ``[num_blocks, block_len]``.

    Raises:
        TypeError: ``texts`` is a single string.
        ValueError: bad sizes, or the texts hold fewer than ``num_blocks * block_len`` tokens.
    """
    if isinstance(texts, str):
        raise TypeError("texts must be a sequence of strings, not a single string")
    if num_blocks < 1 or block_len < 1:
        raise ValueError(f"num_blocks and block_len must be >= 1, got {num_blocks}, {block_len}")
    texts = list(texts)
    needed = num_blocks * block_len
    budget = 8 * needed + 2048  # characters; a token is rarely longer than 8 characters
    ids: list[int] = []
    while True:
        used, total = 0, 0
        while used < len(texts) and total < budget:
            total += len(texts[used]) + len(TEXT_SEPARATOR)
            used += 1
        ids = tokenizer(TEXT_SEPARATOR.join(texts[:used]), add_special_tokens=False, verbose=False)["input_ids"]
        if len(ids) >= needed or used == len(texts):
            break
        budget *= 2
    if len(ids) < needed:
        raise ValueError(f"the texts hold only {len(ids)} tokens with this tokenizer; "
                         f"{num_blocks} x {block_len} = {needed} were requested")
    return torch.tensor(ids[:needed], dtype=torch.long).view(num_blocks, block_len)
