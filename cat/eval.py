"""``cat-engine eval``: the Knowledge Preservation Score (KPS, docs/design.md §2) of a trained adapter.

Reads top to bottom: settings, models, generate (one split-batch denoising loop for G_tok, G_ada
and G_base), embed (CLIP), gather (across ranks under torchrun), score, write
``OUTPUT/kps.json`` and ``OUTPUT/grid.png``.

Scale-out: ``torchrun --nproc_per_node N -m cat_engine.cat.eval ...`` deals the (prompt, seed)
jobs round-robin over the ranks and gathers their embeddings on rank 0, which scores and writes;
the numbers equal a single-process run (up to floating-point noise).
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from cat_engine.cat import kps as kps_metrics
from cat_engine.cat.captions import plain_caption
from cat_engine.cat.sampling import SETS, Job, SampleSettings, sample_jobs, to_uint8
from cat_engine.engine.errors import CatEngineError

DEFAULT_TEMPLATES = (
    "a photo of {}",
    "{} on the beach",
    "a painting of {}",
    "{} in the snow",
)
FALLBACK_TOKEN, FALLBACK_CLASS_WORD = "sks", "star"  # used until cat/dataset.py provides its defaults
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
GRID_MAX_PROMPTS, GRID_MAX_SEEDS = 4, 8
SCHEDULER_NAME = "DDIM"
PROMPT_KEYS = ("template", "token_prompt", "plain_prompt")
RANDOM_CLIP_NAME = "builtin-tiny-clip-random"


def add_arguments(parser) -> None:
    parser.add_argument(
        "--base",
        default=None,
        help="diffusers model folder (default: the base the adapter was trained on, from its metadata, "
        "else the built-in model)",
    )
    parser.add_argument(
        "--lora", required=True, help="adapter folder from cat-engine train (or its .safetensors)"
    )
    parser.add_argument(
        "--refs", default=None, help="reference images of the concept (default: the built-in set)"
    )
    parser.add_argument(
        "--token", default=None, help="trigger token (default: from the adapter, else the built-in concept's)"
    )
    parser.add_argument(
        "--class-word",
        default=None,
        help="class word (default: from the adapter, else the built-in concept's)",
    )
    parser.add_argument(
        "--prompts", default=None, help="prompt templates, one a line, '{}' marks the subject"
    )
    parser.add_argument("--seeds", type=int, default=4, help="seeds 0..N-1 per prompt (default 4)")
    parser.add_argument(
        "--clip", default=None, help=f"CLIP model folder, or {RANDOM_CLIP_NAME} (default: the built-in CLIP)"
    )
    parser.add_argument(
        "--resolution", type=int, default=None, help="image size (default: the model's native)"
    )
    parser.add_argument("--steps", type=int, default=25, help="DDIM steps (default 25)")
    parser.add_argument(
        "--guidance", type=float, default=7.5, help="classifier-free guidance scale (default 7.5)"
    )
    parser.add_argument("--batch-size", type=int, default=8, help="(prompt, seed) jobs per denoising batch")
    parser.add_argument("--dtype", choices=("auto", "float32", "float16", "bfloat16"), default="auto")
    parser.add_argument("--output", required=True, help="folder for kps.json and grid.png")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument(
        "--concepts",
        default=None,
        metavar="FILE.yaml",
        help="several concepts (token, class_word, refs each): per-concept KPS and the cross-concept "
        "bleed matrix (cat/bleed.py) instead of the one-concept report",
    )


# ---------------------------------------------------------------- settings


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup_distributed() -> Dist:
    """Join the torchrun group when launched by torchrun (engine/distributed.py: gloo on CPU, nccl on GPU)."""
    from cat_engine.engine.distributed import device_for, init_distributed

    ctx = init_distributed("auto")
    return Dist(ctx.rank, ctx.world, device_for("auto", ctx))


def concept_defaults() -> tuple[Path | None, str, str]:
    """The built-in concept folder, token and class word (cat/dataset.py, when present)."""
    try:
        from cat_engine.cat import dataset
    except ImportError:
        folder = Path(__file__).parent / "assets" / "concepts" / "sks-star"
        return (folder if folder.is_dir() else None), FALLBACK_TOKEN, FALLBACK_CLASS_WORD
    return dataset.builtin_concept_dir(), dataset.DEFAULT_TOKEN, dataset.DEFAULT_CLASS_WORD


def lora_file(path: str) -> Path:
    from cat_engine.engine.lora import LORA_WEIGHT_NAME

    p = Path(path).expanduser()
    file = p / LORA_WEIGHT_NAME if p.is_dir() else p
    if not file.is_file():
        raise CatEngineError(
            f"--lora {p}: no adapter there (expected a folder with {LORA_WEIGHT_NAME}, or the file)"
        )
    return file


def read_templates(path: str | None) -> list[str]:
    if path is None:
        return list(DEFAULT_TEMPLATES)
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise CatEngineError(f"--prompts {path}: cannot read it ({exc.strerror or exc})") from None
    templates = [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
    if not templates:
        raise CatEngineError(f"--prompts {path}: no prompt templates in it")
    bad = [t for t in templates if t.count("{}") != 1]
    if bad:
        raise CatEngineError(
            f"--prompts {path}: each line needs exactly one '{{}}' for the subject "
            f"(e.g. 'a photo of {{}}'); not {bad[0]!r}"
        )
    return templates


def make_jobs(templates: list[str], seeds: list[int], token: str, class_word: str) -> list[Job]:
    """One job per (template, seed), template-major; the plain prompt is the token prompt without T."""
    jobs = []
    for template in templates:
        token_prompt = template.replace("{}", f"{token} {class_word}")
        plain = plain_caption(token_prompt, token, class_word, "class")
        jobs.extend(Job(token_prompt, plain, seed) for seed in seeds)
    return jobs


def read_images(folder: Path):
    """The readable images of ``--refs`` as RGB PIL images (unreadable files are skipped, named once)."""
    from PIL import Image, UnidentifiedImageError

    if not folder.is_dir():
        raise CatEngineError(f"--refs {folder}: folder not found")
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
        print(f"cat-engine eval: skipped unreadable reference images: {', '.join(skipped)}", file=sys.stderr)
    if not images:
        raise CatEngineError(f"--refs {folder}: no readable images ({', '.join(IMAGE_SUFFIXES)})")
    return images


# ---------------------------------------------------------------- models


def load_models(args, dist: Dist):
    """The base model with the adapter loaded into its UNet, on the device, and the resolved dtype."""
    from cat_engine.engine.lora import has_peft_adapter
    from cat_engine.engine.models import ModelLoadError, load_base

    file = lora_file(args.lora)
    try:
        model = load_base(args.base)
    except ModelLoadError as exc:
        raise CatEngineError(str(exc)) from None
    try:
        model.unet.load_lora_adapter(
            str(file.parent), prefix="unet", weight_name=file.name, local_files_only=True
        )
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        raise CatEngineError(
            f"--lora {file}: cannot load it into the --base UNet: {str(exc).splitlines()[0]}"
        ) from None
    if not has_peft_adapter(model.unet):
        raise CatEngineError(f"--lora {file}: no UNet LoRA weights in it")
    dtype = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}.get(args.dtype)
    if dtype is None:  # auto: half precision where it is fast
        dtype = torch.float16 if dist.device.type == "cuda" else torch.float32
    for module in [model.unet, *model.text_encoders]:
        _move(module, dist.device, dtype)
    _move(model.vae, dist.device, torch.float32)  # the SD VAE overflows in float16; decoding is a small share
    return model


def _move(module, device, dtype) -> None:
    module.to(device)
    if module.dtype != dtype:  # diffusers warns on every .to(dtype), even a no-op one
        module.to(dtype)


class ClipEmbedder:
    """CLIP image and text embeddings, in batches, from a local transformers folder.

    Any transformers dual encoder with ``get_image_features``/``get_text_features`` and a CLIP
    tokenizer and image processor in its folder: a real ``CLIPModel``, or the built-in toy-world
    embedding model (an ``AlignModel``: a small EfficientNet image tower and text tower).
    """

    def __init__(self, clip: str | None, device: torch.device, batch: int = 64):
        from transformers import AutoModel, CLIPTokenizer

        path, self.id = resolve_clip(clip)
        if not (path / "config.json").is_file():
            raise CatEngineError(f"--clip {path}: not a transformers CLIP folder (no config.json)")
        try:
            # float32 whatever the folder stores (the built-in one is saved in float16 to stay small)
            self.model = AutoModel.from_pretrained(path, local_files_only=True, torch_dtype=torch.float32)
            self.model = self.model.to(device).eval()
            self.tokenizer = CLIPTokenizer.from_pretrained(path, local_files_only=True)
            self.processor = _image_processor_class().from_pretrained(path, local_files_only=True)
        except (OSError, ValueError) as exc:
            raise CatEngineError(f"--clip {path}: cannot load it: {str(exc).splitlines()[0]}") from None
        if not all(hasattr(self.model, f) for f in ("get_image_features", "get_text_features")):
            raise CatEngineError(f"--clip {path}: {type(self.model).__name__} is not an image-text embedding model")
        self.device, self.batch = device, batch

    @torch.no_grad()
    def images(self, images) -> torch.Tensor:
        """Float32 CPU embeddings ``[N, D]`` of PIL images or uint8 arrays ``[H, W, 3]``."""
        out = []
        for start in range(0, len(images), self.batch):
            chunk = list(images[start : start + self.batch])
            pixels = self.processor(images=chunk, return_tensors="pt")["pixel_values"]
            out.append(_features(self.model.get_image_features(pixel_values=pixels.to(self.device))))
        return torch.cat(out)

    @torch.no_grad()
    def texts(self, texts: list[str]) -> torch.Tensor:
        out = []
        for start in range(0, len(texts), self.batch):
            chunk = texts[start : start + self.batch]
            tokens = self.tokenizer(chunk, padding=True, truncation=True, return_tensors="pt")
            out.append(_features(self.model.get_text_features(**tokens.to(self.device))))
        return torch.cat(out)


def resolve_clip(clip: str | None) -> tuple[Path, str]:
    """The CLIP folder and its id for reports.

    ``None``: the built-in default; ``builtin-tiny-clip-random``: the random tiny CLIP; else a folder.
    """
    from cat_engine.engine import builtin_clip

    # getattr: the toy-world CLIP (a pretrained default) is optional in this version of the engine.
    random_name = getattr(builtin_clip, "RANDOM_CLIP_NAME", RANDOM_CLIP_NAME)
    if clip == random_name:
        return builtin_clip.builtin_clip_dir(0), random_name
    if clip is None:
        path = builtin_clip.builtin_clip_dir()
        pretrained = getattr(builtin_clip, "TOYWORLD_CLIP_DIR", None)
        return path, (builtin_clip.BUILTIN_CLIP_NAME if path == pretrained else random_name)
    path = Path(clip).expanduser()
    return path, str(path)


def _image_processor_class():
    # torchvision is not a dependency: take transformers' PIL implementation by name where it exists.
    try:
        from transformers import CLIPImageProcessorPil

        return CLIPImageProcessorPil
    except ImportError:
        from transformers import CLIPImageProcessor

        return CLIPImageProcessor


def _features(output) -> torch.Tensor:
    # transformers 5 returns a model output whose pooler_output is the projected embedding.
    tensor = output if torch.is_tensor(output) else output.pooler_output
    return tensor.float().cpu()


def base_from_metadata(base: str | None, meta: dict) -> str:
    """``--base`` when given; else the folder the adapter was trained on, when it still exists here."""
    if base is not None:
        return base
    from cat_engine.engine.models import BUILTIN

    trained_on = meta.get("base")
    if trained_on and Path(trained_on).is_dir():
        return trained_on
    return BUILTIN


def base_id(base: str | None, model) -> str:
    """The base model's id for reports: the toy world's name, the random tiny model's cache name, else its folder."""
    from cat_engine.engine import builtin
    from cat_engine.engine.models import BUILTIN

    if model.path == getattr(builtin, "TOYWORLD_DIR", None):  # the pretrained toy world, where shipped
        return builtin.BUILTIN_NAME
    if base is None or str(base) == BUILTIN:
        return model.path.name  # the random tiny pipeline's cache folder: its name and fingerprint
    return str(model.path)


# ---------------------------------------------------------------- gather and score


def gather(local: dict, dist: Dist) -> list[dict]:
    """Every rank's ``local`` dict, in rank order (on every rank)."""
    from cat_engine.engine.distributed import DistContext, gather_objects

    return gather_objects(DistContext(dist.rank, dist.world), local)


def prepare_models(args, dist: Dist):
    """The base model with the adapter, the sampling settings, and the CLIP embedder."""
    model = load_models(args, dist)
    resolution = args.resolution or model.native_resolution
    if resolution % (model.vae_scale_factor * 2) != 0:
        raise CatEngineError(f"--resolution {resolution}: must be a multiple of {model.vae_scale_factor * 2}")
    settings = SampleSettings(resolution, args.steps, args.guidance, args.batch_size)
    return model, settings, ClipEmbedder(args.clip, dist.device)


def generate_share(model, jobs, settings, embedder, dist: Dist, progress: bool, in_grid) -> list[dict]:
    """This rank's share of ``jobs`` (dealt round-robin, so every rank gets every prompt): generate,
    embed, keep the grid's images (``in_grid(job index)``), then gather every rank's share.

    The gather is the last collective: the process group is closed here.
    """
    mine = list(range(dist.rank, len(jobs), dist.world))
    start = time.perf_counter()
    images = sample_jobs(model, [jobs[i] for i in mine], settings, progress=dist.main and progress)
    if dist.device.type == "cuda":
        torch.cuda.synchronize(dist.device)
    pixels = {name: to_uint8(images[name]).numpy() for name in SETS}
    local = {"index": mine, "seconds": time.perf_counter() - start}
    for name in SETS:
        local[name] = embedder.images(list(pixels[name]))
    local["grid"] = {i: {name: pixels[name][k] for name in SETS} for k, i in enumerate(mine) if in_grid(i)}
    parts = gather(local, dist)
    from cat_engine.engine.distributed import DistContext, shutdown

    shutdown(DistContext(dist.rank, dist.world))
    return parts


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


# ---------------------------------------------------------------- write


def _json_safe(value):
    # JSON has no NaN: a metric that is undefined (diversity of one image) is written as null.
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_json_safe(v) for v in value]
    return value


def write_atomically(path: Path, write) -> None:
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    os.replace(tmp, path)


def write_outputs(output: Path, report: dict, grid_images: dict, templates, seeds, jobs) -> None:
    from cat_engine.cat.grid import make_grid

    output.mkdir(parents=True, exist_ok=True)
    text = json.dumps(_json_safe(report), indent=2, allow_nan=False) + "\n"
    write_atomically(output / "kps.json", lambda p: p.write_text(text, encoding="utf-8"))
    n_seeds = len(seeds)
    shown_seeds = seeds[:GRID_MAX_SEEDS]
    rows = []
    for p in range(min(len(templates), GRID_MAX_PROMPTS)):
        for name in SETS:
            job = jobs[p * n_seeds]
            prompt = job.token_prompt if name == "tok" else job.plain_prompt
            rows.append((name, prompt, [grid_images[p * n_seeds + s][name] for s in range(len(shown_seeds))]))
    grid = make_grid(rows, shown_seeds)
    write_atomically(output / "grid.png", lambda p: grid.save(p, format="PNG"))


def in_grid(job_index: int, n_seeds: int) -> bool:
    return job_index // n_seeds < GRID_MAX_PROMPTS and job_index % n_seeds < GRID_MAX_SEEDS


# ---------------------------------------------------------------- run


def run(args, dist: Dist | None = None) -> int:
    """``dist``: the ranks to shard over; default: torchrun's, when launched by it (else one process)."""
    dist = dist or setup_distributed()
    if getattr(args, "concepts", None):
        from cat_engine.cat.bleed import run_bleed

        return run_bleed(args, dist)
    if args.seeds < 1 or args.steps < 1 or args.batch_size < 1:
        raise CatEngineError("--seeds, --steps and --batch-size must be at least 1")
    builtin_refs, default_token, default_class = concept_defaults()
    from cat_engine.engine.lora import read_lora_metadata

    meta = read_lora_metadata(lora_file(args.lora))
    args.base = base_from_metadata(args.base, meta)
    token = args.token or meta.get("token") or default_token
    class_word = args.class_word or meta.get("class_word") or default_class
    if args.refs is None and builtin_refs is None:
        raise CatEngineError("no built-in concept set in this version; pass --refs FOLDER")
    refs_dir = Path(args.refs).expanduser() if args.refs else builtin_refs
    templates = read_templates(args.prompts)
    seeds = list(range(args.seeds))
    jobs = make_jobs(templates, seeds, token, class_word)
    ref_images = read_images(refs_dir)

    model, settings, embedder = prepare_models(args, dist)

    parts = generate_share(
        model, jobs, settings, embedder, dist, not args.no_progress, lambda i: in_grid(i, len(seeds))
    )
    if not dist.main:
        return 0

    emb = assemble(parts, len(jobs))
    refs = embedder.images(ref_images)
    texts = embedder.texts([jobs[p * len(seeds)].plain_prompt for p in range(len(templates))])
    report = score(emb, refs, texts, templates, jobs)
    n_images = len(SETS) * len(jobs)
    report.update(
        definition=kps_metrics.KPS_VERSION,
        images_per_second=n_images / emb["seconds"],
        seeds=seeds,
        prompts=[{k: v for k, v in row.items() if k in PROMPT_KEYS} for row in report["per_prompt"]],
        token=token,
        class_word=class_word,
        model={"id": base_id(args.base, model), "family": model.family, "lora": str(lora_file(args.lora))},
        embedding={"id": embedder.id, "random_weights": embedder.id == RANDOM_CLIP_NAME},
        references={"folder": str(refs_dir), "count": len(ref_images)},
        sampling={
            "scheduler": SCHEDULER_NAME,
            "steps": args.steps,
            "guidance": args.guidance,
            "resolution": settings.resolution,
            "dtype": str(model.unet.dtype).removeprefix("torch."),
        },
        throughput={
            "images": n_images,
            "generation_seconds": emb["seconds"],
            "images_per_second": n_images / emb["seconds"],
            "ranks": dist.world,
        },
    )
    write_outputs(Path(args.output), report, emb["grid"], templates, seeds, jobs)
    print(
        f"KPS {report['kps']:.4f}  identity {report['identity']:.4f}  preservation {report['preservation']:.4f}  "
        f"prompt similarity {report['prompt_similarity']:.4f}  leakage {report['leakage']:+.4f}  "
        f"diversity adapter/base {report['diversity_adapter']:.4f}/{report['diversity_base']:.4f}"
    )
    print(
        f"{n_images} images in {emb['seconds']:.1f} s: {report['images_per_second']:.2f} images/s; "
        f"wrote {args.output}/kps.json and grid.png"
    )
    if embedder.id == RANDOM_CLIP_NAME:
        print(
            "note: the built-in CLIP has random weights; pass --clip with a real CLIP folder for meaningful scores"
        )
    return 0
