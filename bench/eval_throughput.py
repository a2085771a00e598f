"""Images/s of the KPS sampler against the diffusers pipeline called once per prompt, side by side.

``python -m cat_engine.bench.eval_throughput [--prompts 4] [--seeds 4] [--steps 10]`` builds the
tiny built-in pipeline with a random LoRA, then generates the same G_tok, G_ada and G_base images
every way, interleaved with one torch thread (``measure.time_interleaved``), and prints the ratios
(docs/design.md §7: ratios side by side in one run).

Baselines, LoRA loaded with ``load_lora_weights`` and switched off with ``disable_lora`` for
G_base: ``StableDiffusionPipeline`` called once per image (one prompt, one seed), and once per
prompt template and set with the seeds batched through a list of generators. Engine:
:func:`cat_engine.cat.sampling.sample_jobs`, all sets in one split-batch loop. Both decode with the
VAE and return tensors; the images are checked to agree before any time counts.
"""

from __future__ import annotations

import argparse
import json
import tempfile

import torch

from cat_engine.bench.measure import Spread, time_interleaved, torch_threads
from cat_engine.cat.eval import DEFAULT_TEMPLATES, make_jobs
from cat_engine.cat.sampling import SETS, SampleSettings, sample_jobs


def _pipeline_of(base):
    """The diffusers pipeline of ``base`` (a diffusers SD folder), or the tiny built-in one."""
    if base is None:
        from cat_engine.engine.builtin import tiny_pipeline

        return tiny_pipeline()
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline.from_pretrained(
        base, safety_checker=None, requires_safety_checker=False, use_safetensors=True, local_files_only=True
    )


def _setup(lora_dir, base=None, device="cpu"):
    from diffusers import DDIMScheduler

    from cat_engine.engine.lora import LORA_WEIGHT_NAME, add_lora, save_lora
    from cat_engine.engine.models import BaseModel

    source = _pipeline_of(base)
    add_lora(source.unet, rank=4, seed=1)
    g = torch.Generator().manual_seed(3)
    for name, p in source.unet.named_parameters():
        if "lora_B" in name:  # non-zero, so adapter and base images differ
            p.data = torch.randn(p.shape, generator=g) * 0.2
    save_lora(source.unet, lora_dir)

    pipe = _pipeline_of(base)
    pipe.load_lora_weights(str(lora_dir))
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    pipe.to(device)

    mine = _pipeline_of(base)
    mine.unet.load_lora_adapter(str(lora_dir), prefix="unet", weight_name=LORA_WEIGHT_NAME)
    mine.to(device)
    model = BaseModel(None, "sd", mine.unet, mine.vae, [mine.tokenizer], [mine.text_encoder], mine.scheduler)
    return pipe, model


def _pipeline(pipe, jobs, seeds, settings, per_image: bool) -> dict[str, torch.Tensor]:
    """G_tok, G_ada, G_base from the diffusers pipeline: one call per prompt and set (the seeds
    batched through a list of generators) or, ``per_image``, one call per image."""
    out = {"tok": [], "ada": [], "base": []}
    kw = dict(
        num_inference_steps=settings.steps,
        guidance_scale=settings.guidance,
        height=settings.resolution,
        width=settings.resolution,
        output_type="pt",
    )
    calls = [[s] for s in seeds] if per_image else [list(seeds)]
    for first in range(0, len(jobs), len(seeds)):
        job = jobs[first]
        for name, prompt, adapter in (
            ("tok", job.token_prompt, True),
            ("ada", job.plain_prompt, True),
            ("base", job.plain_prompt, False),
        ):
            pipe.enable_lora() if adapter else pipe.disable_lora()
            for call in calls:
                gens = [torch.Generator().manual_seed(s) for s in call]
                out[name].append(pipe(prompt, generator=gens, num_images_per_prompt=len(call), **kw).images)
    pipe.enable_lora()
    return {name: torch.cat(parts) for name, parts in out.items()}


def measure(
    prompts: int = 4,
    seeds: int = 4,
    steps: int = 10,
    repeats: int = 3,
    guidance: float = 7.5,
    threads: int | None = 1,
    base: str | None = None,
    device: str = "cpu",
    resolution: int = 64,
) -> dict:
    """Median seconds of every way over ``repeats`` interleaved rounds; returns the figures.

    ``base``: a diffusers SD folder instead of the tiny built-in pipeline (float32 on ``device``).
    """
    templates = [
        DEFAULT_TEMPLATES[i % len(DEFAULT_TEMPLATES)] + ("" if i < 4 else f" {i}") for i in range(prompts)
    ]
    seed_list = list(range(seeds))
    jobs = make_jobs(templates, seed_list, "sks", "star")
    settings = SampleSettings(resolution=resolution, steps=steps, guidance=guidance)
    with tempfile.TemporaryDirectory() as tmp:
        pipe, model = _setup(tmp, base, device)
    ways = {
        "engine": lambda: sample_jobs(model, jobs, settings, progress=False),
        "per_prompt": lambda: _pipeline(pipe, jobs, seed_list, settings, per_image=False),
        "per_image": lambda: _pipeline(pipe, jobs, seed_list, settings, per_image=True),
    }
    with torch.no_grad(), torch_threads(threads):
        # warm-up round, and the check that all ways make the same images
        images = {name: fn() for name, fn in ways.items()}
        max_diff = max(
            (images["engine"][k] - other[k]).abs().max().item() for other in images.values() for k in SETS
        )
        tolerance = 1e-4 if device == "cpu" else 1e-2  # a GPU: other batch sizes pick other kernels
        if max_diff > tolerance:
            raise RuntimeError(f"engine and pipeline images differ by {max_diff:.2e}")
        times = time_interleaved(ways, repeats, device, threads=threads)
    n_images = 3 * len(jobs)
    rate = {name: n_images / Spread.of(t).median for name, t in times.items()}
    return {
        "images": n_images,
        "prompts": prompts,
        "seeds": seeds,
        "steps": steps,
        "guidance": guidance,
        "batch_jobs": settings.batch_jobs,
        "threads": threads or torch.get_num_threads(),
        "images_per_second": rate,
        "ratio_per_prompt": rate["engine"] / rate["per_prompt"],
        "ratio_per_image": rate["engine"] / rate["per_image"],
        "max_image_diff": max_diff,
        "base": base or "tiny built-in",
        "device": device,
        "resolution": resolution,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--seeds", type=int, default=4)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--base", help="a diffusers SD folder (default: the tiny built-in pipeline)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    parser.add_argument("--resolution", type=int, default=64, help="pixels (default 64)")
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args(argv)
    r = measure(
        args.prompts, args.seeds, args.steps, args.repeats, threads=args.threads, base=args.base,
        device=args.device, resolution=args.resolution,
    )  # fmt: skip
    if args.json:
        from pathlib import Path

        from cat_engine.engine.files import write_text_atomically

        write_text_atomically(Path(args.json), json.dumps(r, indent=1))
    print(
        f"{r['images']} images ({r['prompts']} prompts x {r['seeds']} seeds x 3 sets, {r['steps']} DDIM steps, "
        f"CFG {r['guidance']}, {r['threads']} thread(s), {r['base']} at {r['resolution']} px, {r['device']})"
    )
    rate = r["images_per_second"]
    print(f"diffusers pipeline, once per image:                    {rate['per_image']:8.2f} images/s")
    print(f"diffusers pipeline, once per prompt and set (seeds batched): {rate['per_prompt']:8.2f} images/s")
    print(
        f"cat-engine split-batch sampler (batch {r['batch_jobs']} jobs):        {rate['engine']:8.2f} images/s"
    )
    print(
        f"ratio {r['ratio_per_image']:.2f}x over once per image, {r['ratio_per_prompt']:.2f}x over once per prompt "
        f"(images agree to {r['max_image_diff']:.1e})"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
