"""Model cards and Hub pushes, offline: a real HTTP server on 127.0.0.1 plays the Hub.

:class:`helpers.FakeHub` answers the endpoints that huggingface_hub 2.4 and transformers 5.23 call to
create a repo, upload a folder (preupload in ``regular`` mode, NDJSON commit with base64 files),
validate a card's YAML and read files back (``HEAD``/``GET .../resolve/...``, repo info). Uploaded
files land in a temporary folder, one sub-folder per repo.

huggingface_hub reads ``HF_ENDPOINT`` and ``HF_TOKEN`` when it is imported, so every push runs in
a subprocess whose environment points at the server (this test process keeps ``HF_HUB_OFFLINE=1``).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import (
    EVAL,
    REPO_ROOT,
    TOKEN,
    FakeHub,
    hub_env,
    model_output,
    quantized_tiny_llama,
    run_python,
    tiny_llama,
)
from huggingface_hub import ModelCard
from transformers import AutoModelForCausalLM

import hf_splitquant
from hf_splitquant.integrations import hub

PUSH_SCRIPT = """
    import json, sys, torch
    import hf_splitquant
    from hf_splitquant.integrations.hub import push_to_hub
    from helpers import quantized_tiny_llama, EVAL, model_output

    model = quantized_tiny_llama()
    model.config._name_or_path = model.name_or_path = "HuggingFaceTB/SmolLM2-135M"  # as if loaded from the Hub
    ids = torch.randint(3, 120, (2, 11), generator=torch.Generator().manual_seed(1))
    torch.save({"input_ids": ids, "logits": model_output(model, ids)}, sys.argv[1] if len(sys.argv) > 1 else "ref.pt")
    # 1. our push: checkpoint + generated card
    info = push_to_hub(model, "tester/tiny-llama-sq3", base_model="HuggingFaceTB/SmolLM2-135M", eval_results=EVAL)
    # 2. the model's own push_to_hub (transformers' arguments) to a new repo: our card
    model.push_to_hub("tester/tiny-llama-sq3-transformers", commit_message="model push", tags=["my-tag"])
    # 3. the model's push to the repo that holds our card: rebuilt, keeping its metadata and evaluation
    model.push_to_hub("tester/tiny-llama-sq3", commit_message="second push")
    # 4. a repo whose card someone wrote by hand: its text stays, our metadata joins it
    from huggingface_hub import HfApi
    HfApi().create_repo("tester/own-card")
    HfApi().upload_file(path_or_fileobj=b"---\\nlicense: mit\\ntags:\\n- mine\\n---\\n# My model\\n\\nHand-written.\\n",
                        path_in_repo="README.md", repo_id="tester/own-card")
    model.push_to_hub("tester/own-card")
    # 5. save_pretrained(push_to_hub=True): saved locally (with the guard), uploaded by the model's push_to_hub
    model.save_pretrained("local-copy", push_to_hub=True, repo_id="tester/via-save")
    # 4. from_pretrained over HTTP from the fake Hub
    from transformers import AutoModelForCausalLM
    again = AutoModelForCausalLM.from_pretrained("tester/tiny-llama-sq3")
    same = torch.equal(model_output(again, ids), model_output(model, ids))
    print(json.dumps({"commit_url": info.commit_url, "http_reload_equal": same}))
"""


@pytest.fixture(scope="module")
def pushed(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Run the pushes once in a subprocess against a fresh fake Hub."""
    root = tmp_path_factory.mktemp("fakehub")
    work = tmp_path_factory.mktemp("push")
    with FakeHub(root / "storage") as server:
        result = run_python(PUSH_SCRIPT.replace('"ref.pt"', repr(str(work / "ref.pt"))), hub_env(server, work / "hf"),
                            work)
        summary = json.loads(result.stdout.strip().splitlines()[-1])
        return {"hub": server, "summary": summary, "ref": torch.load(work / "ref.pt"), "storage": root / "storage"}


@pytest.mark.slow
def test_push_then_reload_bit_exact(pushed: dict) -> None:
    folder = pushed["storage"] / "tester" / "tiny-llama-sq3"
    assert {"config.json", "model.safetensors", "README.md"} <= {p.name for p in folder.iterdir()}
    reloaded = AutoModelForCausalLM.from_pretrained(folder)
    assert isinstance(reloaded.model.layers[0].self_attn.q_proj, hf_splitquant.PackedLinear)
    assert torch.equal(model_output(reloaded, pushed["ref"]["input_ids"]), pushed["ref"]["logits"])
    assert pushed["summary"]["http_reload_equal"] is True  # from_pretrained("tester/...") through the server


@pytest.mark.slow
def test_push_sends_token_and_expected_endpoints(pushed: dict) -> None:
    requests = pushed["hub"].requests
    writes = [r for r in requests if r[0] == "POST"]
    assert writes and all(auth == f"Bearer {TOKEN}" for _, _, auth in writes)
    paths = {path for _, path, _ in writes}
    assert "/api/repos/create" in paths
    assert "/api/models/tester/tiny-llama-sq3/preupload/main" in paths
    assert "/api/models/tester/tiny-llama-sq3/commit/main" in paths
    assert "/api/validate-yaml" in paths  # transformers' create_commit validates the README metadata
    assert len(pushed["hub"].commits["tester/tiny-llama-sq3"]) >= 1
    reads = {(method, path) for method, path, _ in requests}
    # every push looks for a card on the Hub first: none on a new repo, ours on the repo pushed to before
    assert ("HEAD", "/tester/tiny-llama-sq3-transformers/resolve/main/README.md") in reads
    assert ("GET", "/tester/tiny-llama-sq3/resolve/main/README.md") in reads


@pytest.mark.slow
def test_pushed_card_metadata(pushed: dict) -> None:
    card = ModelCard.load(pushed["storage"] / "tester" / "tiny-llama-sq3" / "README.md")
    data = card.data.to_dict()
    assert data["base_model"] == "HuggingFaceTB/SmolLM2-135M"
    assert data["base_model_relation"] == "quantized"
    assert data["library_name"] == "transformers"
    assert data["pipeline_tag"] == "text-generation"
    assert {"splitquant", "hf-splitquant", "int3"} <= set(data["tags"])
    # the body: quantization table, per-layer summary, evaluation, how to load (push 3 rebuilt the card from
    # the model and kept the evaluation of push 1)
    assert "| splitquant | 3 | 16 | 14 |" in card.text
    assert "| perplexity | 12.5000 | 11.2500 |" in card.text
    assert "pip install hf-splitquant" in card.text and "import hf_splitquant" in card.text
    assert 'from_pretrained("tester/tiny-llama-sq3")' in card.text


@pytest.mark.slow
def test_model_push_to_hub_writes_our_card(pushed: dict) -> None:
    """transformers' own ``model.push_to_hub`` (bound on packed models) writes hf_splitquant's card."""
    folder = pushed["storage"] / "tester" / "tiny-llama-sq3-transformers"
    card = ModelCard.load(folder / "README.md")
    data = card.data.to_dict()
    assert data["base_model"] == "HuggingFaceTB/SmolLM2-135M"  # the model's name_or_path, a Hub id
    assert data["base_model_relation"] == "quantized" and data["library_name"] == "transformers"
    assert {"splitquant", "int3", "my-tag"} <= set(card.data.tags)
    assert "Per-layer bits" in card.text and "bits per quantized weight" in card.text
    assert 'from_pretrained("tester/tiny-llama-sq3-transformers")' in card.text
    assert json.loads((folder / "config.json").read_text())["transformers_weights"].startswith("hf_splitquant packed")
    reloaded = AutoModelForCausalLM.from_pretrained(folder)
    assert torch.equal(model_output(reloaded, pushed["ref"]["input_ids"]), pushed["ref"]["logits"])
    assert any(path == "/api/models/tester/tiny-llama-sq3-transformers/commit/main"
               for method, path, _ in pushed["hub"].requests if method == "POST")


@pytest.mark.slow
def test_model_push_keeps_a_hand_written_card_and_adds_our_metadata(pushed: dict) -> None:
    card = ModelCard.load(pushed["storage"] / "tester" / "own-card" / "README.md")
    assert "Hand-written." in card.text and "# My model" in card.text and "Per-layer bits" not in card.text
    data = card.data.to_dict()
    assert data["license"] == "mit" and {"mine", "splitquant", "int3"} <= set(data["tags"])
    assert data["base_model"] == "HuggingFaceTB/SmolLM2-135M" and data["base_model_relation"] == "quantized"


@pytest.mark.slow
def test_save_pretrained_push_to_hub_uploads_our_card(pushed: dict) -> None:
    folder = pushed["storage"] / "tester" / "via-save"
    assert "Per-layer bits" in ModelCard.load(folder / "README.md").text
    assert "transformers_weights" in json.loads((folder / "config.json").read_text())
    reloaded = AutoModelForCausalLM.from_pretrained(folder)
    assert torch.equal(model_output(reloaded, pushed["ref"]["input_ids"]), pushed["ref"]["logits"])


@pytest.mark.slow
def test_cli_quantize_push_to_hub(tmp_path: Path, float_checkpoints: dict[str, str]) -> None:
    with FakeHub(tmp_path / "storage") as server:
        env = hub_env(server, tmp_path / "hf")
        cli = Path(sys.executable).with_name("hf-splitquant")
        result = subprocess.run(
            [str(cli), "quantize", float_checkpoints["gpt2"], "-o", str(tmp_path / "out"), "--bits", "4",
             "--group-size", "16", "--push-to-hub", "tester/cli-gpt2", "--base-model", "openai-community/gpt2"],
            env=env, capture_output=True, text=True, timeout=120,
        )
        assert result.returncode == 0, result.stderr[-3000:]
        assert "tester/cli-gpt2" in result.stdout
    folder = tmp_path / "storage" / "tester" / "cli-gpt2"
    local = tmp_path / "out"
    assert sorted(p.name for p in folder.iterdir()) == sorted(p.name for p in local.iterdir())
    for name in ("model.safetensors", "config.json", "README.md"):
        assert (folder / name).read_bytes() == (local / name).read_bytes()
    card = ModelCard.load(folder / "README.md")
    assert card.data.base_model == "openai-community/gpt2" and "int4" in card.data.tags and "rtn" in card.data.tags
    ids = torch.randint(3, 120, (2, 9), generator=torch.Generator().manual_seed(3))
    assert torch.equal(model_output(AutoModelForCausalLM.from_pretrained(folder), ids),
                       model_output(AutoModelForCausalLM.from_pretrained(local), ids))


# ------------------------------------------------------------------------------------------------
# Cards without a server
# ------------------------------------------------------------------------------------------------


def test_card_template_copies_are_identical() -> None:
    assert hub.template_path().read_bytes() == (REPO_ROOT / "model_cards" / "splitquant_model_card.md").read_bytes()


def test_card_tags_and_mixed_bits() -> None:
    model = quantized_tiny_llama()
    tags = hub.model_card_tags(model)
    assert tags[:2] == ["splitquant", "hf-splitquant"] and "int3" in tags and "int4" not in tags
    rtn = hf_splitquant.quantize(tiny_llama().eval(), hf_splitquant.SplitQuantConfig(bits=2, group_size=32),
                                 progress=False)
    assert {"rtn", "int2"} <= set(hub.model_card_tags(rtn))
    card = hub.build_model_card(rtn, base_model=None)
    assert card.data.base_model is None and card.data.to_dict().get("base_model_relation") is None
    assert "| rtn | 2 | 32 | 14 |" in card.text
    assert "integer zero points" in card.text and "per-cluster" not in card.text
    assert "per-cluster min-max" in hub.build_model_card(model).text


def test_card_parses_and_reports_bits(tmp_path: Path) -> None:
    model = quantized_tiny_llama()
    report = hf_splitquant.quantization_report(model)
    folder = hub.save_with_card(model, tmp_path / "ckpt", base_model="org/base", eval_results=[EVAL, {"accuracy": 0.5}])
    card = ModelCard.load(folder / "README.md")
    assert card.data.base_model == "org/base" and card.data.to_dict()["base_model_relation"] == "quantized"
    assert f"{report.bits_per_weight:.3f} bits per quantized weight" in card.text
    assert "| accuracy | 0.5000 |" in card.text
    assert "safetensors on disk" in card.text
    assert "splitquant" in model.model_tags  # transformers' push_to_hub picks these up
    # the same card from the folder alone (config.json, no weights loaded)
    card2 = hub.build_model_card(folder, base_model="org/base")
    assert card2.data.tags == card.data.tags
    assert f"{report.bits_per_weight:.3f} bits per quantized weight" in card2.text


def test_save_with_card_is_atomic(tmp_path: Path) -> None:
    model = quantized_tiny_llama()
    target = tmp_path / "ckpt"
    target.mkdir()
    (target / "keep.txt").write_text("old")
    with pytest.raises(FileExistsError):
        hub.save_with_card(model, target)
    with pytest.raises(TypeError):  # a bad eval_results entry fails inside the save: nothing changes
        hub.save_with_card(model, target, eval_results=[1], overwrite=True)
    assert [p.name for p in target.iterdir()] == ["keep.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]


def test_card_refuses_float_model() -> None:
    with pytest.raises(ValueError, match="no hf_splitquant packed layers"):
        hub.build_model_card(tiny_llama())


def test_packed_models_get_our_push_to_hub(tmp_path: Path) -> None:
    """``model.push_to_hub`` of a packed model (quantized, or loaded) is hf_splitquant's, taking transformers'
    arguments; float models keep transformers' own."""
    import inspect

    from transformers import PreTrainedModel
    from transformers.utils.hub import PushToHubMixin

    model = quantized_tiny_llama()
    assert model.push_to_hub.__func__ is hub._model_push_to_hub
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert loaded.push_to_hub.__func__ is hub._model_push_to_hub
    assert set(inspect.signature(PushToHubMixin.push_to_hub).parameters) <= set(
        inspect.signature(hub._model_push_to_hub).parameters)
    assert tiny_llama().push_to_hub.__func__ is PreTrainedModel.push_to_hub


def test_rewritten_card_keeps_title_metadata_notes_and_evaluation(tmp_path: Path) -> None:
    """Rewriting a card (evaluate --write-card, a second push) keeps what the old card had."""
    model = quantized_tiny_llama()
    folder = hub.save_with_card(model, tmp_path / "ckpt", base_model="org/base-model", eval_results=EVAL,
                                model_name="My quantized model", notes="Calibrated on nothing.")
    old = hub.read_card(folder / "README.md")
    old.data.license = "mit"
    old.data.tags = [*old.data.tags, "my-tag"]
    old.save(folder / "README.md")
    assert hub.read_card(tmp_path / "missing.md") is None

    card = hub.build_model_card(folder, previous=hub.read_card(folder / "README.md"))  # no base_model given
    data = card.data.to_dict()
    assert data["base_model"] == "org/base-model" and data["base_model_relation"] == "quantized"
    assert data["license"] == "mit" and {"my-tag", "splitquant", "int3"} <= set(data["tags"])
    assert "\n# My quantized model\n" in card.text
    assert "Calibrated on nothing." in card.text
    assert "| perplexity | 12.5000 | 11.2500 |" in card.text  # no new results: the old ones stay
    assert "[org/base-model](https://huggingface.co/org/base-model)" in card.text

    new = {"task": "perplexity", "dataset": "other text", "metrics": {"perplexity": 20.0}}
    card = hub.build_model_card(folder, eval_results=new, previous=hub.read_card(folder / "README.md"))
    assert "| perplexity | 20.0000 |" in card.text and "12.5000" not in card.text  # new results replace them
    assert "# My quantized model" in card.text and card.data.to_dict()["license"] == "mit"

    # a re-quantized model: tags hf_splitquant computes are recomputed, never carried over
    rtn = hf_splitquant.quantize(tiny_llama().eval(), hf_splitquant.SplitQuantConfig(bits=2, group_size=32),
                                 progress=False)
    card = hub.build_model_card(rtn, previous=hub.read_card(folder / "README.md"))
    assert {"int2", "rtn", "my-tag"} <= set(card.data.tags) and "int3" not in card.data.tags


def test_save_with_card_over_a_folder_keeps_its_card(tmp_path: Path) -> None:
    model = quantized_tiny_llama()
    folder = hub.save_with_card(model, tmp_path / "ckpt", base_model="org/base-model", model_name="Kept title")
    hub.save_with_card(model, folder, overwrite=True)
    card = hub.read_card(folder / "README.md")
    assert "# Kept title" in card.text and card.data.base_model == "org/base-model"
    (folder / "README.md").write_text("---\nlicense: apache-2.0\n---\n# Someone's card\n\nTheir words.\n")
    hub.save_with_card(model, folder, overwrite=True)
    card = hub.read_card(folder / "README.md")
    assert "Their words." in card.text and card.data.license == "apache-2.0" and "int3" in card.data.tags
