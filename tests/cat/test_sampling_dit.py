"""The batched split-batch sampler on the transformer families against their diffusers pipelines, one
image at a time: flow-matching Euler, each family's timesteps, guidance and negative prompt."""

from __future__ import annotations

import diffusers
import pytest
import torch

from cat_engine.cat import sampling
from cat_engine.cat.sampling import Job, SampleSettings, sample_jobs
from cat_engine.engine.families import DIT_FAMILIES
from cat_engine.engine.lora import LORA_WEIGHT_NAME, add_lora, save_lora
from cat_engine.engine.models import load_base

STEPS = 3
TEXT_TOKENS = 32  # the tiny T5/Qwen tokenizers' length, which the engine uses (the pipelines default higher)
JOBS = [
    Job(f"a photo of sks star {w}", f"a photo of star {w}", seed) for w in ("red", "blue") for seed in (0, 7)
]


@pytest.fixture(scope="module")
def lora_dirs(tmp_path_factory):
    """A LoRA per family with non-zero B (adapter images differ from base ones), saved by the engine."""
    out = {}
    for name, family in DIT_FAMILIES.items():
        transformer = load_base(f"builtin-tiny-{name}", load_encoders=False).unet
        add_lora(transformer, rank=4, targets=family.default_targets, seed=1)
        g = torch.Generator().manual_seed(3)
        for n, p in transformer.named_parameters():
            if "lora_B" in n:
                p.data = torch.randn(p.shape, generator=g) * 0.3
        out[name] = save_lora(transformer, tmp_path_factory.mktemp(name)).parent
    return out


def engine_model(name, lora_dir):
    model = load_base(f"builtin-tiny-{name}")
    model.unet.load_lora_adapter(str(lora_dir), prefix="transformer", weight_name=LORA_WEIGHT_NAME)
    return model


def pipeline_image(pipe, prompt, seed, guidance, adapter):
    if adapter:
        pipe.enable_lora()
    else:
        pipe.disable_lora()
    out = pipe(
        prompt,
        generator=torch.Generator().manual_seed(seed),
        num_inference_steps=STEPS,
        guidance_scale=guidance,
        height=64,
        width=64,
        output_type="pt",
        max_sequence_length=TEXT_TOKENS,
    )
    return out.images[0]


@pytest.mark.parametrize(
    ("name", "guidance"),
    [("sd3", 7.0), ("sd3", 1.0), ("flux", 3.5), ("zimage", 5.0), ("zimage", 0.0)],
    ids=["sd3-cfg", "sd3-nocfg", "flux-embedded", "zimage-cfg", "zimage-nocfg"],
)
def test_batched_images_equal_the_pipeline_one_at_a_time(lora_dirs, name, guidance):
    model = engine_model(name, lora_dirs[name])
    settings = SampleSettings(resolution=64, steps=STEPS, guidance=guidance, batch_jobs=3)
    got = sample_jobs(model, JOBS, settings, progress=False)
    pipe = getattr(diffusers, DIT_FAMILIES[name].pipeline_class).from_pretrained(
        str(model.path), local_files_only=True
    )
    pipe.load_lora_weights(str(lora_dirs[name]), weight_name=LORA_WEIGHT_NAME)
    pipe.set_progress_bar_config(disable=True)
    for i, job in enumerate(JOBS):
        want = {
            "tok": pipeline_image(pipe, job.token_prompt, job.seed, guidance, adapter=True),
            "ada": pipeline_image(pipe, job.plain_prompt, job.seed, guidance, adapter=True),
            "base": pipeline_image(pipe, job.plain_prompt, job.seed, guidance, adapter=False),
        }
        for set_name in sampling.SETS:
            torch.testing.assert_close(
                got[set_name][i], want[set_name], atol=2e-5, rtol=0, msg=f"{set_name} image of {job}"
            )
        assert (want["ada"] - want["base"]).abs().max() > 1e-2  # the LoRA shows


def test_one_transformer_call_per_step(lora_dirs):
    """Adapter and base rows share one call per step (the layers are fused by sample_jobs)."""
    model = engine_model("flux", lora_dirs["flux"])
    rows = []
    model.unet.register_forward_pre_hook(
        lambda m, args, kwargs: rows.append(kwargs["hidden_states"].shape[0]), with_kwargs=True
    )
    sample_jobs(
        model, JOBS[:2], SampleSettings(resolution=64, steps=2, guidance=3.5, batch_jobs=2), progress=False
    )
    assert sampling.split_batch_native(model.unet)
    assert rows == [6, 6]  # 2 jobs x 3 rows (no classifier-free guidance), one call per step
