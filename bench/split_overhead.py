"""What CAT's third group of rows costs: the split batch against LoRA alone and naive three-pass CAT.

    python -m cat_engine.bench.split_overhead [--model tiny|tiny-xl|small|sd15|...]
        [--batch 1] [--checkpointing both|on|off] [--repeats 7] [--clock cpu|wall|cuda_events]
        [--no-checkpoint-strategies split two_calls checkpoint] [--no-record]

Side by side in one run, on the same weights and inputs (docs/design.md §7), interleaved round-robin
with one torch thread on a CPU (``measure.time_interleaved``); median of ``--repeats`` timed steps
after one warm-up each:

    lora      engine LoRA step (fused layers) on the 2B adapter rows [token; plain], forward+backward
    fwd_b     engine no-grad forward of B rows
    cat       engine CAT step: ``cat_loss`` (one split-batch call), forward+backward
    peft_lora peft LoRA step on the same 2B rows            } the peers: diffusers + peft,
    peft_fwd  peft no-grad forward of B rows                } unfused
    naive     naive three-pass CAT with peft: adapter/token, adapter/plain, disable_adapters()/plain

The engine's UNet is prepared as ``cat-engine train`` prepares it (fp32 memory plan); the peers'
shares its frozen weights and carries an equal peft adapter (bench/peers.py). Printed and
recorded: overhead = (cat - lora) / fwd_b (target <= 1.0), the same for naive with the peft
figures, cat / naive, plus FLOP and saved-bytes ratios (``bench/measure.py``). Appends one JSON
line per configuration to ``bench/results/split_overhead.jsonl``.
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass
from pathlib import Path

import torch

from cat_engine.bench import measure, peers
from cat_engine.bench.environment import environment
from cat_engine.bench.harness import engine_loss
from cat_engine.bench.presets import build_unet, make_batch, shared_weights_copy
from cat_engine.bench.report import append_jsonl
from cat_engine.cat.loss import mse
from cat_engine.engine.batch import CatBatch
from cat_engine.engine.denoiser import unet_forward
from cat_engine.engine.lora import add_lora, fuse_lora, lora_parameters
from cat_engine.engine.memory_plan import MemoryPlan, apply_memory_plan
from cat_engine.engine.split_unet import NO_CHECKPOINT_STRATEGIES, split_batch_call
from cat_engine.engine.unet_configs import MODEL_NAMES, resolve_model

RESULTS = Path(__file__).parent / "results" / "split_overhead.jsonl"


def _cat_rows(*parts):
    """The parts' rows one after the other (dicts key by key; ``None`` stays ``None``)."""
    if parts[0] is None:
        return None
    if isinstance(parts[0], dict):
        return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
    return torch.cat(parts)


@dataclass
class Case:
    """One model, one batch: an engine (fused) UNet and a peft twin with identical weights."""

    name: str
    checkpointing: bool
    engine: torch.nn.Module
    peft: torch.nn.Module
    data: CatBatch

    @property
    def batch(self) -> int:
        return self.data.rows

    def adapter_rows(self) -> CatBatch:
        """The 2B adapter rows of the CAT step, [token; plain], as a plain LoRA batch (target: the noise)."""
        d = self.data
        return CatBatch(
            d.noisy_latents.repeat(2, 1, 1, 1),
            d.timesteps.repeat(2),
            _cat_rows(d.token_embeds, d.plain_embeds),
            _cat_rows(d.token_embeds, d.plain_embeds),  # unused by a LoRA step
            _cat_rows(d.target, d.target),
            _cat_rows(d.added_cond_kwargs, peers.plain_added(d)),
        )

    # ---- the steps, each returning the loss (or the prediction for forwards) -------------------

    def forward_b(self, unet):
        d = self.data
        with torch.no_grad():
            return unet_forward(unet, d.noisy_latents, d.timesteps, d.plain_embeds, peers.plain_added(d))

    def lora_loss(self):
        """The engine's LoRA step (``cat_loss`` with ``cat_weight=0``) on the 2B adapter rows."""
        return engine_loss(self.engine, self.adapter_rows(), 0.0)

    def engine_lora_loss(self):
        """The same LoRA step through the engine's checkpoint Function (every row an adapter row)."""
        b2 = self.adapter_rows()
        pred = split_batch_call(
            self.engine, b2.noisy_latents, b2.timesteps, b2.token_embeds, b2.rows, b2.added_cond_kwargs
        )
        return mse(pred, b2.target)

    def cat_loss(self):
        return engine_loss(self.engine, self.data, 1.0)

    def split_loss(self, no_checkpoint: str):
        """The engine CAT loss with a chosen no-checkpointing strategy (``split_batch_call``)."""
        d, b = self.data, self.batch
        embeds = _cat_rows(d.token_embeds, d.plain_embeds, d.plain_embeds)
        added = _cat_rows(d.added_cond_kwargs, peers.plain_added(d), peers.plain_added(d))
        pred = split_batch_call(
            self.engine, d.noisy_latents, d.timesteps, embeds, 2 * b, added, no_checkpoint=no_checkpoint
        )
        return mse(pred[:b], d.target) + mse(pred[b : 2 * b], pred[2 * b :].detach())

    def naive_loss(self):
        """Three UNet calls with peft, as "output preservation" features of other trainers do."""
        return peers.naive_cat_loss(self.peft, self.data)

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
            "lora": train(self.lora_loss, self.engine),
            "fwd_b": lambda: self.forward_b(self.engine),
            "cat": train(self.cat_loss, self.engine),
            "peft_lora": train(lambda: peers.peft_lora_loss(self.peft, self.adapter_rows()), self.peft),
            "peft_fwd": lambda: self.forward_b(self.peft),
            "naive": train(self.naive_loss, self.peft),
        }


def make_case(
    model: str = "tiny",
    batch: int = 1,
    checkpointing: bool = False,
    rank: int = 8,
    latent_size: int | None = None,
    seed: int = 0,
    device: str = "cpu",
) -> Case:
    """Build the engine UNet (as train prepares it, fp32) and its peft twin, with non-zero ``lora_B``
    so the adapter acts. SDXL-shaped models get the plain captions' own pooled text."""
    spec = resolve_model(model)
    side = latent_size or spec.config["sample_size"]
    data = make_batch(spec, batch, side * spec.vae_scale_factor, device, seed=seed)
    if data.added_cond_kwargs is not None:
        pooled = data.added_cond_kwargs["text_embeds"]
        gen = torch.Generator().manual_seed(seed + 1)
        plain = torch.randn(pooled.shape, generator=gen).to(device)
        data = dataclasses.replace(
            data, plain_added_cond_kwargs={**data.added_cond_kwargs, "text_embeds": plain}
        )
    engine = add_lora(build_unet(spec, device, seed=seed), rank=rank, seed=seed + 1)
    with torch.no_grad(), torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + 2)
        for p in lora_parameters(engine):
            if p.dim() == 2 and not p.abs().sum():  # lora_B starts at zero: give it weight
                p.copy_(torch.randn(p.shape) * 0.02)
    fuse_lora(engine)
    plan = MemoryPlan(gradient_checkpointing=checkpointing)
    ctx = apply_memory_plan(engine, plan, device, checkpoint_func=measure.counting_checkpoint)
    twin = peers.prepare_peer(shared_weights_copy(engine), engine, ctx.plan, measure.counting_checkpoint)
    for unet in (engine, twin):
        unet.eval()  # dropout off: the split batch needs it (and the peers get the same)
    return Case(model, checkpointing, engine, twin, data)


def accounting(case: Case) -> dict:
    """FLOPs and saved bytes of the CAT step against LoRA(2B) + no-grad forward(B) / LoRA(2B).

    One CAT step runs first: the engine's recompute learns each unit's frozen tail on its first
    backward (``engine/split_unet.py``), so the counts are those of every later step.
    """
    steps = case.steps()
    steps["cat"]()
    weights = list(case.engine.parameters())
    flops = {
        "lora": measure.count_flops(steps["lora"]),
        "fwd_b": measure.count_flops(lambda: case.forward_b(case.engine)),
        "cat": measure.count_flops(steps["cat"]),
    }
    saved = {
        "lora": measure.saved_bytes(case.lora_loss, exclude=weights),
        "cat": measure.saved_bytes(case.cat_loss, exclude=weights),
    }
    return {
        "flops": flops,
        "saved_bytes": saved,
        "flops_ratio": flops["cat"] / (flops["lora"] + flops["fwd_b"]),
        "saved_ratio": saved["cat"] / saved["lora"],
    }


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
    threads: int | None = 1,
) -> dict:
    case = make_case(model, batch, checkpointing, rank, device=device)
    check = gradient_check(case)
    acct = accounting(case) if count else {}
    steps = case.steps(() if checkpointing else tuple(strategies))
    times = measure.time_interleaved(steps, repeats, device, warmup=1, clock=clock, threads=threads)
    spread = {name: measure.Spread.of(ts) for name, ts in times.items()}
    t = {name: s.median for name, s in spread.items()}
    return {
        "bench": "split_overhead",
        **environment(device),
        "model": model,
        "batch": batch,
        "rank": rank,
        "checkpointing": checkpointing,
        "dtype": "float32",
        **check,
        "threads": threads if torch.device(device).type == "cpu" else None,
        "repeats": repeats,
        "clock": clock,
        "times_s": t,
        "iqr_s": {name: [s.q1, s.q3] for name, s in spread.items()},
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
    }


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog="python -m cat_engine.bench.split_overhead", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--model", choices=MODEL_NAMES, default="tiny")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--checkpointing", choices=("both", "on", "off"), default="both")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument(
        "--clock",
        choices=measure.CLOCKS,
        default=None,
        help="cpu: process CPU time (the CPU default); wall: synchronized wall time (the CUDA default); "
        "cuda_events",
    )
    parser.add_argument("--threads", type=int, default=1, help="torch threads on a CPU (default 1)")
    parser.add_argument("--no-count", action="store_true", help="skip the FLOP and saved-bytes counts")
    parser.add_argument(
        "--no-checkpoint-strategies",
        nargs="*",
        default=(),
        choices=NO_CHECKPOINT_STRATEGIES,
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
            args.clock or ("wall" if args.device == "cuda" else "cpu"),
            args.no_checkpoint_strategies,
            args.device,
            not args.no_count,
            args.threads,
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
            append_jsonl(RESULTS, r)


if __name__ == "__main__":
    main()
