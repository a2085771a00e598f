"""``cat-engine eval``: the Knowledge Preservation Score (KPS, docs/design.md §2) of a trained adapter.

Python API: :func:`evaluate` takes an :class:`EvalConfig` and returns a
:class:`~cat_engine.cat.report.KpsReport`; :func:`~cat_engine.cat.report.write_report` writes it
as ``OUTPUT/kps.json`` and ``OUTPUT/grid.png``. The command is parse → EvalConfig → evaluate →
write_report. :func:`evaluate` reads top to bottom: inputs (adapter, references, prompts), models,
generate (one split-batch denoising loop for G_tok, G_ada and G_base), embed (CLIP), gather
(across ranks under torchrun), score.

Scale-out: ``torchrun --nproc_per_node N -m cat_engine eval ...`` deals the (prompt, seed) jobs
round-robin over the ranks and gathers their embeddings on every rank; rank 0 writes. The numbers
equal a single-process run (up to floating-point noise).
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import time
from dataclasses import MISSING, dataclass, field
from pathlib import Path

import torch

from cat_engine.cat import kps as kps_metrics
from cat_engine.cat.captions import plain_caption
from cat_engine.cat.clip import ClipEmbedder
from cat_engine.cat.config import add_flag, cast, help_line, help_metadata
from cat_engine.cat.dataset import DEFAULT_CLASS_WORD, DEFAULT_TOKEN, IMAGE_SUFFIXES, builtin_concept_dir
from cat_engine.cat.logs import console_logging
from cat_engine.cat.report import GRID_MAX_PROMPTS, GRID_MAX_SEEDS, KpsReport, grid_rows, write_report
from cat_engine.cat.sampling import SETS, Job, SampleSettings, sample_jobs, to_uint8
from cat_engine.cat.text_encoder_lora import load_text_encoder_lora
from cat_engine.engine import builtin
from cat_engine.engine import distributed as dist
from cat_engine.engine.builtin_clip import RANDOM_CLIP_NAME
from cat_engine.engine.errors import CatEngineError
from cat_engine.engine.families import dit_family, lora_prefix
from cat_engine.engine.lora import LORA_WEIGHT_NAME, has_peft_adapter, read_lora_metadata
from cat_engine.engine.memory_plan import DTYPES
from cat_engine.engine.models import BUILTIN, load_base

log = logging.getLogger("cat_engine")
DEFAULT_TEMPLATES = (
    "a photo of {}",
    "{} on the beach",
    "a painting of {}",
    "{} in the snow",
)
SCHEDULER_NAME = "DDIM"  # the UNets' sampler; transformer families report their own
SD_GUIDANCE = 7.5  # the default guidance of the UNet families
EVAL_DTYPES = ("auto", "float32", "float16", "bfloat16")


class EvalError(CatEngineError):
    """An evaluation input that cannot be used (adapter, references, prompts, settings)."""


@dataclass(kw_only=True)
class EvalConfig:
    """The options of a KPS run: ``cat-engine eval``'s flags but ``--output``, ``--no-progress``
    and ``--concepts``, and the prompt templates themselves where the flag (``--prompts``) names a file."""

    base: str | None = field(
        default=None,
        metadata=help_metadata(
            "diffusers model folder",
            "the base the adapter was trained on, from its metadata, else the built-in model",
        ),
    )
    lora: str = field(metadata=help_metadata("adapter folder from cat-engine train (or its .safetensors)"))
    refs: str | None = field(
        default=None, metadata=help_metadata("reference images of the concept", "the built-in set")
    )
    token: str | None = field(
        default=None,
        metadata=help_metadata("trigger token", "from the adapter, else the built-in concept's"),
    )
    class_word: str | None = field(
        default=None,
        metadata=help_metadata("class word", "from the adapter, else the built-in concept's"),
    )
    templates: list[str] = field(
        default_factory=lambda: list(DEFAULT_TEMPLATES),
        metadata=help_metadata(
            "prompt templates, one a line, '{}' marks the subject",
            ", ".join(repr(t) for t in DEFAULT_TEMPLATES),
        ),
    )
    seeds: int = field(
        default=4, metadata=help_metadata("sampling seeds per prompt: first-seed .. first-seed+N-1")
    )
    first_seed: int = field(
        default=0, metadata=help_metadata("the first sampling seed (disjoint seed sets compare evaluations)")
    )
    prompt_seed_stride: int = field(
        default=0,
        metadata=help_metadata(
            "prompt p samples its seeds from first-seed + p x STRIDE; 0: every prompt the same seeds, "
            "whose images then look alike across prompts; a stride >= --seeds gives each prompt its own"
        ),
    )
    clip: str | None = field(
        default=None,
        metadata=help_metadata(f"CLIP model folder, or {RANDOM_CLIP_NAME}", "the built-in CLIP"),
    )
    resolution: int | None = field(default=None, metadata=help_metadata("image size", "the model's native"))
    steps: int = field(
        default=25, metadata=help_metadata("sampling steps (DDIM; flow-matching Euler for transformers)")
    )
    guidance: float | None = field(
        default=None,
        metadata=help_metadata(
            "guidance scale (classifier-free; Flux.1-dev: its embedded guidance)",
            f"{SD_GUIDANCE} for SD/SDXL, the pipeline's default for SD3, Flux and Z-Image",
        ),
    )
    batch_size: int = field(default=8, metadata=help_metadata("(prompt, seed) jobs per denoising batch"))
    dtype: str = field(
        default="auto",
        metadata=help_metadata(
            "denoiser and text encoder precision; auto: float16 on a GPU (bfloat16 for SD3, Flux, Z-Image), "
            "else float32"
        ),
    )

    def validate(self) -> EvalConfig:
        """Coerce simple scalars (a YAML ``guidance: 5`` is a float), check the values; returns self."""
        for f in dataclasses.fields(self):
            setattr(self, f.name, cast(f.name, f.type.removesuffix(" | None"), getattr(self, f.name)))
        if self.seeds < 1 or self.steps < 1 or self.batch_size < 1:
            raise EvalError("--seeds, --steps and --batch-size must be at least 1")
        if self.first_seed < 0 or self.prompt_seed_stride < 0:
            raise EvalError("--first-seed and --prompt-seed-stride must be >= 0")
        if self.dtype not in EVAL_DTYPES:
            raise EvalError(f"--dtype must be one of {', '.join(EVAL_DTYPES)}, got {self.dtype!r}")
        self.templates = check_templates(list(self.templates), "prompt templates")
        return self

    def seed_list(self) -> list[int]:
        """The sampling seeds of the first prompt (prompt p adds ``p * prompt_seed_stride``)."""
        return list(range(self.first_seed, self.first_seed + self.seeds))


# ------------------------------------------------------------------------------------ the API
def evaluate(
    config: EvalConfig,
    *,
    ranks: dist.DistContext = dist.SINGLE,
    device: torch.device | None = None,
    progress: bool = True,
) -> KpsReport:
    """Generate G_tok, G_ada and G_base with the adapter, embed them with CLIP and score kps-v1.

    ``ranks``: the torchrun group (:func:`~cat_engine.engine.distributed.init_distributed`); each rank
    generates its share of the (prompt, seed) jobs and every rank returns the whole report.
    ``device``: default this rank's (``device_for("auto", ranks)``). Raises :class:`EvalError` and
    the engine's other user errors (a ``--base`` or ``--clip`` that cannot be used).
    """
    config.validate()
    device = device or dist.device_for("auto", ranks)
    lora = lora_file(config.lora)
    meta = lora_metadata(lora)
    base = base_from_metadata(config.base, meta)
    token = config.token or meta.get("token") or DEFAULT_TOKEN
    class_word = config.class_word or meta.get("class_word") or DEFAULT_CLASS_WORD
    refs_dir = Path(config.refs).expanduser() if config.refs else builtin_concept_dir()
    templates, seeds = config.templates, config.seed_list()
    jobs = make_jobs(templates, seeds, token, class_word, config.prompt_seed_stride)
    ref_images = read_images(refs_dir)

    model, settings, embedder = prepare_models(config, base, device)

    def in_grid(i: int) -> bool:
        return i // len(seeds) < GRID_MAX_PROMPTS and i % len(seeds) < GRID_MAX_SEEDS

    emb = generate(model, jobs, settings, embedder, ranks, progress, in_grid)
    refs = embedder.images(ref_images)
    texts = embedder.texts([jobs[p * len(seeds)].plain_prompt for p in range(len(templates))])
    n_images = len(SETS) * len(jobs)
    first_jobs = [p * len(seeds) for p in range(min(len(templates), GRID_MAX_PROMPTS))]
    return KpsReport(
        **score(emb, refs, texts, templates, jobs),
        seeds=seeds,
        token=token,
        class_word=class_word,
        model=model_info(base, model, lora),
        embedding=embedder.info(),
        references={"folder": str(refs_dir), "count": len(ref_images)},
        sampling={
            "scheduler": scheduler_name(model),
            "steps": config.steps,
            "guidance": settings.guidance,
            "prompt_seed_stride": config.prompt_seed_stride,
            "resolution": settings.resolution,
            "dtype": str(model.unet.dtype).removeprefix("torch."),
        },
        throughput={
            "images": n_images,
            "generation_seconds": emb["seconds"],
            "images_per_second": n_images / emb["seconds"],
            "ranks": ranks.world,
        },
        grid=grid_rows(jobs, first_jobs, emb["grid"], min(len(seeds), GRID_MAX_SEEDS)),
    )


# ------------------------------------------------------------------------------------- inputs
def lora_file(path: str) -> Path:
    """The adapter's ``.safetensors``: ``path`` itself, or the LoRA file in the folder ``path``."""
    p = Path(path).expanduser()
    file = p / LORA_WEIGHT_NAME if p.is_dir() else p
    if not file.is_file():
        raise EvalError(
            f"--lora {p}: no adapter there (expected a folder with {LORA_WEIGHT_NAME}, or the file)"
        )
    return file


def lora_metadata(lora: Path) -> dict:
    """The adapter file's engine metadata; a file that is not a whole safetensors file (empty,
    truncated, garbage) is an :class:`EvalError` naming it."""
    from safetensors import SafetensorError

    try:
        return read_lora_metadata(lora)
    except (SafetensorError, OSError, ValueError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise EvalError(f"--lora {lora}: not a readable safetensors adapter ({reason})") from None


def check_templates(templates: list[str], where: str) -> list[str]:
    """``templates`` when each has exactly one ``{}`` (the subject) and there is at least one."""
    if not templates:
        raise EvalError(f"{where}: no prompt templates in it")
    bad = [t for t in templates if t.count("{}") != 1]
    if bad:
        raise EvalError(
            f"{where}: each template needs exactly one '{{}}' for the subject "
            f"(e.g. 'a photo of {{}}'); not {bad[0]!r}"
        )
    return templates


def read_templates(path: str | Path) -> list[str]:
    """The prompt templates of a ``--prompts`` file: one a line; blank lines and ``#`` comments skipped."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise EvalError(f"--prompts {path}: cannot read it ({exc.strerror or exc})") from None
    templates = [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
    return check_templates(templates, f"--prompts {path}")


def make_jobs(
    templates: list[str], seeds: list[int], token: str, class_word: str, stride: int = 0
) -> list[Job]:
    """One job per (template, seed), template-major; the plain prompt is the token prompt without T.

    Template ``p`` samples ``seeds`` shifted by ``p * stride``.
    """
    jobs = []
    for p, template in enumerate(templates):
        token_prompt = template.replace("{}", f"{token} {class_word}")
        plain = plain_caption(token_prompt, token, class_word, "class")
        jobs.extend(Job(token_prompt, plain, seed + p * stride) for seed in seeds)
    return jobs


def read_images(folder: Path) -> list:
    """The readable images of ``--refs`` as RGB PIL images (unreadable files are skipped, named once)."""
    from PIL import Image, UnidentifiedImageError

    if not folder.is_dir():
        raise EvalError(f"--refs {folder}: folder not found")
    images, skipped = [], []
    for file in sorted(folder.iterdir()):
        if file.suffix.lower() not in IMAGE_SUFFIXES:
            continue
        try:
            with Image.open(file) as im:
                images.append(im.convert("RGB"))
        except (OSError, UnidentifiedImageError):
            skipped.append(file.name)
    if skipped:
        log.warning("--refs %s: skipped unreadable reference images: %s", folder, ", ".join(skipped))
    if not images:
        raise EvalError(f"--refs {folder}: no readable images ({', '.join(IMAGE_SUFFIXES)})")
    return images


def base_from_metadata(base: str | None, meta: dict) -> str:
    """``--base`` when given; else the folder the adapter was trained on, when it still exists here."""
    if base is not None:
        return base
    trained_on = meta.get("base")
    if trained_on and Path(trained_on).is_dir():
        return trained_on
    return BUILTIN


# ------------------------------------------------------------------------------------- models
def prepare_models(config: EvalConfig, base: str | None, device: torch.device):
    """The base model with the adapter in its UNet, the sampling settings, and the CLIP embedder."""
    model = load_adapted_model(base, lora_file(config.lora), config.dtype, device)
    resolution = config.resolution or model.native_resolution
    if resolution % (model.vae_scale_factor * 2) != 0:
        raise EvalError(f"--resolution {resolution}: must be a multiple of {model.vae_scale_factor * 2}")
    settings = SampleSettings(resolution, config.steps, sampling_guidance(config, model), config.batch_size)
    return model, settings, ClipEmbedder(config.clip, device)


def sampling_guidance(config: EvalConfig, model) -> float:
    """``--guidance``, else the model family's default."""
    if config.guidance is not None:
        return config.guidance
    family = dit_family(model.family)
    return SD_GUIDANCE if family is None else family.sample_guidance


def load_adapted_model(base: str | None, lora: Path, dtype: str, device: torch.device):
    """The base model with the adapter loaded into its UNet (and text encoders, when it has theirs), on ``device``, in ``dtype`` (``auto``:
    float16 on a GPU, else float32); the VAE stays in float32."""
    from safetensors import SafetensorError

    model = load_base(base)
    try:
        model.unet.load_lora_adapter(
            str(lora.parent), prefix=lora_prefix(model.unet), weight_name=lora.name, local_files_only=True
        )
    except (OSError, ValueError, KeyError, RuntimeError, SafetensorError) as exc:
        raise EvalError(
            f"--lora {lora}: cannot load it into the --base UNet: {str(exc).splitlines()[0]}"
        ) from None
    if not has_peft_adapter(model.unet):
        raise EvalError(f"--lora {lora}: no LoRA weights for this --base's {lora_prefix(model.unet)} in it")
    load_text_encoder_lora(model, lora)  # a --train-text-encoder run's: the base rows read the frozen ones
    if dtype == "auto":  # half precision where it is fast; transformers (and T5) in bf16, as released
        half = "bfloat16" if dit_family(model.family) is not None else "float16"
        dtype = half if device.type == "cuda" else "float32"
    for module in [model.unet, *model.text_encoders]:
        _move(module, device, DTYPES[dtype])
    _move(model.vae, device, torch.float32)  # the SD VAE overflows in float16; decoding is a small share
    return model


def _move(module, device, dtype) -> None:
    module.to(device)
    if module.dtype != dtype:  # diffusers warns on every .to(dtype), even a no-op one
        module.to(dtype)


def base_id(base: str | None, model) -> str:
    """The base model's id for reports: the toy world's name, the random tiny model's cache name, else its folder."""
    if model.path == builtin.TOYWORLD_DIR:
        return builtin.BUILTIN_NAME
    if base is None or str(base) == BUILTIN:
        return model.path.name  # the random tiny pipeline's cache folder: its name and fingerprint
    return str(model.path)


def scheduler_name(model) -> str:
    family = dit_family(model.family)
    return SCHEDULER_NAME if family is None else family.scheduler_name


def model_info(base: str | None, model, lora: Path) -> dict:
    """The report's ``model`` entry: the base's id and family, and the adapter file."""
    return {"id": base_id(base, model), "family": model.family, "lora": str(lora)}


# ------------------------------------------------------------------------ generate and score
def generate(
    model, jobs: list[Job], settings, embedder, ranks: dist.DistContext, progress: bool, in_grid
) -> dict:
    """Generate and embed G_tok, G_ada and G_base of ``jobs``, over the ranks.

    Each rank takes its share of the jobs (dealt round-robin, so every rank gets every prompt),
    generates and embeds it, and keeps the grid's images (``in_grid(job index)``); the shares are
    gathered on every rank. Returns the embeddings of each set in job order, the grid's images by
    job index (``grid``) and the slowest rank's generation time (``seconds``).
    """
    mine = list(range(ranks.rank, len(jobs), ranks.world))
    start = time.perf_counter()
    images = sample_jobs(model, [jobs[i] for i in mine], settings, progress=ranks.main and progress)
    if model.unet.device.type == "cuda":
        torch.cuda.synchronize(model.unet.device)
    pixels = {name: to_uint8(images[name]).numpy() for name in SETS}
    local = {"index": mine, "seconds": time.perf_counter() - start}
    for name in SETS:
        local[name] = embedder.images(list(pixels[name]))
    local["grid"] = {i: {name: pixels[name][k] for name in SETS} for k, i in enumerate(mine) if in_grid(i)}
    return assemble(dist.gather_objects(ranks, local), len(jobs))


def assemble(parts: list[dict], n_jobs: int) -> dict:
    """Embeddings in job order, grid images by job index, and the slowest rank's generation time."""
    index = torch.tensor([i for p in parts for i in p["index"]])
    order = torch.argsort(index)
    if index.numel() != n_jobs or not torch.equal(index[order], torch.arange(n_jobs)):
        raise RuntimeError("eval: the ranks' jobs do not cover every (prompt, seed) exactly once")
    out = {name: torch.cat([p[name] for p in parts])[order] for name in SETS}
    out["grid"] = {k: v for p in parts for k, v in p["grid"].items()}
    out["seconds"] = max(p["seconds"] for p in parts)
    return out


def score(emb: dict, refs: torch.Tensor, texts: torch.Tensor, templates: list[str], jobs: list[Job]) -> dict:
    """Overall kps-v1 metrics and the per-prompt breakdown (each prompt over its seeds)."""
    per_image_text = texts.repeat_interleave(len(jobs) // len(templates), dim=0)
    result = kps_metrics.all_metrics(emb["tok"], emb["ada"], emb["base"], refs, per_image_text)
    n_seeds = len(jobs) // len(templates)
    per_prompt = []
    for p, template in enumerate(templates):
        rows = slice(p * n_seeds, (p + 1) * n_seeds)
        metrics = kps_metrics.all_metrics(
            emb["tok"][rows], emb["ada"][rows], emb["base"][rows], refs, per_image_text[rows]
        )
        job = jobs[p * n_seeds]
        prompts = {"template": template, "token_prompt": job.token_prompt, "plain_prompt": job.plain_prompt}
        per_prompt.append({**prompts, **metrics})
    result["per_prompt"] = per_prompt
    return result


# ---------------------------------------------------------------------------------------- CLI
def add_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per :class:`EvalConfig` field (``--prompts FILE`` for the templates), then the run's own."""
    for f in dataclasses.fields(EvalConfig):
        default = (
            f.default_factory() if f.default is MISSING and f.default_factory is not MISSING else f.default
        )
        text = help_line(
            f.metadata["help"], None if default is MISSING else default, f.metadata["default_text"]
        )
        if f.name == "templates":
            parser.add_argument("--prompts", default=None, metavar="FILE", help=text)
        elif f.name == "dtype":
            parser.add_argument("--dtype", default=None, choices=EVAL_DTYPES, help=text)
        else:
            add_flag(parser, f.name, f.type, required=default is MISSING, help=text)
    parser.add_argument("--output", required=True, help="folder for kps.json and grid.png")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument(
        "--concepts",
        default=None,
        metavar="FILE.yaml",
        help="several concepts (token, class_word, refs each): per-concept KPS and the cross-concept "
        "bleed matrix (cat/bleed.py) instead of the one-concept report",
    )


def config_from_args(args: argparse.Namespace) -> EvalConfig:
    names = [f.name for f in dataclasses.fields(EvalConfig) if f.name != "templates"]
    given = {name: getattr(args, name) for name in names if getattr(args, name) is not None}
    if args.prompts is not None:
        given["templates"] = read_templates(args.prompts)
    return EvalConfig(**given)


def run(args: argparse.Namespace) -> int:
    """Shard over torchrun's ranks when launched by it; rank 0 writes and prints."""
    with console_logging():
        config = config_from_args(args)
        ranks = dist.init_distributed("auto")
        if args.concepts:
            from cat_engine.cat import bleed

            report = bleed.evaluate_concepts(
                config, bleed.read_concepts(args.concepts), ranks=ranks, progress=not args.no_progress
            )
        else:
            report = evaluate(config, ranks=ranks, progress=not args.no_progress)
        dist.shutdown(ranks)  # after the last collective; on an error torchrun stops every rank
    if ranks.main:
        write_report(report, args.output)
        print("\n".join(report.summary(args.output)))
    return 0
