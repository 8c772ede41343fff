"""The run config: parsed once from TOML into frozen dataclasses, validated, and never looked up by string.

Every key and its default lives in ``configs/default.toml``; a user file overrides some keys and
``--set section.key=value`` overrides one more. A key that is not in the default is an error (a typo
must not silently train with the default), and so is a value of the wrong type or out of range:
the message names the field, what it got, and what is allowed.

>>> cfg = load_config(None, ["train.max_steps=20"])
>>> cfg.train.max_steps
20
"""

from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: the same parser, as a package
    import tomli as tomllib  # type: ignore[no-redef]

from ckptguard.errors import InvalidURLError
from ckptguard.format.manifest import MAX_JSON_DEPTH, ManifestError, check_depth
from ckptguard.s3.objectstore import RemoteURL

DEFAULT_CONFIG = "default.toml"


class ConfigError(ValueError):
    """The config is invalid; the message names the field and the allowed values."""


@dataclass(frozen=True)
class ModelConfig:
    backend: str
    path: str
    init_seed: int
    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int
    dtype: str


@dataclass(frozen=True)
class LoraConfig:
    r: int
    alpha: float
    dropout: float
    target_modules: tuple[str, ...]


@dataclass(frozen=True)
class DataConfig:
    train: str
    eval: str
    eval_fraction: float
    seq_len: int
    packing: bool
    seed: int
    chat_template: str


@dataclass(frozen=True)
class OptimConfig:
    lr: float
    weight_decay: float
    beta1: float
    beta2: float
    warmup_steps: int
    min_lr_ratio: float
    max_grad_norm: float


@dataclass(frozen=True)
class TrainConfig:
    max_steps: int
    batch_size: int
    grad_accum: int
    seed: int
    eval_every: int
    eval_batches: int
    log_every: int
    precision: str
    device: str
    progress_bar: bool
    on_nonfinite: str
    strategy: str


@dataclass(frozen=True)
class CheckpointConfig:
    output_dir: str
    save_every: int
    keep_last: int
    keep_best: int
    metric: str
    mode: str
    verify: str
    async_save: bool
    timeout_s: float
    remote: str
    remote_keep_last: int
    remote_mode: str
    local_dir: str

    def storage_options(self) -> dict[str, str] | None:
        """CheckpointManager's storage_options for a run on object storage; None for a local run."""
        if not (self.output_dir.startswith("s3://") or self.remote):
            return None
        return {"mode": self.remote_mode, **({"local_dir": self.local_dir} if self.local_dir else {})}


@dataclass(frozen=True)
class RunConfig:
    model: ModelConfig
    lora: LoraConfig
    data: DataConfig
    optim: OptimConfig
    train: TrainConfig
    checkpoint: CheckpointConfig

    def to_dict(self) -> dict[str, dict[str, Any]]:
        """Plain JSON-able values (tuples become lists), as stored in every checkpoint."""
        return {
            f.name: {
                k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(getattr(self, f.name)).items()
            }
            for f in dataclasses.fields(self)
        }


# The model families the trainer knows; each backend class carries its own name (train/backends.py).
BACKENDS = ("tiny-llama", "hf-causal-lm", "higgs-audio")

# Fields whose values are a closed set.
_CHOICES: dict[str, tuple[str, ...]] = {
    "model.backend": BACKENDS,
    "model.dtype": ("float32", "bfloat16"),
    "train.precision": ("auto", "fp32", "bf16"),
    "train.device": ("auto", "cpu", "cuda"),
    "train.on_nonfinite": ("stop", "skip"),
    "train.strategy": ("ddp", "fsdp"),
    "checkpoint.mode": ("min", "max"),
    "checkpoint.verify": ("quick", "full", "deep"),
    "checkpoint.remote_mode": ("tiered", "direct"),
}
# Numeric fields with a lower bound (inclusive) and, for fractions, an upper one.
_RANGES: dict[str, tuple[float, float | None]] = {
    "model.hidden_size": (1, None),
    "model.num_layers": (1, None),
    "model.num_heads": (1, None),
    "model.intermediate_size": (1, None),
    "lora.r": (1, None),
    "lora.alpha": (0, None),
    "lora.dropout": (0, 0.999),
    "data.eval_fraction": (0, 0.5),
    "data.seq_len": (2, None),
    "optim.lr": (0, None),
    "optim.weight_decay": (0, None),
    "optim.beta1": (0, 0.999999),
    "optim.beta2": (0, 0.999999),
    "optim.warmup_steps": (0, None),
    "optim.min_lr_ratio": (0, 1),
    "optim.max_grad_norm": (0, None),
    "train.max_steps": (1, None),
    "train.batch_size": (1, None),
    "train.grad_accum": (1, None),
    "train.eval_every": (1, None),
    "train.eval_batches": (1, None),
    "train.log_every": (1, None),
    "checkpoint.save_every": (1, None),
    "checkpoint.keep_last": (0, None),
    "checkpoint.keep_best": (0, None),
    "checkpoint.remote_keep_last": (0, None),
    "checkpoint.timeout_s": (1, None),
}
# Numbers that may not be 0: LoRA's output is scaled by alpha and each update by lr, so 0 trains nothing.
_NOT_ZERO = ("lora.alpha", "optim.lr")


def load_config(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    """Default config, then the file at `path` (if any), then each ``section.key=value`` override."""
    raw = _default_raw()
    allowed = {section: set(values) for section, values in raw.items()}
    if path is not None:
        source = str(path)
        try:
            text = Path(path).read_text(encoding="utf-8")
        except OSError as exc:
            raise ConfigError(f"cannot read config file {source}: {exc.strerror}") from None
        _merge(raw, _read_toml(text, source), allowed, source)
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or "." not in key:
            raise ConfigError(f"--set {item!r}: expected section.key=value, e.g. --set train.max_steps=100")
        section, _, name = key.strip().partition(".")
        _merge(raw, {section: {name: _parse_value(value.strip())}}, allowed, f"--set {key.strip()}")
    return _build(raw)


def config_from_dict(saved: dict[str, Any], source: str) -> RunConfig:
    """Rebuild a RunConfig from :meth:`RunConfig.to_dict` output (a checkpoint's config), validated again."""
    raw = _default_raw()
    _merge(raw, saved, {section: set(values) for section, values in raw.items()}, source)
    return _build(raw)


def _default_raw() -> dict[str, Any]:
    text = resources.files("ckptguard.train").joinpath(f"configs/{DEFAULT_CONFIG}").read_text(encoding="utf-8")
    return _read_toml(text, DEFAULT_CONFIG)


def _read_toml(text: str, source: str) -> dict[str, Any]:
    try:
        return _bounded_toml(text, source)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{source} is not valid TOML: {exc}") from None


def _bounded_toml(text: str, source: str) -> dict[str, Any]:
    """tomllib recurses per nested array or inline table: cap the depth as the JSON reader does."""
    too_deep = ConfigError(
        f"{source}: a value nests deeper than {MAX_JSON_DEPTH} levels; no setting takes more than one list"
    )
    try:
        doc = tomllib.loads(text)
        check_depth(doc, source)
    except (RecursionError, ManifestError):
        raise too_deep from None
    return doc


def _parse_value(text: str) -> Any:
    """A --set value is a TOML value (100, 0.5, true, ["a", "b"], "x"); anything else is a bare string."""
    try:
        return _bounded_toml(f"v = {text}", "--set")["v"]
    except tomllib.TOMLDecodeError:
        return text


def _merge(raw: dict[str, Any], update: dict[str, Any], allowed: dict[str, set[str]], source: str) -> None:
    for section, values in update.items():
        if section not in allowed:
            raise ConfigError(f"{source}: unknown section [{section}]; allowed sections: {', '.join(sorted(allowed))}")
        if not isinstance(values, dict):
            raise ConfigError(f"{source}: [{section}] must be a table of keys, got {values!r}")
        for key, value in values.items():
            if key not in allowed[section]:
                raise ConfigError(
                    f"{source}: unknown key {section}.{key}; allowed keys in [{section}]: "
                    f"{', '.join(sorted(allowed[section]))}"
                )
            raw[section][key] = value


def _build(raw: dict[str, Any]) -> RunConfig:
    sections = {}
    for field in dataclasses.fields(RunConfig):
        cls = typing.get_type_hints(RunConfig)[field.name]
        hints = typing.get_type_hints(cls)
        values = {name: _check(f"{field.name}.{name}", raw[field.name][name], hint) for name, hint in hints.items()}
        sections[field.name] = cls(**values)
    cfg = RunConfig(**sections)
    _check_combinations(cfg)
    return cfg


def _check(name: str, value: Any, hint: Any) -> Any:
    """Type, choice and range check of one field; returns the value in its field type."""
    expected = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}.get(hint)
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if hint == tuple[str, ...]:
        if not isinstance(value, list) or not value or not all(isinstance(v, str) and v for v in value):
            raise ConfigError(f"{name}: expected a non-empty list of strings, got {value!r}")
        return tuple(value)
    if type(value) is not hint:
        raise ConfigError(f"{name}: expected {expected}, got {value!r}")
    if hint is float and not math.isfinite(value):
        raise ConfigError(f"{name}: expected a finite number, got {value!r}")
    if name in _NOT_ZERO and value == 0:
        raise ConfigError(f"{name}: expected a value > 0, got {value!r}; with 0 training changes nothing")
    if name in _CHOICES and value not in _CHOICES[name]:
        allowed = ", ".join(repr(c) for c in _CHOICES[name])
        raise ConfigError(f"{name}: expected one of {allowed}, got {value!r}")
    if name in _RANGES:
        low, high = _RANGES[name]
        if value < low or (high is not None and value > high):
            bound = f">= {low:g}" if high is None else f"between {low:g} and {high:g}"
            raise ConfigError(f"{name}: expected a value {bound}, got {value!r}")
    return value


def _check_combinations(cfg: RunConfig) -> None:
    if cfg.model.backend == "hf-causal-lm" and not cfg.model.path:
        raise ConfigError(
            "model.path: the hf-causal-lm backend needs the local directory of a Hugging Face causal LM "
            "(config, weights and tokenizer), e.g. --set model.path=/models/llama"
        )
    if cfg.model.backend == "tiny-llama" and cfg.model.hidden_size % cfg.model.num_heads:
        raise ConfigError(
            f"model.num_heads: must divide model.hidden_size ({cfg.model.hidden_size}), got {cfg.model.num_heads}"
        )
    if cfg.checkpoint.keep_best and not cfg.checkpoint.metric:
        raise ConfigError('checkpoint.metric: keep_best > 0 needs a metric name, e.g. "eval_loss"')
    c = cfg.checkpoint
    if c.output_dir.startswith("s3://") and c.remote:
        raise ConfigError("checkpoint.remote: checkpoint.output_dir is an s3:// URL already; set one of them")
    if c.local_dir and not c.output_dir.startswith("s3://"):
        raise ConfigError("checkpoint.local_dir: applies to an s3:// checkpoint.output_dir (the local tier)")
    if c.remote_mode == "direct" and cfg.train.strategy == "fsdp":
        raise ConfigError(
            'checkpoint.remote_mode: "direct" sends files from memory and cannot hold FSDP shards; use "tiered" '
            'with train.strategy = "fsdp"'
        )
    if c.remote_mode == "direct" and c.remote_keep_last:
        raise ConfigError("checkpoint.remote_keep_last: in direct mode checkpoint.keep_last is the bucket's retention")
    urls = [("checkpoint.output_dir", c.output_dir)] if c.output_dir.startswith("s3://") else []
    urls += [("checkpoint.remote", c.remote)] if c.remote else []
    for name, url in urls:
        try:  # now, before the model is built: the local tier's directory is made from the URL
            RemoteURL.parse(url)
        except InvalidURLError as exc:
            raise ConfigError(f"{name}: {exc.message}. {exc.remedy}") from exc


def lr_factor(step: int, optim: OptimConfig, max_steps: int) -> float:
    """The LR schedule: linear warmup to optim.lr, then cosine down to lr * min_lr_ratio at max_steps."""
    if step < optim.warmup_steps:
        return (step + 1) / (optim.warmup_steps + 1)
    progress = min(1.0, (step - optim.warmup_steps) / max(1, max_steps - optim.warmup_steps))
    return optim.min_lr_ratio + (1 - optim.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


# What a checkpoint's adapter and optimizer state are only valid for: change one of these and a
# resumed run would load tensors of another shape, or onto another base model.
RESUME_KEYS = ("model", "lora")


def config_diff(saved: dict[str, Any], current: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    """``[(section.key, saved value, current value)]`` for every key whose value differs."""
    out = []
    for section in sorted(set(saved) | set(current)):
        old, new = saved.get(section) or {}, current.get(section) or {}
        for key in sorted(set(old) | set(new)):
            if old.get(key) != new.get(key):
                out.append((f"{section}.{key}", old.get(key), new.get(key)))
    return out
