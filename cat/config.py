"""Training configuration: defaults < ``--config FILE.yaml`` < command-line flags.

Every option lives once, in :class:`TrainConfig`; the CLI flags and the YAML keys are derived
from its fields, so the two cannot drift apart. An unknown YAML key is an error that names the
file and the key.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

from cat_engine.cat.captions import DEFAULT_CAPTION_TEMPLATE, PLAIN_MODES
from cat_engine.engine.errors import CatEngineError
from cat_engine.engine.lora import DEFAULT_TARGETS
from cat_engine.engine.memory_plan import ATTENTION_BACKENDS as ATTENTION
from cat_engine.engine.memory_plan import PRECISIONS


class ConfigError(CatEngineError):
    """A configuration the user must fix; the message names the file or flag."""


@dataclass
class TrainConfig:
    # what to train
    base: str = "builtin"
    data: str | None = None  # None: the built-in concept image set
    token: str = "sks"
    class_word: str = "star"
    caption_template: str = DEFAULT_CAPTION_TEMPLATE
    plain_mode: str = "class"
    cat_weight: float = 1.0
    # several concepts in one adapter: [{data, token, class_word, caption_template?}, ...];
    # None: the one concept of data/token/class_word above
    concepts: list[dict] | None = None
    # the adapter
    rank: int = 16
    alpha: float | None = None  # None: alpha = rank (scale 1)
    targets: list[str] = field(default_factory=lambda: list(DEFAULT_TARGETS))
    # optimisation
    lr: float = 1e-4
    lr_warmup_steps: int = 0
    max_grad_norm: float = 1.0
    steps: int = 500
    batch_size: int = 1
    resolution: int | None = None  # None: the model's native resolution
    seed: int = 0
    flip: bool = False
    # memory plan
    precision: str = "auto"
    gradient_checkpointing: bool = False
    attention: str = "sdpa"
    compile: bool = False
    channels_last: bool = False
    vram_budget: str | None = None
    # output
    output: str = "cat-output"
    save_every: int = 100
    keep_checkpoints: int = 3
    resume: str | None = None  # "latest" or a checkpoint folder
    device: str = "auto"

    def validate(self) -> TrainConfig:
        checks = [
            (self.plain_mode in PLAIN_MODES, f"--plain-mode must be one of {', '.join(PLAIN_MODES)}"),
            (self.precision in PRECISIONS, f"--precision must be one of {', '.join(PRECISIONS)}"),
            (self.attention in ATTENTION, f"--attention must be one of {', '.join(ATTENTION)}"),
            (self.cat_weight >= 0, "--cat-weight must be >= 0"),
            (1 <= self.rank <= 1024, "--rank must be between 1 and 1024"),
            (self.steps >= 1, "--steps must be >= 1"),
            (self.batch_size >= 1, "--batch-size must be >= 1"),
            (self.lr > 0, "--lr must be > 0"),
            (self.save_every >= 0, "--save-every must be >= 0 (0: only at the end)"),
            (self.keep_checkpoints >= 1, "--keep-checkpoints must be >= 1"),
            (bool(self.token.strip()), "--token must not be empty"),
            (bool(self.targets), "--targets must name at least one module"),
            (
                self.resolution is None or (self.resolution >= 8 and self.resolution % 8 == 0),
                "--resolution must be a multiple of 8",
            ),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)
        if self.concepts is not None:
            self.concepts = normalize_concepts(self.concepts, self.caption_template)
            if self.data is not None:
                raise ConfigError("give the data either as --data or as concepts, not both")
        return self

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


CONCEPT_KEYS = ("data", "token", "class_word", "caption_template")


def normalize_concepts(concepts, default_template: str) -> list[dict]:
    """Check a ``concepts`` list; return it with every key present (``caption_template`` filled in).

    Each entry needs ``data``, ``token`` and ``class_word``; tokens must differ, since the token is
    what tells the concepts apart in the captions.
    """
    if not isinstance(concepts, list) or not concepts:
        raise ConfigError("concepts: expected a non-empty list of {data, token, class_word} entries")
    out = []
    for i, entry in enumerate(concepts):
        if not isinstance(entry, dict):
            raise ConfigError(
                f"concepts[{i}]: expected a mapping with data, token, class_word; got {entry!r}"
            )
        entry = {str(k).replace("-", "_"): v for k, v in entry.items()}
        unknown = sorted(set(entry) - set(CONCEPT_KEYS))
        missing = [k for k in CONCEPT_KEYS[:3] if not str(entry.get(k) or "").strip()]
        if unknown:
            raise ConfigError(f"concepts[{i}]: unknown key {unknown[0]!r} (known: {', '.join(CONCEPT_KEYS)})")
        if missing:
            raise ConfigError(f"concepts[{i}]: missing {', '.join(missing)}")
        out.append(
            {
                **{k: str(entry[k]) for k in CONCEPT_KEYS[:3]},
                "caption_template": str(entry.get("caption_template") or default_template),
            }
        )
    tokens = [c["token"] for c in out]
    repeated = sorted({t for t in tokens if tokens.count(t) > 1})
    if repeated:
        raise ConfigError(
            f"concepts: token {repeated[0]!r} is used by more than one concept; give each its own"
        )
    return out


FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}
# Options that describe a run rather than the trained adapter: a resume may change them freely.
RUN_ONLY = {"steps", "resume", "output", "save_every", "keep_checkpoints", "device", "config", "compile"}


def load_yaml(path: str | Path) -> dict:
    """Read a YAML config file; every key must be a :class:`TrainConfig` field (dashes allowed)."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"--config {path}: no such file")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"--config {path}: not valid YAML ({str(exc).splitlines()[0]})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"--config {path}: expected a mapping of option: value at the top level")
    values = {}
    for key, value in raw.items():
        name = str(key).replace("-", "_")
        if name not in FIELDS:
            known = ", ".join(sorted(FIELDS))
            raise ConfigError(f"--config {path}: unknown key {key!r} (known keys: {known})")
        values[name] = value
    return values


def build_config(file_values: dict, flag_values: dict) -> TrainConfig:
    """Defaults, overridden by the file, overridden by the flags the user actually gave."""
    merged = {**file_values, **{k: v for k, v in flag_values.items() if v is not None}}
    if isinstance(merged.get("targets"), str):
        merged["targets"] = [t.strip() for t in merged["targets"].split(",") if t.strip()]
    try:
        config = TrainConfig(**merged)
    except TypeError as exc:
        raise ConfigError(str(exc)) from None
    for name, f in FIELDS.items():  # YAML gives ints for floats etc.; coerce simple scalars
        value = getattr(config, name)
        if value is None or f.type not in ("int", "float", "bool", "str"):
            continue
        try:
            setattr(config, name, {"int": int, "float": float, "bool": bool, "str": str}[f.type](value))
        except (TypeError, ValueError):
            raise ConfigError(f"option {name}: expected {f.type}, got {value!r}") from None
    return config.validate()


def config_differences(saved: dict, current: TrainConfig) -> list[str]:
    """Options that differ between a checkpoint's config and this run, ignoring run-only ones."""
    now = current.to_dict()
    return [
        f"{k}: checkpoint {saved.get(k)!r}, now {now[k]!r}"
        for k in sorted(now)
        if k not in RUN_ONLY and k in saved and saved[k] != now[k]
    ]
