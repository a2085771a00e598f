"""Training configuration: defaults < ``--config FILE.yaml`` < command-line flags.

Every option is defined once, as a field of :class:`TrainConfig` whose metadata carries its help
text; the CLI flags, the YAML keys and ``--help`` are derived from the fields, so they cannot drift
apart. The memory plan is one field, ``TrainConfig.memory`` (an engine :class:`MemoryPlan`), whose
options keep their flat names as flags and keys (``--precision``, ``precision:``), and the config's
dict form (``train_config.json``, a checkpoint's saved config) is flat in the same way.

Everything is checked before any work starts: an unknown or repeated YAML key, a value of the wrong
type (YAML's ``"false"`` is a string, not a boolean; ``2.9`` is not an integer), a number that is not
finite or out of its range (:data:`NUMERIC_BOUNDS`, one line per option); each error names the
file or flag.
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import MISSING, dataclass, field
from pathlib import Path

from cat_engine.cat.captions import DEFAULT_CAPTION_TEMPLATE, PLAIN_MODES
from cat_engine.cat.option_values import TYPES, Bounds, DuplicateKey, strict_loader, type_problem
from cat_engine.engine.errors import CatEngineError
from cat_engine.engine.lora import DEFAULT_TARGETS, SAVE_FORMATS
from cat_engine.engine.memory_plan import ATTENTION_BACKENDS, PRECISIONS, MemoryPlan
from cat_engine.engine.optimizers import LR_SCHEDULERS, OPTIMIZERS
from cat_engine.engine.quantize import QUANT_MODES
from cat_engine.kernels.lora_linear import MAX_RANK


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
            "local diffusers model folder (SD1.x/SD2.x/SDXL, SD3/3.5, Flux.1, Z-Image), builtin: the built-in "
            "tiny model, or builtin-tiny-<sd|sdxl|sd3|flux|zimage>: a random tiny pipeline of that family"
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
    targets: list[str] | None = field(
        default=None,
        metadata=help_metadata(
            "comma-separated module names to adapt",
            f"the base model family's: {','.join(DEFAULT_TARGETS)} for SD/SDXL, the attention (and Flux's "
            "feed-forward) projections for SD3, Flux and Z-Image",
        ),
    )
    train_text_encoder: bool = field(
        default=False,
        metadata=help_metadata(
            "also train a LoRA (same rank and alpha) on the CLIP text encoder(s) of SD1.x/2.x and SDXL"
        ),
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
                "compile": "torch.compile the UNet, in mode default or the MODE given: default, reduce-overhead, "
                "max-autotune (its gradients are checked against eager first)",
                "channels_last": "channels-last memory format for convolutions",
                "frozen_quant": f"frozen weights in 8 bits: {', '.join(QUANT_MODES)} (fp8 on GPUs with "
                "compute capability 8.9+; needs torchao: pip install 'cat-engine[quant]')",
                "offload": "a transformer's blocks in CPU memory, each moved to the GPU while it runs "
                "(needs --gradient-checkpointing)",
            }
        },
    )
    cuda_graphs: bool = field(
        default=False,
        metadata=help_metadata("capture the whole training step as one CUDA graph and replay it (CUDA only)"),
    )
    vram_budget: str | None = field(
        default=None, metadata=help_metadata("e.g. 8GB: pick the fastest memory plan predicted to fit")
    )
    # output
    output: str = field(default="cat-output", metadata=help_metadata("output folder"))
    save_format: str = field(
        default="both",
        metadata=help_metadata(
            "LoRA file format: diffusers (pytorch_lora_weights.safetensors), kohya (OUTPUT_NAME.safetensors, "
            "for ComfyUI/AUTOMATIC1111), or both"
        ),
    )
    save_every: int = field(
        default=100, metadata=help_metadata("checkpoint every N steps (0: only at the end)")
    )
    keep_checkpoints: int = field(default=3, metadata=help_metadata("checkpoints to keep"))
    resume: str | None = field(
        default=None,
        metadata=help_metadata("'latest' (newest checkpoint in --output) or a checkpoint folder"),
    )
    overwrite: bool = field(
        default=False,
        metadata=help_metadata("replace the run already in --output (its LoRA, checkpoints and log)"),
    )
    device: str = field(default="auto", metadata=help_metadata("auto, cpu, cuda, cuda:1 ..."))
    # trainer options (data, schedule, optimizer, loss, samples, logging); trainer_option_checks checks them
    buckets: bool = field(
        default=True,
        metadata=help_metadata(
            "aspect-ratio buckets of about --resolution^2 pixels, one bucket per batch (--no-buckets: centre square crop)"
        ),
    )
    bucket_step: int = field(
        default=64, metadata=help_metadata("bucket sides are multiples of this (pixels)")
    )
    epochs: int | None = field(
        default=None, metadata=help_metadata("train this many epochs instead of --steps", "use --steps")
    )
    gradient_accumulation_steps: int = field(
        default=1, metadata=help_metadata("micro-batches of --batch-size per optimizer step")
    )
    lr_scheduler: str = field(
        default="constant",
        metadata=help_metadata(
            "constant, cosine, cosine_with_restarts, polynomial, linear (after the warm-up)"
        ),
    )
    lr_scheduler_num_cycles: int = field(default=1, metadata=help_metadata("cycles of cosine_with_restarts"))
    lr_scheduler_power: float = field(default=1.0, metadata=help_metadata("power of the polynomial schedule"))
    optimizer: str = field(
        default="adamw",
        metadata=help_metadata(
            "adamw, adamw8bit (needs bitsandbytes), prodigy (needs prodigyopt; use --lr 1)"
        ),
    )
    weight_decay: float = field(
        default=1e-2, metadata=help_metadata("decoupled weight decay of the optimizer")
    )
    min_snr_gamma: float | None = field(
        default=None,
        metadata=help_metadata("min-SNR weighting of the LDM term per sample (5 is usual)", "off"),
    )
    noise_offset: float = field(default=0.0, metadata=help_metadata("per-channel offset added to the noise"))
    caption_dropout: float = field(
        default=0.0, metadata=help_metadata("probability of training a row on the empty caption")
    )
    shuffle_caption: bool = field(
        default=False, metadata=help_metadata("shuffle each caption's comma-separated tags every step")
    )
    keep_tokens: int = field(
        default=0, metadata=help_metadata("leading tags --shuffle-caption keeps in place")
    )
    sample_every: int = field(
        default=0, metadata=help_metadata("write a sample grid to OUTPUT/samples every N steps (0: never)")
    )
    sample_prompts: str | list[str] | None = field(
        default=None,
        metadata=help_metadata(
            "a .txt file (one prompt a line) or prompts separated by |; each with the token",
            "each concept's caption template",
        ),
    )
    sample_seeds: int = field(default=2, metadata=help_metadata("seeds (grid columns) per sample prompt"))
    sample_steps: int = field(default=20, metadata=help_metadata("DDIM steps of the samples"))
    log_with: str = field(default="none", metadata=help_metadata("tensorboard, wandb or none"))

    def validate(self) -> TrainConfig:
        """Check every option (its type, a number's range, the choices); returns self."""
        for name, option in OPTIONS.items():  # a config built in Python did not pass from_dict
            value = getattr(self.memory, name) if option.in_memory else getattr(self, name)
            problem = "a value is required" if value is None and not option.optional else None
            problem = problem or type_problem(option.type, value)
            if problem:
                raise ConfigError(f"{_flag(name)}: {problem}")
            if not option.in_memory:  # a path as a string, an int as a float where a float is meant
                setattr(self, name, cast(name, option.type, value))
        if isinstance(self.targets, str):
            self.targets = [t.strip() for t in self.targets.split(",") if t.strip()]
        for name, bounds in NUMERIC_BOUNDS.items():
            value = getattr(self.memory, name) if OPTIONS[name].in_memory else getattr(self, name)
            problem = bounds.problem(value)
            if problem:
                raise ConfigError(f"{_flag(name)} {problem}")
        checks = [
            (self.plain_mode in PLAIN_MODES, f"--plain-mode must be one of {', '.join(PLAIN_MODES)}"),
            (bool(self.token.strip()), "--token must not be empty"),
            (self.targets is None or bool(self.targets), "--targets must name at least one module"),
            (self.resolution is None or self.resolution % 8 == 0, "--resolution must be a multiple of 8"),
            (
                not (self.resume and self.overwrite),
                "--resume continues the run in --output, --overwrite replaces it: give one",
            ),
        ]
        for ok, message in checks + trainer_option_checks(self):
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
        """A config from the flat form (not validated); every value must have its option's type."""
        unknown = sorted(set(values) - set(OPTIONS))
        if unknown:
            raise ConfigError(f"unknown option {unknown[0]!r} (known: {', '.join(OPTIONS)})")
        values = {name: OPTIONS[name].coerce(value) for name, value in values.items()}
        choices = {
            "precision": PRECISIONS,
            "attention": ATTENTION_BACKENDS,
            "save_format": SAVE_FORMATS,
            "frozen_quant": QUANT_MODES,
        }
        for name, allowed in choices.items():
            if name in values and values[name] not in allowed:
                raise ConfigError(f"--{name.replace('_', '-')} must be one of {', '.join(allowed)}")
        top = {k: v for k, v in values.items() if not OPTIONS[k].in_memory}
        plan = {k: v for k, v in values.items() if OPTIONS[k].in_memory}
        return cls(**top, memory=dataclasses.replace(default_memory_plan(), **plan))


MAX_LR = 1.0
# Every numeric option and its range, one line each (tests check that none is missing).
NUMERIC_BOUNDS = {
    "cat_weight": Bounds(0),
    "cat_every": Bounds(1),
    "rank": Bounds(1, MAX_RANK, why="the LoRA kernels' limit"),
    "alpha": Bounds(0, above=True),
    "lr": Bounds(0, MAX_LR, above=True),
    "lr_warmup_steps": Bounds(0),
    "max_grad_norm": Bounds(0, above=True),
    "steps": Bounds(1),
    "batch_size": Bounds(1),
    "resolution": Bounds(8),
    "seed": Bounds(0, 2**64 - 1, why="64 bits"),
    "save_every": Bounds(0, why="0: only at the end"),
    "keep_checkpoints": Bounds(1),
    # trainer options (data, schedule, optimizer, loss, samples)
    "bucket_step": Bounds(8),
    "epochs": Bounds(1),
    "gradient_accumulation_steps": Bounds(1),
    "lr_scheduler_num_cycles": Bounds(1),
    "lr_scheduler_power": Bounds(0, above=True),
    "weight_decay": Bounds(0),
    "min_snr_gamma": Bounds(0, above=True),
    "noise_offset": Bounds(0),
    "caption_dropout": Bounds(0, 0.999, why="1 would drop every caption"),
    "keep_tokens": Bounds(0),
    "sample_every": Bounds(0, why="0: never"),
    "sample_seeds": Bounds(1),
    "sample_steps": Bounds(1),
}


@dataclass(frozen=True)
class Option:
    """One option as the user sees it: the flag ``--name-with-dashes`` and the YAML key ``name``."""

    name: str
    type: str  # the field's annotation: "int", "float | None", "bool", "list[str]", ...
    default: object
    help: str
    default_text: str | None = None  # what a None default means, for --help
    in_memory: bool = False  # a field of TrainConfig.memory rather than of TrainConfig

    @property
    def optional(self) -> bool:
        """``None`` is a value of this option (its default means something)."""
        return self.type.endswith("| None")

    def coerce(self, value):
        """``value`` checked against the option's type; an int becomes a float for a float option."""
        if value is None and not self.optional:
            raise ConfigError(f"option {self.name}: a value is required")
        return cast(self.name, self.type, value)

    def help_text(self) -> str:
        return help_line(self.help, self.default, self.default_text)


def cast(name: str, kind: str, value):
    """``value`` as the option type ``kind`` (int, float, bool, str, list[str], list[dict], or any of
    them ``| None``); ``None`` and other kinds unchanged. A value of another type is an error, not a
    conversion: ``bool("false")`` is True and ``int(2.9)`` is 2."""
    problem = type_problem(kind, value)
    if problem:
        raise ConfigError(f"option {name}: {problem}")
    check = TYPES.get(kind.removesuffix(" | None"))
    return value if value is None or check is None else check[1](value)


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
RUN_ONLY = {
    *("steps", "resume", "overwrite", "output", "save_every", "keep_checkpoints", "device", "config"),
    *("compile", "cuda_graphs"),
}
RUN_ONLY.add("save_format")  # how the adapter is written, not what it is
# Options that make a run what it is: resuming it with other values would train another adapter.
IDENTITY = (
    *("base", "data", "concepts", "token", "class_word", "caption_template", "plain_mode"),
    *("rank", "alpha", "targets", "seed", "resolution", "flip", "train_text_encoder"),
)
RUN_ONLY |= {"epochs", "sample_every", "sample_prompts", "sample_seeds", "sample_steps", "log_with"}
LOGGERS = ("none", "tensorboard", "wandb")


def trainer_option_checks(c: TrainConfig) -> list[tuple[bool, str]]:
    """(ok, message) of the trainer options' choices (their numeric ranges: :data:`NUMERIC_BOUNDS`)."""
    return [
        (c.bucket_step % 8 == 0, "--bucket-step must be a positive multiple of 8"),
        (c.lr_scheduler in LR_SCHEDULERS, f"--lr-scheduler must be one of {', '.join(LR_SCHEDULERS)}"),
        (c.optimizer in OPTIMIZERS, f"--optimizer must be one of {', '.join(OPTIMIZERS)}"),
        (c.log_with in LOGGERS, f"--log-with must be one of {', '.join(LOGGERS)}"),
        (
            not (c.cuda_graphs and c.gradient_accumulation_steps > 1),
            "--cuda-graphs replays one captured batch per step: raise --batch-size instead of "
            "--gradient-accumulation-steps",
        ),
        (not (c.cuda_graphs and c.cat_every > 1), "--cuda-graphs captures one loss: use --cat-every 1"),
        (
            not (c.cuda_graphs and c.train_text_encoder),
            "--cuda-graphs captures the UNet's step, not the text encoders': drop one of --cuda-graphs, "
            "--train-text-encoder",
        ),
    ]


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
        for key in CONCEPT_KEYS:
            problem = type_problem("str", entry.get(key))
            if problem:
                raise ConfigError(f"concepts[{i}]: {key}: {problem}")
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


def read_yaml(path: str | Path, flag: str):
    """The content of the YAML file ``path`` (given as ``flag``), read by the strict loader.

    Raises :class:`ConfigError` naming ``flag``, the file and the problem (with its line).
    """
    import yaml

    path = Path(path).expanduser()
    if not path.is_file():
        raise ConfigError(f"{flag} {path}: no such file")
    try:
        return yaml.load(path.read_text(encoding="utf-8"), Loader=strict_loader())
    except DuplicateKey as exc:
        raise ConfigError(f"{flag} {path}: {exc}") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        what = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"{flag} {path}: not valid YAML ({what}{where})") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{flag} {path}: cannot read it ({exc})") from None


def load_yaml(path: str | Path) -> dict:
    """Read a YAML config file; every key must be an option (dashes allowed), once, with a value of its type."""
    raw = read_yaml(path, "--config")
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(f"--config {path}: expected a mapping of option: value at the top level")
    return options_of(raw, f"--config {path}")


def options_of(raw: dict, where: str) -> dict:
    """``raw``'s keys as option names (dashes allowed), each known, given once and of its type.

    ``where`` starts every message (``--config run.yaml``, ``--manifest farm.yaml: defaults``).
    """
    values = {}
    for key, value in raw.items():
        name = str(key).replace("-", "_")
        if name not in OPTIONS:
            known = ", ".join(sorted(OPTIONS))
            raise ConfigError(f"{where}: unknown key {key!r} (known keys: {known})")
        if name in values:
            raise ConfigError(f"{where}: {name} is given twice (as {name} and {name.replace('_', '-')})")
        option = OPTIONS[name]
        problem = "a value is required" if value is None and not option.optional else None
        problem = problem or type_problem(option.type, value)
        if problem:
            raise ConfigError(f"{where}: {key}: {problem}")
        values[name] = value
    return values


def build_config(file_values: dict, flag_values: dict) -> TrainConfig:
    """Defaults, overridden by the file, overridden by the flags the user actually gave."""
    merged = {**file_values, **{k: v for k, v in flag_values.items() if v is not None}}
    if merged.get("epochs") is not None and merged.get("steps") is not None:
        raise ConfigError("give --steps or --epochs, not both")
    if isinstance(merged.get("targets"), str):
        merged["targets"] = [t.strip() for t in merged["targets"].split(",") if t.strip()]
    return TrainConfig.from_dict(merged).validate()


def config_differences(saved: dict, current: TrainConfig, ignore=()) -> list[str]:
    """Options that differ between a checkpoint's config (flat form) and this run, ignoring run-only
    ones and ``ignore``."""
    now = current.to_dict()
    return [
        f"{k}: checkpoint {saved.get(k)!r}, now {now[k]!r}"
        for k in sorted(now)
        if k not in RUN_ONLY and k not in ignore and k in saved and saved[k] != now[k]
    ]


def run_identity(flat: dict) -> dict:
    """The :data:`IDENTITY` options of a flat config (``to_dict`` form, or a checkpoint's), as a run
    compares them: folders absolute, ``alpha`` the effective one, targets as a set (sorted; left out
    when not given, as the model decides them)."""

    def folder(value):
        return value if value in (None, "builtin") else str(Path(value).expanduser().resolve())

    out = {k: flat[k] for k in IDENTITY if k in flat}
    for key in ("base", "data"):
        if key in out:
            out[key] = folder(out[key])
    if out.get("concepts"):
        out["concepts"] = [{**c, "data": folder(c.get("data"))} for c in out["concepts"]]
    if "alpha" in out and "rank" in flat:
        out["alpha"] = float(flat["rank"] if flat["alpha"] is None else flat["alpha"])
    if isinstance(out.get("targets"), list):
        out["targets"] = sorted(out["targets"])
    elif "targets" in out:  # the family's default, known once the model is loaded: the checkpoint's
        del out["targets"]  # tensors are checked against the adapter then (Trainer.restore)
    return out


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

    ``bool``: ``--name`` and ``--no-name``; ``bool | str``: the same, and ``--name VALUE``; ``int``,
    ``float`` (or ``| None``): parsed as such; anything else: a string.
    """
    if kind == "bool":
        parser.add_argument(_flag(name), action=argparse.BooleanOptionalAction, default=None, **kwargs)
    elif kind == "bool | str":  # --name (True), --name VALUE, --no-name (False)
        parser.add_argument(_flag(name), nargs="?", const=True, default=None, metavar="MODE", **kwargs)
        parser.add_argument("--no-" + _flag(name)[2:], dest=name, action="store_const", const=False)
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
        elif option.type == "bool" or (option.type == "bool | str" and isinstance(value, bool)):
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
