"""Training configuration: defaults < ``--config FILE.yaml`` < command-line flags.

Every option is defined once, as a field of :class:`TrainConfig` whose metadata carries its help
text; the CLI flags, the YAML keys and ``--help`` are derived from the fields, so they cannot drift
apart. The memory plan is one field, ``TrainConfig.memory`` (an engine :class:`MemoryPlan`), whose
options keep their flat names as flags and keys (``--precision``, ``precision:``), and the config's
dict form (``train_config.json``, a checkpoint's saved config) is flat in the same way. An unknown
YAML key is an error that names the file and the key.
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import MISSING, dataclass, field
from pathlib import Path

from cat_engine.cat.captions import DEFAULT_CAPTION_TEMPLATE, PLAIN_MODES
from cat_engine.engine.errors import CatEngineError
from cat_engine.engine.lora import DEFAULT_TARGETS
from cat_engine.engine.memory_plan import ATTENTION_BACKENDS, PRECISIONS, MemoryPlan


class ConfigError(CatEngineError):
    """A configuration the user must fix; the message names the file or flag."""


def default_memory_plan() -> MemoryPlan:
    """The engine's plan with the precision left to the device (bf16 or fp16 on a GPU, fp32 elsewhere)."""
    return MemoryPlan(precision="auto")


def help_metadata(text: str, default_text: str | None = None) -> dict:
    """Field metadata: the ``--help`` text, and what a ``None`` default means (shown as the default)."""
    return {"help": text, "default_text": default_text}


@dataclass
class TrainConfig:
    # what to train
    base: str = field(
        default="builtin",
        metadata=help_metadata(
            "local diffusers model folder (SD1.x/SD2.x/SDXL), or builtin: the built-in tiny model"
        ),
    )
    data: str | None = field(
        default=None,
        metadata=help_metadata(
            "folder of concept images (+ optional same-name .txt captions)", "the built-in set"
        ),
    )
    token: str = field(default="sks", metadata=help_metadata("trigger token"))
    class_word: str = field(default="star", metadata=help_metadata("class word of the concept"))
    caption_template: str = field(
        default=DEFAULT_CAPTION_TEMPLATE, metadata=help_metadata("caption for images without a .txt")
    )
    plain_mode: str = field(
        default="class",
        metadata=help_metadata("plain caption for the CAT term: class (token -> class word), strip, empty"),
    )
    cat_weight: float = field(default=1.0, metadata=help_metadata("lambda of the CAT term (0 = plain LoRA)"))
    cat_every: int = field(
        default=1,
        metadata=help_metadata(
            "k: the CAT term on every k-th step only, weighted k x lambda (the same expected gradient); "
            "the other steps are plain LoRA steps"
        ),
    )
    # several concepts in one adapter: [{data, token, class_word, caption_template}, ...];
    # None: the one concept of data/token/class_word above
    concepts: list[dict] | None = field(
        default=None,
        metadata=help_metadata(
            "repeatable: several concepts in one adapter (instead of --data/--token/--class-word)"
        ),
    )
    # the adapter
    rank: int = field(default=16, metadata=help_metadata("LoRA rank"))
    alpha: float | None = field(default=None, metadata=help_metadata("LoRA alpha", "the rank, i.e. scale 1"))
    targets: list[str] = field(
        default_factory=lambda: list(DEFAULT_TARGETS),
        metadata=help_metadata("comma-separated module names to adapt"),
    )
    # optimisation
    lr: float = field(default=1e-4, metadata=help_metadata("learning rate"))
    lr_warmup_steps: int = field(default=0, metadata=help_metadata("linear warm-up steps"))
    max_grad_norm: float = field(default=1.0, metadata=help_metadata("gradient clipping norm"))
    steps: int = field(default=500, metadata=help_metadata("optimizer steps in total"))
    batch_size: int = field(
        default=1, metadata=help_metadata("images per step, over all ranks under torchrun: the global batch")
    )
    resolution: int | None = field(
        default=None, metadata=help_metadata("training resolution in pixels", "the model's native one")
    )
    seed: int = field(
        default=0, metadata=help_metadata("seed of the adapter init, data order, noise and timesteps")
    )
    flip: bool = field(default=False, metadata=help_metadata("random horizontal flips"))
    # the memory plan; metadata: the help of each of its options (fused AdamW is not one: auto)
    memory: MemoryPlan = field(
        default_factory=default_memory_plan,
        metadata={
            "options": {
                "precision": "auto (bf16 on a GPU that has it, else fp32), fp32, bf16, fp16",
                "gradient_checkpointing": "recompute activations in backward (less memory, ~30% more time)",
                "attention": f"attention backend: {', '.join(ATTENTION_BACKENDS)}",
                "compile": "torch.compile the UNet (its gradients are checked against eager first)",
                "channels_last": "channels-last memory format for convolutions",
            }
        },
    )
    vram_budget: str | None = field(
        default=None, metadata=help_metadata("e.g. 8GB: pick the fastest memory plan predicted to fit")
    )
    # output
    output: str = field(default="cat-output", metadata=help_metadata("output folder"))
    save_every: int = field(
        default=100, metadata=help_metadata("checkpoint every N steps (0: only at the end)")
    )
    keep_checkpoints: int = field(default=3, metadata=help_metadata("checkpoints to keep"))
    resume: str | None = field(
        default=None,
        metadata=help_metadata("'latest' (newest checkpoint in --output) or a checkpoint folder"),
    )
    device: str = field(default="auto", metadata=help_metadata("auto, cpu, cuda, cuda:1 ..."))

    def validate(self) -> TrainConfig:
        checks = [
            (self.plain_mode in PLAIN_MODES, f"--plain-mode must be one of {', '.join(PLAIN_MODES)}"),
            (self.cat_weight >= 0, "--cat-weight must be >= 0"),
            (self.cat_every >= 1, "--cat-every must be >= 1"),
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
        """The flat form, one key per option in definition order (as YAML files and checkpoints hold it)."""
        nested = dataclasses.asdict(self)
        plan = nested.pop("memory")
        return {name: plan[name] if o.in_memory else nested[name] for name, o in OPTIONS.items()}

    @classmethod
    def from_dict(cls, values: dict) -> TrainConfig:
        """A config from the flat form (not validated); simple scalars are coerced (YAML gives ints for floats)."""
        unknown = sorted(set(values) - set(OPTIONS))
        if unknown:
            raise ConfigError(f"unknown option {unknown[0]!r} (known: {', '.join(OPTIONS)})")
        values = {name: OPTIONS[name].coerce(value) for name, value in values.items()}
        choices = {"precision": PRECISIONS, "attention": ATTENTION_BACKENDS}
        for name, allowed in choices.items():
            if name in values and values[name] not in allowed:
                raise ConfigError(f"--{name} must be one of {', '.join(allowed)}")
        top = {k: v for k, v in values.items() if not OPTIONS[k].in_memory}
        plan = {k: v for k, v in values.items() if OPTIONS[k].in_memory}
        return cls(**top, memory=dataclasses.replace(default_memory_plan(), **plan))


@dataclass(frozen=True)
class Option:
    """One option as the user sees it: the flag ``--name-with-dashes`` and the YAML key ``name``."""

    name: str
    type: str  # the field's annotation: "int", "float | None", "bool", "list[str]", ...
    default: object
    help: str
    default_text: str | None = None  # what a None default means, for --help
    in_memory: bool = False  # a field of TrainConfig.memory rather than of TrainConfig

    def coerce(self, value):
        """``value`` as the option's simple scalar type (int, float, bool, str); others unchanged."""
        return cast(self.name, self.type, value)

    def help_text(self) -> str:
        return help_line(self.help, self.default, self.default_text)


def cast(name: str, kind: str, value):
    """``value`` as the simple scalar type ``kind`` (int, float, bool, str); other kinds and None unchanged."""
    casts = {"int": int, "float": float, "bool": bool, "str": str}
    if value is None or kind not in casts:
        return value
    try:
        return casts[kind](value)
    except (TypeError, ValueError):
        raise ConfigError(f"option {name}: expected {kind}, got {value!r}") from None


def help_line(text: str, default, default_text: str | None = None) -> str:
    """An option's ``--help`` line: ``text (default: ...)``, argparse's ``%`` escaped.

    Booleans, and ``None`` without a ``default_text``, show no default.
    """
    if default_text is None:
        if default is None or isinstance(default, bool):
            return text.replace("%", "%%")
        if isinstance(default, (list, tuple)):
            default_text = ",".join(map(str, default))
        else:
            default_text = repr(default) if " " in str(default) else str(default)
    return f"{text} (default: {default_text})".replace("%", "%%")


def _options() -> dict[str, Option]:
    """Every option in definition order, the memory plan's in place of ``memory``."""
    out = {}
    for f in dataclasses.fields(TrainConfig):
        default = f.default_factory() if f.default is MISSING else f.default
        if f.name == "memory":
            plan_fields = {p.name: p for p in dataclasses.fields(MemoryPlan)}
            for name, text in f.metadata["options"].items():
                out[name] = Option(name, plan_fields[name].type, getattr(default, name), text, in_memory=True)
        else:
            out[f.name] = Option(f.name, f.type, default, f.metadata["help"], f.metadata["default_text"])
    return out


OPTIONS = _options()
# Options that describe a run rather than the trained adapter: a resume may change them freely.
RUN_ONLY = {"steps", "resume", "output", "save_every", "keep_checkpoints", "device", "config", "compile"}
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


def load_yaml(path: str | Path) -> dict:
    """Read a YAML config file; every key must be an option (dashes allowed)."""
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
        if name not in OPTIONS:
            known = ", ".join(sorted(OPTIONS))
            raise ConfigError(f"--config {path}: unknown key {key!r} (known keys: {known})")
        values[name] = value
    return values


def build_config(file_values: dict, flag_values: dict) -> TrainConfig:
    """Defaults, overridden by the file, overridden by the flags the user actually gave."""
    merged = {**file_values, **{k: v for k, v in flag_values.items() if v is not None}}
    if isinstance(merged.get("targets"), str):
        merged["targets"] = [t.strip() for t in merged["targets"].split(",") if t.strip()]
    return TrainConfig.from_dict(merged).validate()


def config_differences(saved: dict, current: TrainConfig) -> list[str]:
    """Options that differ between a checkpoint's config (flat form) and this run, ignoring run-only ones."""
    now = current.to_dict()
    return [
        f"{k}: checkpoint {saved.get(k)!r}, now {now[k]!r}"
        for k in sorted(now)
        if k not in RUN_ONLY and k in saved and saved[k] != now[k]
    ]


# ------------------------------------------------------------------------------------ the flags
def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """``--config`` and one flag per option; flag defaults are None so the file can fill them."""
    parser.add_argument("--config", metavar="FILE.yaml", help="YAML file of options; flags override it")
    for name, option in OPTIONS.items():
        if name == "concepts":  # one flag per concept, each DATA:TOKEN:CLASS
            parser.add_argument(
                "--concept",
                dest=name,
                action="append",
                type=_concept_flag,
                default=None,
                metavar="DATA:TOKEN:CLASS",
                help=option.help_text(),
            )
        else:
            add_flag(parser, name, option.type, help=option.help_text())


def add_flag(parser: argparse.ArgumentParser, name: str, kind: str, **kwargs) -> None:
    """``--name-with-dashes`` for an option whose annotation is ``kind``, default ``None`` (not given).

    ``bool``: ``--name`` and ``--no-name``; ``int``, ``float`` (or ``| None``): parsed as such;
    anything else: a string.
    """
    if kind == "bool":
        parser.add_argument(_flag(name), action=argparse.BooleanOptionalAction, default=None, **kwargs)
    else:
        caster = {"int": int, "float": float}.get(kind.removesuffix(" | None"), str)
        parser.add_argument(_flag(name), type=caster, default=None, **kwargs)


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    flags = {k: getattr(args, k) for k in OPTIONS if hasattr(args, k)}
    return build_config(load_yaml(args.config) if args.config else {}, flags)


def flags_of(args: argparse.Namespace) -> list[str]:
    """``--config`` and the options given in ``args`` as command-line flags again."""
    out = ["--config", args.config] if args.config else []
    for name, option in OPTIONS.items():
        value = getattr(args, name, None)
        if value is None:
            continue
        if name == "concepts":
            out += [a for c in value for a in ("--concept", f"{c['data']}:{c['token']}:{c['class_word']}")]
        elif option.type == "bool":
            out.append(_flag(name) if value else "--no-" + _flag(name)[2:])
        else:
            out += [_flag(name), ",".join(value) if isinstance(value, list) else str(value)]
    return out


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _concept_flag(text: str) -> dict:
    # rsplit: the data folder may itself contain ':'; token and class word do not.
    parts = text.rsplit(":", 2)
    if len(parts) != 3 or not all(p.strip() for p in parts):
        raise argparse.ArgumentTypeError(f"expected DATA:TOKEN:CLASS, got {text!r}")
    return {"data": parts[0], "token": parts[1].strip(), "class_word": parts[2].strip()}
