"""Does the toy world's model know its world? Recognition accuracy and diversity of its samples.

For each class, generate ``--seeds`` images of ``a photo of a <class>`` with the built-in toy-world
pipeline (DDIM, classifier-free guidance) and classify them with the toy-world CLIP against the 8
class prompts (zero-shot, top-1; the issue's measure), and, as a second opinion, with a small CNN
trained here on world images. Diversity within a class is ``1 - mean pairwise cosine`` of the
CLIP image embeddings (the KPS ``DIV``), next to the same number for real world images of that
class. Two ceilings are reported: the CLIP's accuracy on real (held-out) world images, and on
those images passed through the VAE (what a perfect UNet could reach)::

    OMP_NUM_THREADS=1 python tools/toyworld_report.py   # writes bench/results/toyworld_recognition.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from cat_engine.cat import toyworld as tw
from cat_engine.cat.kps import diversity

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "bench" / "results" / "toyworld_recognition.json"
DEFAULT_GRID = ROOT / "engine" / "assets" / "toyworld" / "samples.png"


def train_shape_classifier(steps: int = 400, seed: int = 0) -> torch.nn.Module:
    """A small CNN trained on world images to name the class: a second judge of the samples,
    independent of the toy CLIP (a different network, trained here, on class labels only)."""
    torch.manual_seed(seed)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(3, 32, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
        torch.nn.Conv2d(32, 64, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
        torch.nn.Conv2d(64, 64, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
        torch.nn.Conv2d(64, 64, 3, padding=1), torch.nn.ReLU(), torch.nn.AdaptiveMaxPool2d(1),
        torch.nn.Flatten(), torch.nn.Linear(64, len(tw.CLASSES)),
    )
    images, _, scenes = tw.dataset(6000, seed=seed + 123)
    x_all = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1
    y_all = torch.tensor([tw.CLASSES.index(sc.cls) for sc in scenes])
    opt = torch.optim.AdamW(net.parameters(), lr=2e-3)
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        idx = torch.randint(0, len(y_all), (64,), generator=g)
        loss = torch.nn.functional.cross_entropy(net(x_all[idx]), y_all[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return net.eval()


@torch.no_grad()
def cnn_predict(net, images) -> torch.Tensor:
    x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 127.5 - 1
    return net(x).argmax(1)


@torch.no_grad()
def vae_roundtrip(vae, images: np.ndarray) -> list[np.ndarray]:
    """uint8 images encoded (latent mean) and decoded by the pipeline's VAE."""
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1
    out = [vae.decode(vae.encode(x[i : i + 64]).latent_dist.mean).sample for i in range(0, len(x), 64)]
    y = ((torch.cat(out).clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return list(y.permute(0, 2, 3, 1).numpy())


def classify(embedder, images, class_text: torch.Tensor) -> torch.Tensor:
    img = torch.nn.functional.normalize(embedder.images(images), dim=-1)
    return (img @ torch.nn.functional.normalize(class_text, dim=-1).T).argmax(1)


@torch.no_grad()
def generate(pipe, prompt: str, seeds: list[int], steps: int, guidance: float) -> list[np.ndarray]:
    out = []
    for start in range(0, len(seeds), 16):
        chunk = seeds[start : start + 16]
        gens = [torch.Generator().manual_seed(s) for s in chunk]
        images = pipe([prompt] * len(chunk), num_inference_steps=steps, guidance_scale=guidance, generator=gens,
                      height=tw.SIZE, width=tw.SIZE, output_type="np").images
        out.extend((np.clip(images, 0, 1) * 255).round().astype(np.uint8))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=16, help="images per class")
    parser.add_argument("--steps", type=int, default=25, help="DDIM steps")
    parser.add_argument("--guidance", type=float, default=7.5)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--grid", type=Path, default=DEFAULT_GRID)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from diffusers import DDIMScheduler, StableDiffusionPipeline
    from PIL import Image

    from cat_engine.cat.eval import ClipEmbedder
    from cat_engine.engine.builtin import builtin_model_dir
    from cat_engine.engine.builtin_clip import BUILTIN_CLIP_NAME

    t0 = time.time()
    pipe = StableDiffusionPipeline.from_pretrained(builtin_model_dir(), local_files_only=True)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    embedder = ClipEmbedder(None, torch.device("cpu"))
    class_text = embedder.texts([tw.class_prompt(c) for c in tw.CLASSES])

    # the CLIP's ceiling: real world images it never saw in training (another seed of the world)
    real_images, _, real_scenes = tw.dataset(50 * len(tw.CLASSES), seed=999)
    real_labels = torch.tensor([tw.CLASSES.index(s.cls) for s in real_scenes])
    real_pred = classify(embedder, list(real_images), class_text)
    real_emb = embedder.images(list(real_images))
    recon_pred = classify(embedder, vae_roundtrip(pipe.vae, real_images), class_text)
    cnn = train_shape_classifier()
    cnn_real = cnn_predict(cnn, list(real_images))

    seeds = list(range(args.seeds))
    per_class, grid_rows, correct, cnn_correct = {}, [], 0, 0
    for k, cls in enumerate(tw.CLASSES):
        images = generate(pipe, tw.class_prompt(cls), seeds, args.steps, args.guidance)
        pred = classify(embedder, images, class_text)
        emb = embedder.images(images)
        hits = int((pred == k).sum())
        correct += hits
        cnn_pred = cnn_predict(cnn, images)
        cnn_correct += int((cnn_pred == k).sum())
        real_rows = real_labels == k
        per_class[cls] = {
            "prompt": tw.class_prompt(cls),
            "top1": hits / len(seeds),
            "predicted": [tw.CLASSES[i] for i in pred.tolist()],
            "cnn_top1": float((cnn_pred == k).float().mean()),
            "cnn_predicted": [tw.CLASSES[i] for i in cnn_pred.tolist()],
            "diversity_generated": diversity(emb),
            "diversity_real": diversity(real_emb[real_rows]),
            "clip_top1_on_real": float((real_pred[real_rows] == k).float().mean()),
        }
        grid_rows.append(images[:8])
        print(f"{cls:9s} CLIP top-1 {hits}/{len(seeds)}  CNN top-1 {int((cnn_pred == k).sum())}/{len(seeds)}  diversity {per_class[cls]['diversity_generated']:.3f} "
              f"(real {per_class[cls]['diversity_real']:.3f})", flush=True)
    report = {
        "command": "OMP_NUM_THREADS=1 python tools/toyworld_report.py",
        "model": str(builtin_model_dir().relative_to(ROOT)),
        "embedding": BUILTIN_CLIP_NAME,
        "classes": list(tw.CLASSES),
        "seeds_per_class": args.seeds,
        "sampling": {"scheduler": "DDIM", "steps": args.steps, "guidance": args.guidance, "resolution": tw.SIZE},
        "top1_accuracy": correct / (len(seeds) * len(tw.CLASSES)),
        "clip_top1_on_real_images": float((real_pred == real_labels).float().mean()),
        "clip_top1_on_vae_reconstructions": float((recon_pred == real_labels).float().mean()),
        "cnn_top1_accuracy": cnn_correct / (len(seeds) * len(tw.CLASSES)),
        "cnn_top1_on_real_images": float((cnn_real == real_labels).float().mean()),
        "diversity_generated_mean": float(np.mean([v["diversity_generated"] for v in per_class.values()])),
        "diversity_real_mean": float(np.mean([v["diversity_real"] for v in per_class.values()])),
        "per_class": per_class,
        "seconds": round(time.time() - t0, 1),
        "threads": args.threads,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    grid = Image.new("RGB", (8 * tw.SIZE, len(grid_rows) * tw.SIZE), "white")
    for r, row in enumerate(grid_rows):
        for c, image in enumerate(row):
            grid.paste(Image.fromarray(image), (c * tw.SIZE, r * tw.SIZE))
    grid.save(args.grid, optimize=True)
    print(f"CLIP top-1 {report['top1_accuracy']:.3f} (real images {report['clip_top1_on_real_images']:.3f}, "
          f"their VAE reconstructions {report['clip_top1_on_vae_reconstructions']:.3f}); "
          f"CNN top-1 {report['cnn_top1_accuracy']:.3f} (real images {report['cnn_top1_on_real_images']:.3f}); "
          f"diversity {report['diversity_generated_mean']:.3f} (real {report['diversity_real_mean']:.3f}); "
          f"wrote {args.out} and {args.grid}")


if __name__ == "__main__":
    main()
