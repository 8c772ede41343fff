"""Which backend a run uses: ``model.backend`` to a Backend instance.

Its own module because the Higgs backend subclasses :class:`ckptguard.train.backends.Backend`:
choosing it here keeps the import picture one way (registry -> backends, registry -> higgs -> backends).
"""

from __future__ import annotations

from ckptguard.train.backends import Backend, HFCausalLMBackend, TinyLlamaBackend
from ckptguard.train.config import ConfigError, ModelConfig


def build_backend(cfg: ModelConfig) -> Backend:
    """The backend named by ``model.backend`` (the config has already checked the name).

    The Higgs backend is imported only when chosen: it needs its own environment (transformers 4.46).
    """
    built_in = {cls.name: cls for cls in (TinyLlamaBackend, HFCausalLMBackend)}
    if cfg.backend in built_in:
        return built_in[cfg.backend](cfg)
    try:
        from ckptguard.train.higgs.backend import HiggsAudioBackend
    except ImportError as exc:
        raise ConfigError(
            f"model.backend: higgs-audio needs boson-multimodal and transformers 4.46 ({exc}); "
            "set up its environment with `make .venv-higgs/.installed` and run the trainer from there"
        ) from None
    return HiggsAudioBackend(cfg)
