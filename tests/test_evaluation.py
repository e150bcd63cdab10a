"""Evaluation harness and the evaluate metric modules, against values computed by hand on tiny inputs."""

from __future__ import annotations

import ast
import json
import math
import struct
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from helpers import card_number, tiny_llama
from huggingface_hub import ModelCard
from torch import nn
from transformers import (
    AutoTokenizer,
    BertConfig,
    BertForSequenceClassification,
    LlamaConfig,
    LlamaForCausalLM,
)

import hf_splitquant
import splitquant_assets as assets
from hf_splitquant import cli, evaluation, metrics


class TableModel(nn.Module):
    """A real module whose outputs are table lookups: hidden ``emb[ids]``, logits ``logit_table[ids]``."""

    def __init__(self, emb: list[list[float]], logit_table: list[list[float]]) -> None:
        super().__init__()
        self.emb = nn.Parameter(torch.tensor(emb), requires_grad=False)
        self.logit_table = nn.Parameter(torch.tensor(logit_table), requires_grad=False)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                output_hidden_states: bool = False, **kwargs: object) -> SimpleNamespace:
        return SimpleNamespace(last_hidden_state=self.emb[input_ids], logits=self.logit_table[input_ids])


# ------------------------------------------------------------------------------------------------
# Metric modules (evaluate.load of the package's own scripts) vs hand-computed values
# ------------------------------------------------------------------------------------------------


def test_metric_modules_load_from_package_files() -> None:
    for name in metrics.METRICS:
        path = metrics.metric_path(name)
        assert (path / f"{name}.py").is_file() and path.is_relative_to(Path(hf_splitquant.__file__).parent)
    with pytest.raises(ValueError, match="unknown hf_splitquant metric"):
        metrics.metric_path("accuracy")


def test_perplexity_metric_by_hand() -> None:
    result = metrics.load("perplexity_from_nll").compute(nll=[0.5, 1.5, 1.0, 3.0])
    assert result["mean_nll"] == pytest.approx(1.5, abs=1e-12)
    assert result["perplexity"] == pytest.approx(math.exp(1.5), rel=1e-12)
    assert result["num_tokens"] == 4


def test_kl_fidelity_metric_by_hand() -> None:
    # row 1: float p = softmax([0, ln 3]) = (1/4, 3/4); quantized q = softmax([ln 2, 0]) = (2/3, 1/3)
    # row 2: identical rows -> KL 0, same argmax
    ref = [[0.0, math.log(3.0)], [1.0, -2.0]]
    pred = [[math.log(2.0), 0.0], [1.0, -2.0]]
    kl1 = 0.25 * math.log(0.25 / (2 / 3)) + 0.75 * math.log(0.75 / (1 / 3))
    result = metrics.load("kl_fidelity").compute(predictions=pred, references=ref)
    assert result["kl_divergence"] == pytest.approx(kl1 / 2, rel=1e-6)
    assert result["top1_agreement"] == 0.5  # row 1 argmaxes differ (1 vs 0), row 2 agree
    assert result["num_rows"] == 2
    # KL is not symmetric: swapping float and quantized changes the value
    swapped = metrics.load("kl_fidelity").compute(predictions=ref, references=pred)
    kl1_rev = (2 / 3) * math.log((2 / 3) / 0.25) + (1 / 3) * math.log((1 / 3) / 0.75)
    assert swapped["kl_divergence"] == pytest.approx(kl1_rev / 2, rel=1e-6)


def test_embedding_cosine_metric_by_hand() -> None:
    result = metrics.load("embedding_cosine").compute(predictions=[[3.0, 4.0], [1.0, 0.0], [2.0, 2.0]],
                                                      references=[[4.0, 3.0], [0.0, 2.0], [1.0, 1.0]])
    assert result["cosine"] == pytest.approx((24 / 25 + 0.0 + 1.0) / 3, rel=1e-6)
    assert result["min_cosine"] == pytest.approx(0.0, abs=1e-7)
    assert result["num_rows"] == 3


def test_accuracy_metric_by_hand() -> None:
    result = metrics.load("classification_accuracy").compute(predictions=[0, 2, 1, 1, 0], references=[0, 1, 1, 1, 2])
    assert result == {"accuracy": pytest.approx(0.6), "num_examples": 5}
    with pytest.raises(ValueError, match="as many predictions"):
        evaluation.accuracy([0, 1], [0])


# ------------------------------------------------------------------------------------------------
# Harness on models
# ------------------------------------------------------------------------------------------------


def test_perplexity_of_uniform_model_is_vocab_size() -> None:
    vocab = 5
    model = TableModel([[0.0]] * vocab, [[0.7] * vocab] * vocab)  # every next token has probability 1/5
    blocks = torch.tensor([[0, 1, 2, 3], [4, 4, 0, 1], [2, 3, 1, 0]])
    result = evaluation.perplexity(model, blocks, batch_size=2)
    assert result["perplexity"] == pytest.approx(vocab, rel=1e-12)
    assert result["num_tokens"] == 3 * 3  # each block predicts its tokens 1..3


def test_perplexity_matches_cross_entropy_on_tiny_llama() -> None:
    torch.manual_seed(0)
    model = tiny_llama().eval()
    blocks = torch.randint(3, 120, (3, 12), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        logits = model(blocks).logits
    expected = math.exp(float(torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]).double(), blocks[:, 1:].reshape(-1))))
    # batch size 2 splits the 3 blocks unevenly; a Dataset input gives the same numbers
    assert evaluation.perplexity(model, blocks, batch_size=2)["perplexity"] == pytest.approx(expected, rel=1e-6)
    from datasets import Dataset

    dataset = Dataset.from_dict({"input_ids": blocks.tolist()})
    assert evaluation.perplexity(model, dataset, batch_size=3)["perplexity"] == pytest.approx(expected, rel=1e-6)


def test_fidelity_by_hand_with_padding() -> None:
    # token 0 is padding: garbage hidden state and logits that the mask must hide
    emb_f = [[1e6, -1e6], [1.0, 0.0], [0.0, 1.0]]
    emb_q = [[-1e6, 3e6], [1.0, 1.0], [0.0, 1.0]]
    logits_f = [[50.0, -50.0], [0.0, math.log(3.0)], [2.0, 0.0]]
    logits_q = [[-50.0, 50.0], [math.log(2.0), 0.0], [2.0, 0.0]]
    float_model, quant_model = TableModel(emb_f, logits_f), TableModel(emb_q, logits_q)
    inputs = {"input_ids": torch.tensor([[1, 2, 0], [2, 2, 2]]), "attention_mask": torch.tensor([[1, 1, 0], [1, 1, 1]])}
    result = evaluation.fidelity(float_model, quant_model, inputs, batch_size=1)
    # sequence 1: mean-pooled float (0.5, 0.5), quantized (0.5, 1.0) -> cos = 0.75 / (sqrt(.5) sqrt(1.25))
    cos1 = 0.75 / (math.sqrt(0.5) * math.sqrt(1.25))
    assert result["embedding_cosine"] == pytest.approx((cos1 + 1.0) / 2, rel=1e-6)
    assert result["embedding_cosine_min"] == pytest.approx(cos1, rel=1e-6)
    # 5 unmasked tokens: one token 1 (KL as in the metric test, argmaxes differ), four token 2 (KL 0, agree)
    kl1 = 0.25 * math.log(0.25 / (2 / 3)) + 0.75 * math.log(0.75 / (1 / 3))
    assert result["kl_divergence"] == pytest.approx(kl1 / 5, rel=1e-6)
    assert result["top1_agreement"] == pytest.approx(4 / 5)
    assert result["num_tokens"] == 5 and result["num_sequences"] == 2


@pytest.mark.slow
def test_fidelity_of_quantized_tiny_llama() -> None:
    torch.manual_seed(0)
    float_model = tiny_llama().eval()
    ids = torch.randint(3, 120, (4, 10), generator=torch.Generator().manual_seed(2))
    same = evaluation.fidelity(float_model, float_model, ids)
    assert same["kl_divergence"] == pytest.approx(0.0, abs=1e-12) and same["top1_agreement"] == 1.0
    assert same["embedding_cosine"] == pytest.approx(1.0, abs=1e-6)
    torch.manual_seed(0)
    quant = hf_splitquant.quantize(tiny_llama().eval(), hf_splitquant.SplitQuantConfig(bits=2, group_size=16),
                                   progress=False)
    result = evaluation.fidelity(float_model, quant, ids, batch_size=3)
    with torch.no_grad():
        lf, lq = float_model(ids).logits.double(), quant(ids).logits.double()
    p, logq = lf.softmax(-1), lq.log_softmax(-1)
    expected_kl = float((p * (p.log() - logq)).sum(-1).mean())
    assert result["kl_divergence"] == pytest.approx(expected_kl, rel=1e-5) and expected_kl > 0
    assert result["top1_agreement"] == pytest.approx(float((lf.argmax(-1) == lq.argmax(-1)).double().mean()))
    assert 0 < result["embedding_cosine"] < 1


@pytest.mark.slow
def test_classification_accuracy_matches_one_by_one() -> None:
    tokenizer = AutoTokenizer.from_pretrained(assets.minilm_path())
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                     intermediate_size=48, num_labels=3, max_position_embeddings=128,
                     label2id={"neg": 0, "neu": 1, "pos": 2}, id2label={0: "neg", 1: "neu", 2: "pos"})
    model = BertForSequenceClassification(cfg).eval()
    texts = assets.embedding_sentences(12)
    with torch.no_grad():  # each text alone, no padding: the harness must agree with this
        predicted = [int(model(**tokenizer(t, return_tensors="pt")).logits.argmax(-1)) for t in texts]
    labels = [(i * 7) % 3 for i in range(len(texts))]
    expected = sum(p == y for p, y in zip(predicted, labels)) / len(texts)
    result = evaluation.classification_accuracy(model, tokenizer, texts, labels, batch_size=5)
    assert result["accuracy"] == pytest.approx(expected) and result["num_examples"] == 12
    names = [cfg.id2label[y] for y in labels]  # string labels through model.config.label2id
    assert evaluation.classification_accuracy(model, tokenizer, texts, names)["accuracy"] == pytest.approx(expected)
    with pytest.raises(ValueError, match="not in the label map"):
        evaluation.classification_accuracy(model, tokenizer, texts[:2], ["neg", "bad"])


# ------------------------------------------------------------------------------------------------
# Pareto front and plot
# ------------------------------------------------------------------------------------------------


RESULTS = [
    {"label": "a", "method": "rtn", "bits_per_weight": 2.4, "metrics": {"ppl": 90.0}},
    {"label": "b", "method": "rtn", "bits_per_weight": 3.4, "metrics": {"ppl": 30.0}},
    {"label": "c", "method": "splitquant", "bits_per_weight": 5.1, "metrics": {"ppl": 35.0}},  # dominated by b
    {"label": "d", "method": "rtn", "bits_per_weight": 4.4, "metrics": {"ppl": 21.0}},
    {"label": "e", "method": "splitquant", "bits_per_weight": 4.4, "metrics": {"ppl": 22.0}},  # dominated by d
]


def test_pareto_front() -> None:
    assert evaluation.pareto_front(RESULTS, "ppl", higher_is_better=False) == [0, 1, 3]
    assert evaluation.pareto_front(RESULTS, "ppl", higher_is_better=True) == [0]  # fewest bits and highest
    assert evaluation.pareto_front(RESULTS[1:], "ppl", higher_is_better=True) == [0, 1]  # b, then c


@pytest.mark.slow
def test_plot_writes_png(tmp_path: Path) -> None:
    path = evaluation.plot_quality_vs_bits(RESULTS, tmp_path / "sub" / "plot.png", "ppl", higher_is_better=False,
                                           reference=20.0, log_y=True)
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", data[16:24])
    assert (width, height) == (900, 576) and len(data) > 20_000
    with pytest.raises(KeyError, match="no quality value"):
        evaluation.plot_quality_vs_bits(RESULTS, tmp_path / "x.png", "cosine")


# ------------------------------------------------------------------------------------------------
# CLI: hf-splitquant evaluate, with results flowing into the card
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def smol_vocab_llama(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny Llama with SmolLM2's real tokenizer: float and packed (RTN 4-bit) checkpoints."""
    tokenizer = AutoTokenizer.from_pretrained(assets.smollm2_path())
    root = tmp_path_factory.mktemp("smol")
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True,
                      max_position_embeddings=128)
    model = LlamaForCausalLM(cfg).eval()
    model.save_pretrained(root / "float")
    tokenizer.save_pretrained(root / "float")
    hf_splitquant.quantize(model, hf_splitquant.SplitQuantConfig(bits=4, group_size=16), progress=False)
    model.save_pretrained(root / "packed")
    tokenizer.save_pretrained(root / "packed")
    return {"float": root / "float", "packed": root / "packed"}


@pytest.mark.slow
def test_cli_evaluate_perplexity_json_and_card(smol_vocab_llama: dict[str, Path], tmp_path: Path,
                                               capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "eval.json"
    text_file = tmp_path / "wikipedia_eval.jsonl"  # the texts come from the caller: one JSON line per article
    text_file.write_text("".join(json.dumps({"text": t}) + "\n" for t in assets.wikipedia_split("eval")))
    code = cli.main(["evaluate", str(smol_vocab_llama["packed"]), "--task", "perplexity", "--reference",
                     str(smol_vocab_llama["float"]), "--num-blocks", "2", "--block-len", "24", "--json", str(out),
                     "--write-card", "--base-model", "org/tiny", "--text-file", str(text_file)])
    assert code == 0
    result = json.loads(out.read_text())
    assert result["task"] == "perplexity" and result["num_examples"] == 2 * 23
    assert set(result["metrics"]) == {"perplexity", "kl_divergence", "top1_agreement"}
    assert result["bits_per_weight"] == pytest.approx(
        hf_splitquant.quantization_report(LlamaForCausalLM.from_pretrained(smol_vocab_llama["packed"])).bits_per_weight)
    # the numbers are the harness's on the same blocks
    tokenizer = AutoTokenizer.from_pretrained(smol_vocab_llama["packed"])
    blocks = assets.perplexity_token_blocks(tokenizer, 2, 24)
    packed = LlamaForCausalLM.from_pretrained(smol_vocab_llama["packed"])
    reference = LlamaForCausalLM.from_pretrained(smol_vocab_llama["float"])
    assert result["metrics"]["perplexity"] == pytest.approx(evaluation.perplexity(packed, blocks)["perplexity"])
    assert result["reference_metrics"]["perplexity"] == pytest.approx(
        evaluation.perplexity(reference, blocks)["perplexity"])
    assert "perplexity" in capsys.readouterr().out
    card = ModelCard.load(smol_vocab_llama["packed"] / "README.md")
    assert card.data.base_model == "org/tiny" and "int4" in card.data.tags
    row = f"| perplexity | {card_number(result['metrics']['perplexity'])} | {card_number(result['reference_metrics']['perplexity'])} |"
    assert row in card.text


@pytest.mark.slow
def test_cli_evaluate_write_card_keeps_the_card_quantize_wrote(smol_vocab_llama: dict[str, Path], tmp_path: Path,
                                                                capsys: pytest.CaptureFixture) -> None:
    """``quantize --model-card --base-model`` then ``evaluate --write-card``: the card keeps its metadata
    (base_model, base_model_relation, what the user added) and its title, and gains the results."""
    out = tmp_path / "q"
    assert cli.main(["quantize", str(smol_vocab_llama["float"]), "-o", str(out), "--bits", "4", "--group-size", "16",
                     "--model-card", "--base-model", "org/tiny-base"]) == 0
    before = ModelCard.load(out / "README.md")
    title = next(line for line in before.text.splitlines() if line.startswith("# "))
    before.data.license = "apache-2.0"  # something the user added by hand
    before.data.tags = [*before.data.tags, "my-tag"]
    before.save(out / "README.md")
    text_file = tmp_path / "texts.jsonl"
    text_file.write_text("".join(json.dumps({"text": t}) + "\n" for t in assets.wikipedia_split("eval")))
    assert cli.main(["evaluate", str(out), "--task", "perplexity", "--num-blocks", "2", "--block-len", "24",
                     "--write-card", "--text-file", str(text_file)]) == 0
    capsys.readouterr()
    card = ModelCard.load(out / "README.md")
    data = card.data.to_dict()
    assert data["base_model"] == "org/tiny-base" and data["base_model_relation"] == "quantized"
    assert data["license"] == "apache-2.0" and {"my-tag", "int4", "rtn"} <= set(data["tags"])
    assert title in card.text and "LlamaForCausalLM" not in title
    assert "| perplexity |" in card.text and "[org/tiny-base](https://huggingface.co/org/tiny-base)" in card.text


@pytest.mark.slow
def test_cli_evaluate_errors(smol_vocab_llama: dict[str, Path], tmp_path: Path,
                             capsys: pytest.CaptureFixture) -> None:
    assert cli.main(["evaluate", str(smol_vocab_llama["packed"]), "--task", "embedding-fidelity"]) == 2
    assert "needs --reference" in capsys.readouterr().err
    assert cli.main(["evaluate", str(tmp_path), "--task", "perplexity"]) == 2
    assert "config.json" in capsys.readouterr().err
    with pytest.raises(ValueError, match="task must be one of"):
        evaluation.evaluate_model(torch.nn.Linear(1, 1), "bleu", None)


@pytest.mark.slow
def test_reference_cache_gives_the_same_results(smol_vocab_llama: dict[str, Path]) -> None:
    tokenizer = AutoTokenizer.from_pretrained(smol_vocab_llama["packed"])
    packed = LlamaForCausalLM.from_pretrained(smol_vocab_llama["packed"])
    reference = LlamaForCausalLM.from_pretrained(smol_vocab_llama["float"])
    kwargs = {"num_blocks": 3, "block_len": 16, "batch_size": 2, "texts": assets.wikipedia_split("eval")}
    plain = evaluation.evaluate_model(packed, "perplexity", tokenizer, reference, **kwargs)
    cache: dict = {}
    first = evaluation.evaluate_model(packed, "perplexity", tokenizer, reference, cache=cache, **kwargs)
    second = evaluation.evaluate_model(packed, "perplexity", tokenizer, reference, cache=cache, **kwargs)
    assert len(cache) == 1
    for result in (first, second):
        assert result["metrics"] == pytest.approx(plain["metrics"], rel=1e-12)
        assert result["reference_metrics"] == pytest.approx(plain["reference_metrics"], rel=1e-12)
    # and the one-pass numbers equal the separate harness functions
    blocks = assets.perplexity_token_blocks(tokenizer, 3, 16)
    assert plain["metrics"]["perplexity"] == pytest.approx(evaluation.perplexity(packed, blocks)["perplexity"])
    fid = evaluation.fidelity(reference, packed, blocks, batch_size=2)
    assert plain["metrics"]["kl_divergence"] == pytest.approx(fid["kl_divergence"], rel=1e-9)
    outputs = evaluation.reference_outputs(reference, blocks, batch_size=2)
    assert evaluation.fidelity(reference, packed, blocks, 2, float_outputs=outputs) == pytest.approx(fid, rel=1e-12)
    with pytest.raises(ValueError, match="batches"):
        evaluation.fidelity(reference, packed, blocks, 3, float_outputs=outputs)


# ------------------------------------------------------------------------------------------------
# The caller's data: text files, token blocks, evaluate_model without any bundled dataset
# ------------------------------------------------------------------------------------------------


class CharTokenizer:
    """One token per character (its code point): enough to check how texts become blocks."""

    def __call__(self, text: str, add_special_tokens: bool = True, verbose: bool = True) -> dict[str, list[int]]:
        ids = [ord(c) for c in text]
        return {"input_ids": ([0] + ids) if add_special_tokens else ids}


def test_read_texts_formats(tmp_path: Path) -> None:
    jsonl = tmp_path / "a.jsonl"
    jsonl.write_text('{"text": "first\\nwith a newline", "id": 1}\n\n"a plain string"\n{"text": "  "}\n')
    assert evaluation.read_texts(jsonl) == ["first\nwith a newline", "a plain string"]
    array = tmp_path / "b.json"
    array.write_text(json.dumps([{"text": "x"}, "y"]))
    assert evaluation.read_texts(array) == ["x", "y"]
    plain = tmp_path / "c.txt"
    plain.write_text("one line\n\n  two  \n")
    assert evaluation.read_texts(plain) == ["one line", "two"]
    bad = tmp_path / "d.jsonl"
    bad.write_text('{"text": "ok"}\n{"title": "no text"}\n')
    with pytest.raises(ValueError, match="d.jsonl:2"):
        evaluation.read_texts(bad)
    (tmp_path / "empty.txt").write_text("\n\n")
    with pytest.raises(ValueError, match="no text"):
        evaluation.read_texts(tmp_path / "empty.txt")
    with pytest.raises(FileNotFoundError):
        evaluation.read_texts(tmp_path / "missing.txt")


def test_token_blocks_from_texts_joins_with_a_blank_line() -> None:
    texts = ["abc", "de", "f" * 50]
    blocks = evaluation.token_blocks_from_texts(CharTokenizer(), texts, num_blocks=2, block_len=4)
    expected = [ord(c) for c in "abc\n\nde\n\nfff"][:8]  # no special token in front
    assert blocks.dtype == torch.long and blocks.flatten().tolist() == expected
    with pytest.raises(ValueError, match="only 59 tokens"):
        evaluation.token_blocks_from_texts(CharTokenizer(), texts, num_blocks=1, block_len=60)
    with pytest.raises(TypeError, match="single string"):
        evaluation.token_blocks_from_texts(CharTokenizer(), "abc", 1, 2)


def test_evaluate_model_takes_its_data_as_arguments() -> None:
    vocab = 5
    uniform = TableModel([[0.0]] * vocab, [[0.7] * vocab] * vocab)
    blocks = torch.tensor([[0, 1, 2, 3], [4, 4, 0, 1]])
    result = evaluation.evaluate_model(uniform, "perplexity", None, token_blocks=blocks, batch_size=1)
    assert result["metrics"]["perplexity"] == pytest.approx(vocab, rel=1e-12)
    assert result["dataset"] == "2 blocks x 4 tokens" and result["num_examples"] == 2 * 3
    with pytest.raises(ValueError, match="needs texts"):
        evaluation.evaluate_model(uniform, "perplexity", None)
    with pytest.raises(ValueError, match="not both"):
        evaluation.evaluate_model(uniform, "perplexity", None, texts=["a"], token_blocks=blocks)
    with pytest.raises(ValueError, match="needs texts"):
        evaluation.evaluate_model(uniform, "embedding-fidelity", None, uniform)
    with pytest.raises(ValueError, match="needs texts"):  # checked before any model is loaded
        evaluation.evaluate_checkpoint("/nonexistent", "perplexity")


def test_cli_evaluate_needs_a_text_file(float_checkpoints: dict[str, str], capsys: pytest.CaptureFixture) -> None:
    assert cli.main(["evaluate", float_checkpoints["llama"], "--task", "perplexity"]) == 2
    assert "--text-file" in capsys.readouterr().err


def test_missing_extra_names_the_pip_extra() -> None:
    from hf_splitquant.extras import require

    with pytest.raises(ImportError, match=r"pip install 'hf-splitquant\[plot\]'"):
        require("no_such_module_for_hf_splitquant_tests", "plot", "plotting")


def test_demo_command_without_the_assets_package(monkeypatch: pytest.MonkeyPatch,
                                                 capsys: pytest.CaptureFixture) -> None:
    monkeypatch.setitem(sys.modules, "splitquant_assets", None)  # as if hf-splitquant-assets were not installed
    assert cli.main(["demo"]) == 2
    err = capsys.readouterr().err
    assert "splitquant_assets" in err and "make demo" in err


def _imports(path: Path) -> set[str]:
    """Absolute names of the modules a source file imports (relative imports resolved)."""
    package = ".".join(path.relative_to(Path(hf_splitquant.__file__).parents[1]).with_suffix("").parts[:-1])
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
            module = f"{base}.{node.module}" if node.level and node.module else (node.module or base)
            names.add(module)
            names.update(f"{module}.{alias.name}" for alias in node.names)
    return names


def test_no_import_cycles_between_evaluation_metrics_cli_and_commands() -> None:
    root = Path(hf_splitquant.__file__).parent
    functional = _imports(root / "metrics" / "functional.py")
    assert not {name for name in functional if name.startswith("hf_splitquant")}
    for name in metrics.METRICS:  # the metric scripts use the pure math only
        used = {n for n in _imports(root / "metrics" / name / f"{name}.py") if n.startswith("hf_splitquant")}
        assert used <= {"hf_splitquant.metrics.functional"} | {f"hf_splitquant.metrics.functional.{f}" for f in
                                                               ("accuracy", "cosine_similarity", "kl_divergence",
                                                                "perplexity_from_nll", "top1_agreement")}, used
    for path in (root / "commands").glob("*.py"):  # commands never import the cli that is built from them
        assert not any(n == "hf_splitquant.cli" or n.startswith("hf_splitquant.cli.") for n in _imports(path)), path
    for path in root.rglob("*.py"):  # the library imports no asset code (only `demo` names it, lazily)
        if path != root / "commands" / "demo.py":
            assert not any(n.startswith("splitquant_assets") for n in _imports(path)), path
