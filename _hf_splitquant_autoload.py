"""Let an installed hf_splitquant load packed checkpoints without ``import hf_splitquant``.

Installed with the package (``hf_splitquant_autoload.pth`` in site-packages runs :func:`install` at
interpreter start). It imports nothing but ``sys`` and ``os`` (already loaded at that point) and
adds one finder to ``sys.meta_path`` that waits for ``transformers.quantizers.auto``, transformers'
registry of quantization methods. When that module has run, the finder adds two placeholders under
the ``"splitquant"`` name and removes itself. Only when transformers meets a ``splitquant``
``quantization_config`` (``from_pretrained`` of a packed checkpoint) does a placeholder import
hf_splitquant, whose import registers the real config and quantizer; a process that never loads
such a checkpoint never imports hf_splitquant (nor torch, unless it imports transformers itself).

``HF_SPLITQUANT_NO_AUTOLOAD=1`` turns the hook off (then ``import hf_splitquant`` is needed, as
without this file). Nothing here may raise into an import of transformers: on any surprise (a
transformers without the registry) the hook stays out of the way.
"""

import os  # no `from __future__` import: it would add a module import to every interpreter start
import sys

TARGET = "transformers.quantizers.auto"
QUANT_METHOD = "splitquant"
DISABLE_ENV = "HF_SPLITQUANT_NO_AUTOLOAD"


def _real_classes() -> tuple[type, type]:
    """Import hf_splitquant (which registers itself with transformers) and return its config and quantizer."""
    try:
        import hf_splitquant
        from hf_splitquant.integrations.transformers import SplitQuantHfQuantizer
    except Exception as err:
        raise ImportError(
            f"this model's quantization_config uses quant_method {QUANT_METHOD!r} (hf_splitquant), and "
            f"hf_splitquant is installed but could not be imported ({type(err).__name__}: {err}); fix that "
            "installation (pip install -U hf-splitquant)"
        ) from err
    return hf_splitquant.SplitQuantConfig, SplitQuantHfQuantizer


def _add_placeholders(auto: object) -> None:
    """Register placeholders for ``"splitquant"`` in transformers' two quantization registries."""
    configs = getattr(auto, "AUTO_QUANTIZATION_CONFIG_MAPPING", None)
    quantizers = getattr(auto, "AUTO_QUANTIZER_MAPPING", None)
    if not isinstance(configs, dict) or not isinstance(quantizers, dict) or QUANT_METHOD in configs:
        return  # another transformers layout, or hf_splitquant registered already
    from transformers.quantizers.base import HfQuantizer
    from transformers.utils.quantization_config import QuantizationConfigMixin

    class SplitQuantConfigPlaceholder(QuantizationConfigMixin):
        """Stands for ``hf_splitquant.SplitQuantConfig`` until hf_splitquant is imported."""

        @classmethod
        def from_dict(cls, config_dict, return_unused_kwargs=False, **kwargs):  # noqa: ANN001, ANN003, ANN206
            config_cls, _ = _real_classes()
            return config_cls.from_dict(config_dict, return_unused_kwargs=return_unused_kwargs, **kwargs)

    class SplitQuantQuantizerPlaceholder(HfQuantizer):
        """Stands for hf_splitquant's quantizer until hf_splitquant is imported."""

        def __new__(cls, quantization_config, **kwargs):  # noqa: ANN001, ANN003, ANN204
            _, quantizer_cls = _real_classes()
            return quantizer_cls(quantization_config, **kwargs)

    configs[QUANT_METHOD] = SplitQuantConfigPlaceholder
    quantizers[QUANT_METHOD] = SplitQuantQuantizerPlaceholder


class _RegisteringLoader:
    """Runs the real loader of the registry module, then adds the placeholders."""

    def __init__(self, loader: object) -> None:
        self._loader = loader

    def create_module(self, spec):  # noqa: ANN001, ANN201
        return self._loader.create_module(spec)

    def exec_module(self, module) -> None:  # noqa: ANN001
        self._loader.exec_module(module)
        _uninstall()
        try:  # noqa: SIM105 - contextlib is not loaded at interpreter start; keep it that way
            _add_placeholders(module)
        except Exception:  # never break the import of transformers
            pass

    def __getattr__(self, name: str):  # noqa: ANN204 - get_source, get_filename, is_package ...
        return getattr(self._loader, name)


class AutoloadFinder:
    """``sys.meta_path`` entry that only answers for :data:`TARGET`, by wrapping the real loader."""

    def find_spec(self, fullname: str, path=None, target=None):  # noqa: ANN001, ANN201
        if fullname != TARGET:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                break
        else:
            return None
        if spec.loader is not None and hasattr(spec.loader, "exec_module"):
            spec.loader = _RegisteringLoader(spec.loader)
        return spec


def _uninstall() -> None:
    sys.meta_path[:] = [f for f in sys.meta_path if not isinstance(f, AutoloadFinder)]


def install() -> None:
    """Add the finder (once), unless ``HF_SPLITQUANT_NO_AUTOLOAD`` is set to a non-empty value other than 0."""
    if os.environ.get(DISABLE_ENV, "") not in ("", "0"):
        return
    module = sys.modules.get(TARGET)
    if module is not None:  # transformers' registry already loaded: register right away
        try:  # noqa: SIM105
            _add_placeholders(module)
        except Exception:
            pass
        return
    if not any(isinstance(f, AutoloadFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, AutoloadFinder())
