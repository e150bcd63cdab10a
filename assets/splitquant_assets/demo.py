"""The main job: quantize the bundled all-MiniLM-L6-v2 with SplitQuant INT2 and plain RTN INT2,
save packed checkpoints, reload them with plain ``from_pretrained`` and compare with float.

Run with ``make demo``, ``python -m splitquant_assets.demo`` or ``hf-splitquant demo`` (the latter
needs this package installed: ``pip install -e ./assets``).
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModel, AutoTokenizer
from transformers.utils import logging

from hf_splitquant import SplitQuantConfig, quantization_report
from hf_splitquant.commands.demo import add_demo_arguments
from hf_splitquant.saving import save_quantized

from . import loaders as assets

logger = logging.get_logger(__name__)

__all__ = ["DemoRow", "main", "run_demo"]


@dataclass
class DemoRow:
    """One line of the demo table."""

    name: str
    bits_per_weight: float
    disk_mb: float
    cosine: float
    seconds: float


def _disk_mb(folder: Path) -> float:
    """Size of the folder's safetensors files in MB."""
    return sum(f.stat().st_size for f in folder.glob("*.safetensors")) / 1e6


def run_demo(output_dir: str = "out/demo", num_sentences: int = 300, group_size: int | None = 64) -> list[DemoRow]:
    """Run the demo and print its table; returns the rows."""
    torch.manual_seed(0)
    model_path = assets.minilm_path()
    sentences = assets.embedding_sentences(num_sentences)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    start = time.perf_counter()
    float_model = AutoModel.from_pretrained(model_path).eval()
    reference = assets.mean_pooled_embeddings(float_model, tokenizer, sentences)
    rows = [DemoRow("float32 (original)", 32.0, _disk_mb(model_path), 1.0, time.perf_counter() - start)]
    del float_model

    configs = {
        "splitquant-int2": SplitQuantConfig(bits=2, group_size=group_size, transform="splitquant"),
        "rtn-int2": SplitQuantConfig(bits=2, group_size=group_size),
        "rtn-int4": SplitQuantConfig(bits=4, group_size=group_size),
    }
    group = "per-channel" if group_size is None else f"g{group_size}"
    for name, config in configs.items():
        start = time.perf_counter()
        model = AutoModel.from_pretrained(model_path, quantization_config=config).eval()
        folder = save_quantized(model, Path(output_dir) / name, tokenizer=tokenizer, overwrite=True)
        reloaded = AutoModel.from_pretrained(folder).eval()  # plain from_pretrained of the packed folder
        embeddings = assets.mean_pooled_embeddings(reloaded, tokenizer, sentences)
        seconds = time.perf_counter() - start
        in_memory = assets.mean_pooled_embeddings(model, tokenizer, sentences[:32])
        if not torch.equal(in_memory, embeddings[:32]):
            raise RuntimeError(f"{name}: the reloaded checkpoint does not reproduce the in-memory model")
        report = quantization_report(reloaded)
        cosine = float((embeddings * reference).sum(-1).mean())
        rows.append(DemoRow(f"{name} {group}", report.bits_per_weight, _disk_mb(folder), cosine, seconds))

    print(f"\nall-MiniLM-L6-v2, {len(sentences)} sentences, 36 encoder Linear layers quantized (embeddings in float)")
    print("| model | bits/weight (overheads included) | size on disk (MB) | cosine to float | time (s) |")
    print("|---|---|---|---|---|")
    for r in rows:
        bpw = "32 (float)" if r.name.startswith("float") else f"{r.bits_per_weight:.3f}"
        print(f"| {r.name} | {bpw} | {r.disk_mb:.1f} | {r.cosine:.4f} | {r.seconds:.1f} |")
    print("time: quantize while loading + save + reload + embed; bits/weight counts codes, scales, zero points,"
          " cluster ids.")
    print(f"checkpoints written under {Path(output_dir).resolve()}")
    return rows


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point: parse the options and run the demo."""
    parser = add_demo_arguments(argparse.ArgumentParser(prog="python -m splitquant_assets.demo",
                                                        description=__doc__.splitlines()[0]))
    args = parser.parse_args(argv)
    logging.set_verbosity_warning()
    logging.disable_progress_bar()
    run_demo(output_dir=args.output_dir, num_sentences=args.num_sentences, group_size=args.group_size)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
