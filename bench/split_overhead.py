"""What CAT's third group of rows costs: the split batch against LoRA alone and naive three-pass CAT.

    OMP_NUM_THREADS=1 python -m cat_engine.bench.split_overhead [--model tiny|tiny-xl|small]
        [--batch 1] [--checkpointing both|on|off] [--repeats 7] [--clock cpu|wall]
        [--no-checkpoint-strategies split two_calls checkpoint] [--no-record]

Side by side in one run, on the same weights and inputs (docs/design.md §7), interleaved round-robin so
that load from other processes hits every candidate alike; median of ``--repeats`` timed steps
after one warm-up each:

    lora      engine LoRA step (fused layers) on the 2B adapter rows [token; plain], forward+backward
    fwd_b     engine no-grad forward of B rows
    cat       engine CAT step: ``cat_loss`` (one split-batch call), forward+backward
    peft_lora peft LoRA step on the same 2B rows            } the peers: diffusers + peft,
    peft_fwd  peft no-grad forward of B rows                } unfused
    naive     naive three-pass CAT with peft: adapter/token, adapter/plain, disable_adapters()/plain

Printed and recorded: overhead = (cat - lora) / fwd_b (target <= 1.0), the same for naive with the
peft figures, cat / naive, plus FLOP and saved-bytes ratios (``engine/step_accounting.py``). Appends
one JSON line per configuration to ``bench/results/split_overhead.jsonl``.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from cat_engine.cat.loss import cat_loss, mse
from cat_engine.engine.lora import add_lora, fuse_lora, lora_parameters
from cat_engine.engine.split_unet import split_batch_call
from cat_engine.engine.step_accounting import counting_checkpoint, saved_bytes, step_flops

RESULTS = Path(__file__).parent / "results" / "split_overhead.jsonl"
MODELS = ("tiny", "tiny-xl", "small", "sd15")
TEXT_TOKENS = 77


@dataclass
class Case:
    """One model, one batch: an engine (fused) UNet and a peft twin with identical weights."""

    name: str
    batch: int
    checkpointing: bool
    engine: torch.nn.Module
    peft: torch.nn.Module
    latents: torch.Tensor
    timesteps: torch.Tensor
    token: torch.Tensor
    plain: torch.Tensor
    target: torch.Tensor
    added: dict | None  # token rows' SDXL conditioning
    plain_added: dict | None

    # ---- the steps, each returning the loss (or the prediction for forwards) -------------------

    def _call(self, unet, latents, timesteps, embeds, added):
        kwargs = {"added_cond_kwargs": added} if added is not None else {}
        return unet(latents, timesteps, encoder_hidden_states=embeds, return_dict=False, **kwargs)[0]

    def _two_b(self):
        def cat2(a, b):
            return torch.cat([a, b])

        added = None
        if self.added is not None:
            added = {k: cat2(self.added[k], self.plain_added[k]) for k in self.added}
        z2 = self.latents.repeat(2, 1, 1, 1)
        return (
            z2,
            self.timesteps.repeat(2),
            cat2(self.token, self.plain),
            cat2(self.target, self.target),
            added,
        )

    def lora_loss(self, unet):
        """A LoRA step's loss on the 2B adapter rows [token; plain] (target for both: the noise)."""
        z2, t2, e2, target2, added2 = self._two_b()
        return mse(self._call(unet, z2, t2, e2, added2), target2)

    def engine_lora_loss(self):
        """The same LoRA step through the engine's checkpoint Function (every row an adapter row)."""
        z2, t2, e2, target2, added2 = self._two_b()
        return mse(split_batch_call(self.engine, z2, t2, e2, 2 * self.batch, added2), target2)

    def forward_b(self, unet):
        with torch.no_grad():
            return self._call(unet, self.latents, self.timesteps, self.plain, self.plain_added)

    def cat_loss(self):
        return cat_loss(
            self.engine,
            self.latents,
            self.timesteps,
            self.token,
            self.plain,
            self.target,
            added_cond_kwargs=self.added,
            plain_added_cond_kwargs=self.plain_added,
        ).loss

    def split_loss(self, no_checkpoint: str):
        """The engine CAT loss with a chosen no-checkpointing strategy (``split_batch_call``)."""
        b = self.batch
        embeds = torch.cat([self.token, self.plain, self.plain])
        added = None
        if self.added is not None:
            added = {
                k: torch.cat([self.added[k], self.plain_added[k], self.plain_added[k]]) for k in self.added
            }
        pred = split_batch_call(
            self.engine, self.latents, self.timesteps, embeds, 2 * b, added, no_checkpoint=no_checkpoint
        )
        return mse(pred[:b], self.target) + mse(pred[b : 2 * b], pred[2 * b :].detach())

    def naive_loss(self):
        """Three UNet calls with peft, as "output preservation" features of other trainers do."""
        unet = self.peft
        pred_token = self._call(unet, self.latents, self.timesteps, self.token, self.added)
        pred_plain = self._call(unet, self.latents, self.timesteps, self.plain, self.plain_added)
        with torch.no_grad():
            unet.disable_adapters()
            try:
                pred_base = self._call(unet, self.latents, self.timesteps, self.plain, self.plain_added)
            finally:
                unet.enable_adapters()
        return mse(pred_token, self.target) + mse(pred_plain, pred_base)

    def steps(self, strategies: tuple[str, ...] = ()) -> dict:
        """name -> zero-argument callable running that step (forward, and backward for training).

        ``strategies``: extra engine CAT candidates ``cat[<no_checkpoint strategy>]``.
        """

        def train(loss_fn, unet):
            def step():
                for p in lora_parameters(unet):
                    p.grad = None
                loss_fn().backward()

            return step

        extra = {
            f"cat[{name}]": train(lambda name=name: self.split_loss(name), self.engine) for name in strategies
        }
        if self.checkpointing:  # the LoRA step with the engine's checkpoint instead of torch's
            extra["lora[engine]"] = train(self.engine_lora_loss, self.engine)
        return extra | {
            "lora": train(lambda: self.lora_loss(self.engine), self.engine),
            "fwd_b": lambda: self.forward_b(self.engine),
            "cat": train(self.cat_loss, self.engine),
            "peft_lora": train(lambda: self.lora_loss(self.peft), self.peft),
            "peft_fwd": lambda: self.forward_b(self.peft),
            "naive": train(self.naive_loss, self.peft),
        }


def build_unet(model: str):
    from cat_engine.bench.presets import SMALL_CONFIG
    from cat_engine.engine.builtin import tiny_unet

    if model == "tiny":
        return tiny_unet("sd"), 16
    if model == "tiny-xl":
        return tiny_unet("sdxl"), 16
    if model == "small":
        from diffusers import UNet2DConditionModel

        return UNet2DConditionModel(**SMALL_CONFIG), SMALL_CONFIG["sample_size"]
    if model == "sd15":  # full size, random weights: for GPU runs
        from diffusers import UNet2DConditionModel

        from cat_engine.engine.unet_configs import UNET_CONFIGS

        return UNet2DConditionModel(**UNET_CONFIGS["sd15"]), UNET_CONFIGS["sd15"]["sample_size"]
    raise ValueError(f"model must be one of {MODELS}, got {model!r}")


def make_case(
    model: str = "tiny",
    batch: int = 1,
    checkpointing: bool = False,
    rank: int = 8,
    latent_size: int | None = None,
    seed: int = 0,
    device: str = "cpu",
) -> Case:
    """Build the engine UNet (fused) and its peft twin, with non-zero ``lora_B`` so the adapter acts."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        peft, side = build_unet(model)
        side = latent_size or side
        peft.eval()  # dropout off: the split batch needs it (and the peers get the same)
        add_lora(peft, rank=rank, seed=seed + 1)
        with torch.no_grad():
            for p in lora_parameters(peft):
                if p.dim() == 2 and not p.abs().sum():  # lora_B starts at zero: give it weight
                    p.normal_(0.0, 0.02)
        peft.to(device)
        engine = fuse_lora(copy.deepcopy(peft))
        for unet in (engine, peft):
            if checkpointing:
                unet.enable_gradient_checkpointing(gradient_checkpointing_func=counting_checkpoint)
        cfg = peft.config
        width = cfg.cross_attention_dim
        latents = torch.randn(batch, cfg.in_channels, side, side, device=device)
        timesteps = torch.randint(0, 1000, (batch,), device=device)
        token = torch.randn(batch, TEXT_TOKENS, width, device=device)
        plain = torch.randn(batch, TEXT_TOKENS, width, device=device)
        target = torch.randn_like(latents)
        added = plain_added = None
        if cfg.addition_embed_type == "text_time":
            pooled = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
            time_ids = torch.tensor(
                [[side * 4.0, side * 4.0, 0.0, 0.0, side * 4.0, side * 4.0]], device=device
            ).repeat(batch, 1)
            added = {"text_embeds": torch.randn(batch, pooled, device=device), "time_ids": time_ids}
            plain_added = {"text_embeds": torch.randn(batch, pooled, device=device), "time_ids": time_ids}
    return Case(
        model,
        batch,
        checkpointing,
        engine,
        peft,
        latents,
        timesteps,
        token,
        plain,
        target,
        added,
        plain_added,
    )


def accounting(case: Case) -> dict:
    """FLOPs and saved bytes of the CAT step against LoRA(2B) + no-grad forward(B) / LoRA(2B).

    One CAT step runs first: the engine's recompute learns each unit's frozen tail on its first
    backward (``engine/split_unet.py``), so the counts are those of every later step.
    """
    case.steps()["cat"]()
    flops = {
        "lora": step_flops(case.steps()["lora"]),
        "fwd_b": step_flops(lambda: case.forward_b(case.engine)),
        "cat": step_flops(case.steps()["cat"]),
    }
    saved = {
        "lora": saved_bytes(lambda: case.lora_loss(case.engine), case.engine),
        "cat": saved_bytes(case.cat_loss, case.engine),
    }
    return {
        "flops": flops,
        "saved_bytes": saved,
        "flops_ratio": flops["cat"] / (flops["lora"] + flops["fwd_b"]),
        "saved_ratio": saved["cat"] / saved["lora"],
    }


def time_steps(steps: dict, repeats: int, clock: str = "cpu") -> dict:
    """Median seconds per step; candidates interleaved round-robin after one warm-up each.

    ``clock="cpu"`` times process CPU time: with one thread per process (``OMP_NUM_THREADS=1``) it
    is what the step costs, and far less sensitive than wall time to other processes sharing the
    cores. ``"wall"`` is ``perf_counter``; ``"cuda"`` is wall time with the device synchronized.
    """
    timer = time.process_time if clock == "cpu" else time.perf_counter
    sync = torch.cuda.synchronize if clock == "cuda" else (lambda: None)
    for step in steps.values():
        step()
    times = {name: [] for name in steps}
    for _ in range(repeats):
        for name, step in steps.items():
            sync()
            start = timer()
            step()
            sync()
            times[name].append(timer() - start)
    return {name: statistics.median(ts) for name, ts in times.items()}


def gradient_check(case: Case) -> dict:
    """Engine CAT step against the naive three-pass peft step: loss and LoRA-gradient relative errors."""
    steps = case.steps()
    steps["cat"]()
    steps["cat"]()  # the second step runs the recompute with the frozen tails skipped
    loss = case.cat_loss().item()
    engine = [p.grad.clone() for p in lora_parameters(case.engine)]
    steps["naive"]()
    naive_loss = case.naive_loss().item()
    naive = [p.grad for p in lora_parameters(case.peft)]
    errors = [((a - b).norm() / b.norm()).item() for a, b in zip(engine, naive)]
    return {"loss_rel_err": abs(loss - naive_loss) / abs(naive_loss), "max_grad_rel_err": max(errors)}


def _commit() -> str:
    if os.environ.get("CAT_ENGINE_GIT_COMMIT"):  # a copy without .git (the GPU machine)
        return os.environ["CAT_ENGINE_GIT_COMMIT"]
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            check=False,
            capture_output=True,
            text=True,
            cwd=Path(__file__).parent,
        )
        return out.stdout.strip() or "unknown"
    except OSError:
        return "unknown"


def run(
    model: str,
    batch: int,
    checkpointing: bool,
    repeats: int,
    rank: int,
    clock: str = "cpu",
    strategies=(),
    device: str = "cpu",
    count: bool = True,
) -> dict:
    case = make_case(model, batch, checkpointing, rank, device=device)
    check = gradient_check(case)
    acct = accounting(case) if count else {}
    t = time_steps(case.steps(() if checkpointing else tuple(strategies)), repeats, clock)
    record = {
        "bench": "split_overhead",
        "model": model,
        "batch": batch,
        "rank": rank,
        "checkpointing": checkpointing,
        "dtype": "float32",
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
        **check,
        "threads": torch.get_num_threads(),
        "repeats": repeats,
        "clock": clock,
        "times_s": t,
        "cat_overhead_fwd_b": (t["cat"] - t["lora"]) / t["fwd_b"],
        "naive_overhead_fwd_b": (t["naive"] - t["peft_lora"]) / t["peft_fwd"],
        "cat_over_naive": t["cat"] / t["naive"],
        "cat_overhead_vs_engine_lora_fwd_b": (t["cat"] - t["lora[engine]"]) / t["fwd_b"]
        if "lora[engine]" in t
        else None,
        "strategies_overhead_fwd_b": {
            name: (t[name] - t["lora"]) / t["fwd_b"] for name in t if name.startswith("cat[")
        },
        **acct,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "commit": _commit(),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    return record


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog="python -m cat_engine.bench.split_overhead", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--model", choices=MODELS, default="tiny")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--checkpointing", choices=("both", "on", "off"), default="both")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument(
        "--clock",
        choices=("cpu", "wall", "cuda"),
        default=None,
        help="process CPU time (CPU default), wall, cuda",
    )
    parser.add_argument("--no-count", action="store_true", help="skip the FLOP and saved-bytes counts")
    parser.add_argument(
        "--no-checkpoint-strategies",
        nargs="*",
        default=(),
        choices=("split", "two_calls", "checkpoint"),
        help="also time these split_batch_call strategies (runs without checkpointing only)",
    )
    parser.add_argument(
        "--no-record", action="store_true", help="print only; do not append to the results file"
    )
    args = parser.parse_args(argv)
    modes = {"both": (False, True), "on": (True,), "off": (False,)}[args.checkpointing]
    print(
        f"{'model':8} {'ckpt':5} {'lora':>8} {'fwd_b':>8} {'cat':>8} {'naive':>8} "
        f"{'cat ovh':>8} {'naive ovh':>9} {'cat/naive':>9} {'FLOPs':>6} {'saved':>6}"
    )
    for ckpt in modes:
        r = run(
            args.model,
            args.batch,
            ckpt,
            args.repeats,
            args.rank,
            args.clock or ("cuda" if args.device == "cuda" else "cpu"),
            args.no_checkpoint_strategies,
            args.device,
            not args.no_count,
        )
        t = r["times_s"]
        print(
            f"{args.model:8} {ckpt!s:5} {t['lora']:8.4f} {t['fwd_b']:8.4f} {t['cat']:8.4f} {t['naive']:8.4f} "
            f"{r['cat_overhead_fwd_b']:8.2f} {r['naive_overhead_fwd_b']:9.2f} {r['cat_over_naive']:9.3f} "
            f"{r.get('flops_ratio', float('nan')):6.3f} {r.get('saved_ratio', float('nan')):6.3f}"
        )
        print(
            f"  engine vs naive: loss rel err {r['loss_rel_err']:.1e}, max LoRA grad rel err {r['max_grad_rel_err']:.1e}"
        )
        if r["cat_overhead_vs_engine_lora_fwd_b"] is not None:
            print(
                f"  lora[engine] (LoRA step through the engine's checkpoint): {t['lora[engine]']:.4f} s; "
                f"cat overhead against it {r['cat_overhead_vs_engine_lora_fwd_b']:.2f} no-grad forwards of B rows"
            )
        for name, overhead in r["strategies_overhead_fwd_b"].items():
            print(f"  {name}: {t[name]:.4f} s, overhead {overhead:.2f} no-grad forwards of B rows")
        if not args.no_record:
            RESULTS.parent.mkdir(parents=True, exist_ok=True)
            with RESULTS.open("a") as f:
                f.write(json.dumps(r, sort_keys=True) + "\n")


if __name__ == "__main__":
    main()
