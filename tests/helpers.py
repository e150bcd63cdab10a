"""Helpers shared by the test modules (tests import this module, never each other).

* tiny real transformers models built from configs (no Hub access): :func:`tiny_bert`,
  :func:`tiny_llama`, :func:`tiny_gpt2`, :func:`model_output`;
* a tiny BERT classifier and a learnable toy dataset for the training tests (R2, QAT, LoRA):
  :func:`small_bert`, :func:`dataset`, and the module-scoped ``one_thread`` fixture (import it
  into a test module to activate it there);
* an offline stand-in for the Hugging Face Hub on 127.0.0.1: :class:`FakeHub`, :func:`hub_env`,
  :func:`run_python`, :func:`quantized_tiny_llama`, :data:`EVAL`;
* :func:`card_number`: how model cards print a metric value.

The fixtures themselves (``float_checkpoints``, ``input_ids``) are in ``conftest.py``.
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
import os
import re
import subprocess
import sys
import textwrap
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest
import torch
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
)

import hf_splitquant

REPO_ROOT = Path(__file__).resolve().parents[1]
TESTS_DIR = Path(__file__).resolve().parent

# --------------------------------------------------------------------------------------------
# Tiny models
# --------------------------------------------------------------------------------------------

VOCAB = 120


def tiny_bert() -> BertForSequenceClassification:
    """A 2-layer BERT classifier (3 labels, hidden 64) with random weights."""
    cfg = BertConfig(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=100, num_labels=3, max_position_embeddings=64)
    return BertForSequenceClassification(cfg)


def tiny_llama() -> LlamaForCausalLM:
    """A 2-layer Llama (GQA, tied embeddings, hidden 64) with random weights."""
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                      max_position_embeddings=64, bos_token_id=0, eos_token_id=1, pad_token_id=2)
    return LlamaForCausalLM(cfg)


def tiny_gpt2() -> GPT2LMHeadModel:
    """A 2-layer GPT-2 (Conv1D layers, hidden 64) with random weights."""
    cfg = GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=64,
                     bos_token_id=0, eos_token_id=1)
    return GPT2LMHeadModel(cfg)


TINY_MODELS = {"bert": tiny_bert, "llama": tiny_llama, "gpt2": tiny_gpt2}


def model_output(model: torch.nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    """The model's logits on ``input_ids`` (no grad)."""
    with torch.no_grad():
        return model(input_ids).logits


def assert_freeze_round_trip(model: torch.nn.Module, ids: torch.Tensor, folder: Path, num_layers: int,
                             auto_class: type) -> torch.Tensor:
    """QAT's last step, checked: ``freeze`` gives a packed model computing the fake-quant outputs, its config
    says ``qat=False`` with ``num_layers`` packed layers, and plain ``auto_class.from_pretrained`` reloads it
    bit for bit. Returns the packed model's logits."""
    from hf_splitquant import PackedLinear, freeze

    model.eval()
    fake = model_output(model, ids)
    freeze(model)
    packed = model_output(model, ids)
    torch.testing.assert_close(packed, fake, rtol=0, atol=1e-5)
    model.save_pretrained(folder)
    saved = json.loads((Path(folder) / "config.json").read_text())["quantization_config"]
    assert saved["qat"] is False and len(saved["layers"]) == num_layers
    reloaded = auto_class.from_pretrained(folder).eval()
    assert sum(isinstance(m, PackedLinear) for m in reloaded.modules()) == num_layers
    assert torch.equal(model_output(reloaded, ids), packed)
    return packed


# --------------------------------------------------------------------------------------------
# Training tests: a small classifier and a learnable toy dataset
# --------------------------------------------------------------------------------------------

TRAIN_VOCAB, TRAIN_SEQ = 60, 8


@pytest.fixture(autouse=True, scope="module")
def one_thread():  # noqa: ANN201
    """Tiny models train several times faster on one thread (and much faster on a busy machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def small_bert(seed: int = 0) -> BertForSequenceClassification:
    """A 1-layer BERT classifier (3 labels, hidden 32, no dropout), seeded."""
    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=TRAIN_VOCAB, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                     intermediate_size=48, num_labels=3, max_position_embeddings=16,
                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return BertForSequenceClassification(cfg)


def dataset(n: int, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """Class ``c`` draws half of its tokens from its own third of the vocabulary: learnable in ~50 steps."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 3, (n,), generator=g)
    own = 3 + labels[:, None] * 19 + torch.randint(0, 19, (n, TRAIN_SEQ), generator=g)
    noise = torch.randint(3, TRAIN_VOCAB, (n, TRAIN_SEQ), generator=g)
    ids = torch.where(torch.rand(n, TRAIN_SEQ, generator=g) < 0.5, noise, own)
    return [{"input_ids": row, "labels": label} for row, label in zip(ids, labels)]


# --------------------------------------------------------------------------------------------
# Model cards
# --------------------------------------------------------------------------------------------


def card_number(value: float) -> str:
    """A metric value as the model card prints it: 4 decimals below 1,000, else 1 decimal with separators."""
    if math.isnan(value) or math.isinf(value):
        return str(value)
    return f"{value:.4f}" if abs(value) < 1000 else f"{value:,.1f}"


# --------------------------------------------------------------------------------------------
# A fake Hub
# --------------------------------------------------------------------------------------------

TOKEN = "hf_fake_token_for_tests"
_REPO = r"(?P<repo>[\w.-]+/[\w.-]+)"


class FakeHub:
    """A minimal Hub on 127.0.0.1 (port chosen by the OS), storing files under ``root/<org>/<name>``."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.requests: list[tuple[str, str, str | None]] = []  # (method, path, Authorization header)
        self.commits: dict[str, list[str]] = {}  # repo -> commit oids
        self._lock = threading.Lock()
        hub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:  # keep pytest output clean
                pass

            def do_POST(self) -> None:
                hub._dispatch(self, "POST")

            def do_GET(self) -> None:
                hub._dispatch(self, "GET")

            def do_HEAD(self) -> None:
                hub._dispatch(self, "HEAD")

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> FakeHub:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=10)

    # -- helpers -------------------------------------------------------------------------------

    def repo_dir(self, repo: str) -> Path:
        return self.root / repo

    @staticmethod
    def _blob_oid(data: bytes) -> str:
        return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()

    def _head_commit(self, repo: str) -> str:
        return (self.commits.get(repo) or ["0" * 40])[-1]

    @staticmethod
    def _reply(handler: BaseHTTPRequestHandler, status: int, body: bytes = b"", headers: dict | None = None,
               head: bool = False) -> None:
        handler.send_response(status)
        for key, value in (headers or {}).items():
            handler.send_header(key, value)
        handler.send_header("Content-Length", str(len(body)))
        handler.end_headers()
        if not head:
            handler.wfile.write(body)

    def _json(self, handler: BaseHTTPRequestHandler, status: int, payload: object, head: bool = False,
              headers: dict | None = None) -> None:
        self._reply(handler, status, json.dumps(payload).encode(),
                    {"Content-Type": "application/json", **(headers or {})}, head)

    def _not_found(self, handler: BaseHTTPRequestHandler, code: str, head: bool) -> None:
        self._json(handler, 404, {"error": code}, head, {"X-Error-Code": code, "X-Error-Message": code})

    # -- routing -------------------------------------------------------------------------------

    def _dispatch(self, handler: BaseHTTPRequestHandler, method: str) -> None:
        path = unquote(urlsplit(handler.path).path)
        length = int(handler.headers.get("Content-Length") or 0)
        body = handler.rfile.read(length) if length else b""
        with self._lock:
            self.requests.append((method, path, handler.headers.get("Authorization")))
            head = method == "HEAD"
            if method == "POST" and path == "/api/repos/create":
                return self._create_repo(handler, json.loads(body))
            if method == "POST" and path == "/api/validate-yaml":
                return self._json(handler, 200, {"errors": [], "warnings": []})
            match = re.fullmatch(rf"/api/models/{_REPO}/preupload/(?P<rev>[^/]+)", path)
            if method == "POST" and match:
                return self._preupload(handler, match["repo"], json.loads(body))
            match = re.fullmatch(rf"/api/models/{_REPO}/commit/(?P<rev>[^/]+)", path)
            if method == "POST" and match:
                return self._commit(handler, match["repo"], body)
            match = re.fullmatch(rf"/api/models/{_REPO}(?:/revision/(?P<rev>[^/]+))?", path)
            if method in ("GET", "HEAD") and match:
                return self._repo_info(handler, match["repo"], head)
            match = re.fullmatch(rf"/{_REPO}/resolve/(?P<rev>[^/]+)/(?P<file>.+)", path)
            if method in ("GET", "HEAD") and match:
                return self._resolve(handler, match["repo"], match["file"], head)
            return self._json(handler, 404, {"error": f"fake hub: no route for {method} {path}"}, head)

    def _create_repo(self, handler: BaseHTTPRequestHandler, payload: dict) -> None:
        repo = f"{payload['organization']}/{payload['name']}"
        if self.repo_dir(repo).exists():
            return self._json(handler, 409, {"error": "You already created this model repo", "url": f"{self.url}/{repo}"})
        self.repo_dir(repo).mkdir(parents=True)
        self.commits[repo] = []
        return self._json(handler, 200, {"url": f"{self.url}/{repo}", "name": repo})

    def _preupload(self, handler: BaseHTTPRequestHandler, repo: str, payload: dict) -> None:
        if not self.repo_dir(repo).is_dir():
            return self._not_found(handler, "RepoNotFound", False)
        files = []
        for item in payload["files"]:
            stored = self.repo_dir(repo) / item["path"]
            oid = self._blob_oid(stored.read_bytes()) if stored.is_file() else None
            files.append({"path": item["path"], "uploadMode": "regular", "shouldIgnore": False, "oid": oid})
        return self._json(handler, 200, {"files": files, "commitOid": self._head_commit(repo)})

    def _commit(self, handler: BaseHTTPRequestHandler, repo: str, body: bytes) -> None:
        if not self.repo_dir(repo).is_dir():
            return self._not_found(handler, "RepoNotFound", False)
        lines = [json.loads(line) for line in body.splitlines() if line.strip()]
        if not lines or lines[0]["key"] != "header":
            return self._json(handler, 400, {"error": "commit must start with a header line"})
        for line in lines[1:]:
            if line["key"] != "file" or line["value"].get("encoding") != "base64":
                return self._json(handler, 400, {"error": f"fake hub accepts only base64 files, got {line['key']}"})
            target = self.repo_dir(repo) / line["value"]["path"]
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(base64.b64decode(line["value"]["content"]))
        oid = hashlib.sha1(body + str(len(self.commits[repo])).encode()).hexdigest()
        self.commits[repo].append(oid)
        return self._json(handler, 200, {"commitUrl": f"{self.url}/{repo}/commit/{oid}", "commitOid": oid,
                                         "success": True})

    def _repo_info(self, handler: BaseHTTPRequestHandler, repo: str, head: bool) -> None:
        folder = self.repo_dir(repo)
        if not folder.is_dir():
            return self._not_found(handler, "RepoNotFound", head)
        siblings = [{"rfilename": p.relative_to(folder).as_posix()} for p in sorted(folder.rglob("*")) if p.is_file()]
        return self._json(handler, 200, {"id": repo, "modelId": repo, "sha": self._head_commit(repo),
                                         "private": False, "siblings": siblings, "tags": []}, head)

    def _resolve(self, handler: BaseHTTPRequestHandler, repo: str, file: str, head: bool) -> None:
        folder = self.repo_dir(repo)
        if not folder.is_dir():
            return self._not_found(handler, "RepoNotFound", head)
        target = folder / file
        if not target.is_file():
            return self._not_found(handler, "EntryNotFound", head)
        data = target.read_bytes()
        headers = {"ETag": f'"{self._blob_oid(data)}"', "X-Repo-Commit": self._head_commit(repo),
                   "Content-Type": "application/octet-stream"}
        return self._reply(handler, 200, data, headers, head)


def hub_env(hub_server: FakeHub, home: Path) -> dict[str, str]:
    """Environment of a subprocess that talks to ``hub_server`` instead of huggingface.co."""
    env = {k: v for k, v in os.environ.items() if not k.upper().endswith("_PROXY")}
    env.update({
        "HF_ENDPOINT": hub_server.url, "HF_TOKEN": TOKEN, "HF_HUB_OFFLINE": "0", "HF_HOME": str(home),
        "HF_HUB_DISABLE_TELEMETRY": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1", "NO_PROXY": "127.0.0.1,localhost",
        "TOKENIZERS_PARALLELISM": "false",
        # the tests folder first (subprocesses import helpers), then what this process was given
        "PYTHONPATH": os.pathsep.join(p for p in (str(TESTS_DIR), os.environ.get("PYTHONPATH", "")) if p),
    })
    return env


def run_python(code: str, env: dict[str, str], cwd: Path, timeout: int = 120) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env, cwd=cwd, capture_output=True,
                            text=True, timeout=timeout)
    assert result.returncode == 0, f"subprocess failed:\n{result.stdout}\n{result.stderr[-4000:]}"
    return result


def quantized_tiny_llama() -> torch.nn.Module:
    torch.manual_seed(0)
    model = tiny_llama().eval()
    return hf_splitquant.quantize(model, hf_splitquant.SplitQuantConfig(bits=3, group_size=16, transform="splitquant"),
                                  progress=False)


EVAL = {"task": "perplexity", "dataset": "a test text", "metrics": {"perplexity": 12.5, "top1_agreement": 0.75},
        "reference_metrics": {"perplexity": 11.25}}


def rewrite_safetensors(path: Path, edit) -> None:  # noqa: ANN001
    """Let ``edit(tensors, metadata)`` change a safetensors file (or a folder's ``model.safetensors``),
    then write it back: how the hostile-input tests corrupt checkpoints."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    file = path / "model.safetensors" if path.is_dir() else path
    with safe_open(file, "pt") as handle:
        metadata = dict(handle.metadata())
    tensors = load_file(file)
    edit(tensors, metadata)
    save_file(tensors, file, metadata=metadata)


def edit_quantization_config(folder: Path, edit) -> None:  # noqa: ANN001
    """Let ``edit(quantization_config)`` change a checkpoint's ``config.json`` in place."""
    import json

    path = folder / "config.json"
    data = json.loads(path.read_text())
    edit(data["quantization_config"])
    path.write_text(json.dumps(data))


def load_causal_lm(folder: Path) -> torch.nn.Module:
    """Plain ``AutoModelForCausalLM.from_pretrained`` (the call a user makes)."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder)
