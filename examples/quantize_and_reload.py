"""Quantize the bundled all-MiniLM-L6-v2 while loading, save it packed, reload it, compare with float.

    python examples/quantize_and_reload.py --bits 2 --transform splitquant --output out/minilm-sq2
"""

from __future__ import annotations

import argparse

from transformers import AutoModel, AutoTokenizer

import hf_splitquant
import splitquant_assets as assets
from hf_splitquant import save_quantized


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bits", type=int, default=2)
    parser.add_argument("--group-size", type=int, default=64)
    parser.add_argument("--transform", choices=["rtn", "splitquant"], default="splitquant")
    parser.add_argument("--output", default="out/minilm-quantized")
    parser.add_argument("--sentences", type=int, default=100)
    args = parser.parse_args()

    path = assets.minilm_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    config = hf_splitquant.SplitQuantConfig(
        bits=args.bits, group_size=args.group_size, transform=None if args.transform == "rtn" else args.transform
    )
    model = AutoModel.from_pretrained(path, quantization_config=config)
    print(hf_splitquant.format_report(hf_splitquant.quantization_report(model), per_layer=False))
    folder = save_quantized(model, args.output, tokenizer=tokenizer, overwrite=True)

    reloaded = AutoModel.from_pretrained(folder)  # plain from_pretrained of the packed folder
    sentences = assets.embedding_sentences(args.sentences)
    reference = assets.mean_pooled_embeddings(AutoModel.from_pretrained(path), tokenizer, sentences)
    quantized = assets.mean_pooled_embeddings(reloaded, tokenizer, sentences)
    print(f"saved to {folder}; mean cosine to float over {len(sentences)} sentences: "
          f"{float((quantized * reference).sum(-1).mean()):.4f}")


if __name__ == "__main__":
    main()
