"""A packed checkpoint met by a Python that did not ``import hf_splitquant`` (issue: "a user's first hour").

transformers alone loads the float architecture, finds the packed tensors and, told to
``ignore_mismatched_sizes=True`` (its own advice), returned random weights for every quantized layer.
Now:

* **not installed**: ``config.json`` carries a guard (``transformers_weights``) that makes
  ``from_pretrained`` fail before any weight is read, whatever the flags, with a message naming
  hf_splitquant and the fix. Simulated honestly in a subprocess: ``import hf_splitquant`` is made to
  fail (``sys.modules["hf_splitquant"] = None``) and the import hook is off, so no code of ours runs;
* **installed, not imported**: the ``.pth`` hook installed with the package registers ``"splitquant"``
  when transformers' quantizer registry is imported; the load works, bit-exact, without any import.
  The hook comes from a wheel built from this tree (its ``.pth`` and module, unpacked into a folder
  that ``site.addsitedir`` processes exactly as Python's startup processes site-packages);
* **installed and imported**: as before, with or without ``ignore_mismatched_sizes``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest
import torch
from helpers import REPO_ROOT, TESTS_DIR, model_output, quantized_tiny_llama, tiny_llama
from transformers import AutoModelForCausalLM

import hf_splitquant
from hf_splitquant.saving import PACKED_MARKER, PACKED_MARKER_KEY, clear_packed_marker, mark_packed_config

DATA = TESTS_DIR / "data"
PTH = "hf_splitquant_autoload.pth"
HOOK = "_hf_splitquant_autoload"

CHILD = """
import json, sys
mode, folder, flags, site_dir = sys.argv[1], sys.argv[2], sys.argv[3].split(","), sys.argv[4]
if mode == "absent":
    sys.modules["hf_splitquant"] = None  # `import hf_splitquant` raises: the package is not there
    sys.modules["_hf_splitquant_autoload"] = None
elif site_dir:
    import site
    site.addsitedir(site_dir)  # what interpreter start does with site-packages: runs its .pth files
at_start = sorted(m for m in ("torch", "transformers", "hf_splitquant") if m in sys.modules)
if mode == "imported":
    import hf_splitquant
import torch
from transformers import AutoModelForCausalLM
results = []
for flag in flags:  # each load in turn; only the first one can show what happens before any import
    out = {"imported_before_load": "hf_splitquant" in sys.modules}
    try:
        model = AutoModelForCausalLM.from_pretrained(folder, ignore_mismatched_sizes=flag == "1").eval()
    except Exception as err:
        out["error"] = f"{type(err).__name__}: {err}"
    else:
        ids = torch.load(folder + "/../ids.pt")
        with torch.no_grad():
            out["logits"] = model(input_ids=ids).logits.tolist()
        out["layer"] = type(model.model.layers[0].self_attn.q_proj).__name__
        out["marker_left"] = hasattr(model.config, "transformers_weights")
    out["imported_after"] = "hf_splitquant" in sys.modules
    results.append(out)
print("RESULT " + json.dumps({"at_start": at_start, "loads": results}))
"""


def _run(mode: str, folder: Path, ignore: tuple[bool, ...], site_dir: Path | None = None) -> tuple[list, list]:
    """Load ``folder`` in a fresh Python once per ``ignore_mismatched_sizes`` value; returns the modules
    imported at start and one result per load."""
    env = {k: v for k, v in os.environ.items() if k != "HF_SPLITQUANT_NO_AUTOLOAD"}
    env.update(HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    if mode == "absent":
        env["HF_SPLITQUANT_NO_AUTOLOAD"] = "1"  # also off should the venv itself have the hook installed
    flags = ",".join("1" if flag else "0" for flag in ignore)
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(CHILD), mode, str(folder), flags,
                             str(site_dir or "")], env=env, cwd=folder.parent, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    line = next(x for x in result.stdout.splitlines() if x.startswith("RESULT "))
    out = json.loads(line[len("RESULT "):])
    return out["at_start"], out["loads"]


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A wheel and an editable wheel built from this tree by the package's build backend (setuptools)."""
    src = tmp_path_factory.mktemp("src")
    out = tmp_path_factory.mktemp("wheels")
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for name in ("pyproject.toml", "setup.py", "README.md", PTH, f"{HOOK}.py"):
        shutil.copy2(REPO_ROOT / name, src / name)
    for name in ("hf_splitquant", "optimum"):
        shutil.copytree(REPO_ROOT / name, src / name, ignore=ignore)
    for hook in ("build_wheel", "build_editable"):  # one process each, as pip runs them
        code = f"import sys; from setuptools import build_meta; build_meta.{hook}(sys.argv[1])"
        result = subprocess.run([sys.executable, "-c", code, str(out)], cwd=src, capture_output=True, text=True,
                                timeout=300)
        assert result.returncode == 0, result.stderr[-3000:]
    wheels = sorted(out.glob("*.whl"))
    return {"wheel": next(w for w in wheels if ".editable" not in w.name),
            "editable": next(w for w in wheels if ".editable" in w.name)}


@pytest.fixture(scope="module")
def hook_site(built: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The hook's two files as installing the wheel puts them at the root of site-packages."""
    site_dir = tmp_path_factory.mktemp("site-packages")
    with zipfile.ZipFile(built["wheel"]) as wheel:
        for name in (PTH, f"{HOOK}.py"):
            wheel.extract(name, site_dir)
    return site_dir


@pytest.fixture(scope="module")
def packed(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("packed")
    model = quantized_tiny_llama()
    model.save_pretrained(root / "model")
    ids = torch.randint(3, 120, (2, 9), generator=torch.Generator().manual_seed(3))
    torch.save(ids, root / "ids.pt")
    return {"folder": root / "model", "logits": model_output(model, ids)}


# --------------------------------------------------------------------------------------------
# In process (fast)
# --------------------------------------------------------------------------------------------


def test_save_writes_the_guard_and_reload_removes_it(tmp_path: Path) -> None:
    model = quantized_tiny_llama()
    model.save_pretrained(tmp_path)
    raw = json.loads((tmp_path / "config.json").read_text())
    assert raw[PACKED_MARKER_KEY] == PACKED_MARKER
    assert "hf_splitquant" in PACKED_MARKER and "pip install" in PACKED_MARKER
    assert not PACKED_MARKER.endswith((".safetensors", ".safetensors.index.json"))  # transformers refuses it
    again = AutoModelForCausalLM.from_pretrained(tmp_path, ignore_mismatched_sizes=True)
    assert not hasattr(again.config, PACKED_MARKER_KEY)
    again.save_pretrained(tmp_path / "again")  # written again, in transformers' own JSON layout
    assert (tmp_path / "again" / "config.json").read_bytes() == (tmp_path / "config.json").read_bytes()


def test_guard_only_on_packed_checkpoints(tmp_path: Path) -> None:
    qat = hf_splitquant.prepare_qat(tiny_llama(), hf_splitquant.SplitQuantConfig(bits=4))
    qat.save_pretrained(tmp_path / "qat")  # float weights: transformers alone loads them correctly
    assert PACKED_MARKER_KEY not in json.loads((tmp_path / "qat" / "config.json").read_text())
    tiny_llama().save_pretrained(tmp_path / "float")
    assert not mark_packed_config(tmp_path / "float")

    class Config:
        transformers_weights = "weights/model.safetensors"  # a user's own value is kept

    config = Config()
    assert not clear_packed_marker(config) and config.transformers_weights == "weights/model.safetensors"


def test_hook_placeholders_resolve_to_the_real_classes() -> None:
    """The placeholders the hook registers turn into hf_splitquant's config and quantizer when used."""
    sys.path.insert(0, str(REPO_ROOT))
    try:
        import _hf_splitquant_autoload as hook
    finally:
        sys.path.remove(str(REPO_ROOT))

    class Registry:
        AUTO_QUANTIZATION_CONFIG_MAPPING: dict = {}
        AUTO_QUANTIZER_MAPPING: dict = {}

    hook._add_placeholders(Registry)
    placeholder = Registry.AUTO_QUANTIZATION_CONFIG_MAPPING["splitquant"]
    config = placeholder.from_dict(hf_splitquant.SplitQuantConfig(bits=3).to_dict())
    assert type(config) is hf_splitquant.SplitQuantConfig and config.bits == 3
    quantizer = Registry.AUTO_QUANTIZER_MAPPING["splitquant"](config, pre_quantized=True)
    assert type(quantizer).__name__ == "SplitQuantHfQuantizer" and quantizer.pre_quantized


def test_hook_can_be_turned_off(monkeypatch: pytest.MonkeyPatch) -> None:
    sys.path.insert(0, str(REPO_ROOT))
    try:
        import _hf_splitquant_autoload as hook
    finally:
        sys.path.remove(str(REPO_ROOT))
    monkeypatch.setattr(sys, "meta_path", list(sys.meta_path))
    monkeypatch.delitem(sys.modules, hook.TARGET)  # not imported yet, as at interpreter start
    monkeypatch.setenv("HF_SPLITQUANT_NO_AUTOLOAD", "1")
    hook.install()
    assert not any(isinstance(f, hook.AutoloadFinder) for f in sys.meta_path)
    monkeypatch.setenv("HF_SPLITQUANT_NO_AUTOLOAD", "0")
    hook.install()
    hook.install()
    assert sum(isinstance(f, hook.AutoloadFinder) for f in sys.meta_path) == 1


# --------------------------------------------------------------------------------------------
# The packages built from this tree
# --------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_wheel_and_editable_wheel_install_the_hook(built: dict[str, Path]) -> None:
    for kind in ("wheel", "editable"):
        with zipfile.ZipFile(built[kind]) as wheel:
            names = set(wheel.namelist())
            assert PTH in names, f"{kind}: {sorted(n for n in names if '/' not in n)}"  # root of site-packages
            line = wheel.read(PTH).decode().strip()
        assert line == f"import {HOOK}; {HOOK}.install()"
    with zipfile.ZipFile(built["wheel"]) as wheel:
        assert f"{HOOK}.py" in wheel.namelist()
    with zipfile.ZipFile(built["editable"]) as wheel:  # the editable finder maps the hook module to the source
        finder = next(n for n in wheel.namelist() if n.endswith("_finder.py"))
        assert HOOK in wheel.read(finder).decode()


# --------------------------------------------------------------------------------------------
# Subprocesses: what a fresh Python does
# --------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_not_installed_fails_with_the_fix_even_with_ignore_mismatched_sizes(packed: dict) -> None:
    _, loads = _run("absent", packed["folder"], (False, True))
    for out in loads:
        assert "logits" not in out, "a model was returned without hf_splitquant"
        assert "hf_splitquant" in out["error"] and "pip install -U hf-splitquant" in out["error"], out["error"]
        assert "import hf_splitquant" in out["error"]


@pytest.mark.slow
@pytest.mark.parametrize("ignore", [False, True], ids=["plain", "ignore_mismatched_sizes"])
def test_installed_not_imported_loads_bit_exact(packed: dict, hook_site: Path, ignore: bool) -> None:
    at_start, (out,) = _run("installed", packed["folder"], (ignore,), hook_site)
    assert at_start == []  # the hook imports neither torch nor transformers nor hf_splitquant
    assert out["imported_before_load"] is False and out["imported_after"] is True
    assert "error" not in out, out.get("error")
    assert out["layer"] == "PackedLinear" and out["marker_left"] is False
    assert torch.equal(torch.tensor(out["logits"]), packed["logits"])


@pytest.mark.slow
def test_installed_not_imported_loads_a_checkpoint_without_the_guard(hook_site: Path, tmp_path: Path) -> None:
    """Checkpoints written before the guard existed (the version 1 fixture) load through the hook too."""
    from safetensors.torch import load_file

    folder = tmp_path / "v1"
    shutil.copytree(DATA / "ocs_format_v1", folder)
    assert PACKED_MARKER_KEY not in json.loads((folder / "config.json").read_text())
    torch.save(load_file(folder / "expected_logits.safetensors")["input_ids"], tmp_path / "ids.pt")
    _, (out,) = _run("installed", folder, (False,), hook_site)
    assert "error" not in out, out.get("error")
    assert out["layer"] == "PackedLinear" and out["imported_before_load"] is False


@pytest.mark.slow
def test_imported_loads_bit_exact_with_and_without_ignore_mismatched_sizes(packed: dict) -> None:
    _, loads = _run("imported", packed["folder"], (False, True))
    for out in loads:
        assert "error" not in out, out.get("error")
        assert torch.equal(torch.tensor(out["logits"]), packed["logits"])
