"""Named presets (recipes): the settings that measured best at each budget, in one word.

``SplitQuantConfig.recipe("w3")`` returns the configuration of the row ``w3`` below; keyword arguments
override single settings (``SplitQuantConfig.recipe("w3", group_size=64)``). Every recipe is backed by a
benchmark row: ``benchmarks/results/calibration_gptq_g128.md`` and ``..._g64.md``
(``benchmarks/bench_calibration.py``), ``rotation.md`` for the rotated ones, ``calibration_sensitivity_3.0.md`` for ``w3-mixed``,
``calibration_mixed.md`` for ``w3-mixed-tuned``,
``benchmarks/results/peers_smollm2.md`` for ``w4-data-free``; the
README's recommendation table gathers them. Recipes with ``rounding`` set
need calibration data: pass ``calibration_data`` to :func:`hf_splitquant.quantize` (or use
``hf_splitquant.calibrate``); the data-free ones work with ``from_pretrained(..., quantization_config=...)``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

__all__ = ["Recipe", "RECIPES", "recipe_settings", "recipe_names"]


@dataclass(frozen=True)
class Recipe:
    """A preset: ``settings`` are ``SplitQuantConfig`` keyword arguments."""

    name: str
    summary: str
    settings: Mapping[str, Any] = field(default_factory=dict)

    @property
    def needs_calibration(self) -> bool:
        return self.settings.get("rounding") is not None


#: GPTQ with the library's defaults: the output-aware clipped grid, damping 1.0, act order, keep_best on the
#: held-out batches. (``target="float"`` measured no better at INT3 g128: 45.86 against 44.98 perplexity.)
_CALIBRATED = {"rounding": "gptq"}

#: Hadamard-rotated inputs (hf_splitquant/quant/rotation.py), for the 3-4 bit recipes: with GPTQ, INT4 g128 26.40 ->
#: 24.80, INT3 g128 44.98 -> 36.76, INT2 g64 352.4 -> 336.4 (benchmarks/results/rotation.md; the one-shot study saw
#: no gain at INT2, the library's sequential calibration a small one)
_ROTATED = {"input_rotation": 64}

#: block-wise tuning of the tuned recipes: 5 epochs over 64+ samples; the training steps' products in bf16 where the
#: hardware has it (INT2 g64 measured 90.66 with bf16 steps against 91.03 in float32, in 24.5 instead of 37 minutes)
_TUNED = {"epochs": 5, "compute_dtype": "auto"}

RECIPES: dict[str, Recipe] = {r.name: r for r in (
    # SmolLM2-135M, 8 x 512 Wikipedia eval tokens, float 22.17, 16 x 512 calibration tokens, 3-7 min each on 2
    # cores: benchmarks/results/rotation.md (rotated: w4 24.80, w3 36.76; unrotated 26.40 / 44.98 in
    # calibration_gptq_g128.md), ..._g64.md (w2: 352.4)
    Recipe("w4", "4-bit codes, groups of 128, rotated inputs, calibrated (about 4.2 bits per weight)",
           {"bits": 4, "group_size": 128, **_ROTATED, **_CALIBRATED}),
    Recipe("w3", "3-bit codes, groups of 128, rotated inputs, calibrated (about 3.2 bits per weight)",
           {"bits": 3, "group_size": 128, **_ROTATED, **_CALIBRATED}),
    # rotated: 352.4 -> 336.4 with the library's sequential GPTQ (benchmarks/results/rotation.md, session 30)
    Recipe("w2", "2-bit codes, groups of 64, rotated inputs, calibrated (about 2.4 bits per weight); expect a clear "
                 "quality loss on small models: train afterwards (QAT) where quality matters",
           {"bits": 2, "group_size": 64, **_ROTATED, **_CALIBRATED}),
    # benchmarks/results/rotation.md (session 29): 23.93 (1.08x float) rotated, with 64 x 512 calibration tokens,
    # 5 epochs, bf16 training steps, 39 min on 2 cores with AVX-512 BF16 (unrotated, session 28: 24.86 in 30 min)
    Recipe("w4-tuned", "4-bit codes, groups of 128, rotated inputs, calibrated, then block-wise tuning against the "
                       "float model (about 4.2 bits per weight; slow: a backward pass of each block per batch and "
                       "epoch; use 64+ calibration samples of 512 tokens)",
           {"bits": 4, "group_size": 128, **_ROTATED, **_CALIBRATED, "block_tuning": _TUNED}),
    # benchmarks/results/rotation.md (session 29): 30.91 (1.39x float) rotated, 64 x 512 calibration tokens, 5 epochs,
    # bf16 steps, 30.5 min on 2 idle cores (unrotated, float32 steps: 34.65 in 60-85 min; GPTQ alone 44.98). The
    # tuning is data-limited: give it 64 or more calibration samples of 512 tokens. With more text fewer epochs pay:
    # 128 x 512 tokens, epochs=3: 30.08 (1.357x, 49 min); 192 x 512, epochs=3: 29.71 (1.340x, 82 min; session 34)
    Recipe("w3-tuned", "3-bit codes, groups of 128, rotated inputs, calibrated, then block-wise tuning against the "
                       "float model (about 3.2 bits per weight; slow: a backward pass of each block per batch and "
                       "epoch; use 64+ calibration samples of 512 tokens)",
           {"bits": 3, "group_size": 128, **_ROTATED, **_CALIBRATED, "block_tuning": _TUNED}),
    # benchmarks/results/calibration_block_tuning.md: 91.03 (4.11x float) with 64 x 512 calibration tokens and 5
    # epochs of the relative loss (16 x 512 tokens, squared error, 20 epochs: 146.7; GPTQ alone 352.4); about
    # 37 min on 2 idle cores in float32, 24.5 min with bf16 steps (90.66). Like w3-tuned it is data-limited: give
    # it 64 or more calibration samples of 512 tokens.
    # rotated (session 30, benchmarks/results/rotation.md): 90.66 -> 82.57 (3.72x float), 43 min beside other jobs
    Recipe("w2-tuned", "2-bit codes, groups of 64, rotated inputs, calibrated, then block-wise tuning against the float model "
                       "(about 2.4 bits per weight; slow: a backward pass of each block per batch and epoch; "
                       "use 64+ calibration samples of 512 tokens)",
           {"bits": 2, "group_size": 64, **_ROTATED, **_CALIBRATED, "block_tuning": _TUNED}),
    # benchmarks/results/calibration_mixed.md: 43.71 at exactly 3.0 bpw rotated, 52.90 unrotated
    # (calibration_sensitivity_3.0.md; data-free MixQuant: 75.02)
    Recipe("w3-mixed", "2/3/4-bit codes per layer from a calibrated sensitivity (Fisher-weighted errors), groups of "
                       "128, rotated inputs, calibrated, exactly 3.0 bits per weight; causal LMs only",
           {"bits": 3, "group_size": 128, "bit_allocation": "sensitivity", "target_bits": 3.0,
            "mixquant_candidates": [2, 3, 4], **_ROTATED, **_CALIBRATED}),
    # benchmarks/results/calibration_mixed.md (session 30): 34.43 (1.55x float) at exactly 3.0 bpw, rotated inputs,
    # 64 x 512 calibration tokens, 5 epochs, bf16 steps, 44 min on 2 cores (the sensitivity pass included)
    Recipe("w3-mixed-tuned", "2/3/4-bit codes per layer from a calibrated sensitivity, groups of 128, rotated "
                             "inputs, calibrated, then block-wise tuning against the float model (exactly 3.0 bits "
                             "per weight; slow: use 64+ calibration samples of 512 tokens); causal LMs only",
           {"bits": 3, "group_size": 128, "bit_allocation": "sensitivity", "target_bits": 3.0,
            "mixquant_candidates": [2, 3, 4], **_ROTATED, **_CALIBRATED, "block_tuning": _TUNED}),
    Recipe("w4-data-free", "4-bit codes, groups of 64, round to nearest: no calibration data, quantizes while "
                           "loading (about 4.4 bits per weight)",
           {"bits": 4, "group_size": 64}),
)}


def recipe_names() -> tuple[str, ...]:
    return tuple(RECIPES)


def recipe_settings(name: str) -> dict[str, Any]:
    """A copy of the settings of recipe ``name`` (``ValueError`` naming the recipes for an unknown one)."""
    if not isinstance(name, str) or name not in RECIPES:
        raise ValueError(f"unknown recipe {name!r}; the recipes are: "
                         + ", ".join(f"{r.name} ({r.summary})" for r in RECIPES.values()))
    settings = dict(RECIPES[name].settings)
    if isinstance(settings.get("mixquant_candidates"), list):
        settings["mixquant_candidates"] = list(settings["mixquant_candidates"])
    for key in ("rounding_options", "block_tuning"):
        if isinstance(settings.get(key), Mapping):
            settings[key] = dict(settings[key])
    return settings
