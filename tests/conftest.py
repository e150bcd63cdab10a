"""Shared fixtures: tiny real transformers models saved as float checkpoints, token ids.

The helpers (models, fake Hub, toy data) are in ``helpers.py``; test modules import that module,
never ``conftest`` or each other.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest
import torch
from helpers import TINY_MODELS, VOCAB
from transformers.utils import logging as hf_logging

import hf_splitquant  # noqa: F401  (registers the quantizer)

torch.set_num_threads(2)
hf_logging.disable_progress_bar()


@pytest.fixture
def one_thread():
    """One torch thread: on 2 shared cores, 2-thread elementwise kernels are many times slower.
    Modules that optimise rounding use it with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="session")
def float_checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Each tiny model saved once as a float safetensors checkpoint."""
    root = tmp_path_factory.mktemp("float")
    paths = {}
    for name, build in TINY_MODELS.items():
        torch.manual_seed(0)
        model = build().eval()
        path = root / name
        model.save_pretrained(path)
        paths[name] = str(path)
    return paths


@pytest.fixture
def input_ids() -> torch.Tensor:
    """A [2, 11] batch of random token ids (seeded) for the tiny models."""
    return torch.randint(3, VOCAB, (2, 11), generator=torch.Generator().manual_seed(1))
