"""The batched split-batch sampler against the diffusers pipeline, one image at a time: DDIM on the
UNets; on the transformer families flow-matching Euler, each family's timesteps, guidance and
negative prompt."""

import diffusers
import pytest
import torch
from diffusers import DDIMScheduler
from diffusers.utils.torch_utils import randn_tensor

from cat_engine.cat import sampling
from cat_engine.cat.sampling import Job, SampleSettings, initial_latents, sample_jobs
from cat_engine.engine.builtin import tiny_pipeline
from cat_engine.engine.families import DIT_FAMILIES
from cat_engine.engine.lora import LORA_WEIGHT_NAME, add_lora, save_lora
from cat_engine.engine.models import BaseModel, load_base

STEPS = 3
TEXT_TOKENS = 32  # the tiny T5/Qwen tokenizers' length, which the engine uses (the pipelines default higher)
JOBS = [
    Job(f"a photo of sks star {w}", f"a photo of star {w}", seed) for w in ("red", "blue") for seed in (0, 11)
]


def random_lora_dir(tmp_path, family):
    """A LoRA with non-zero B (so adapter images differ from base images), saved by the engine."""
    pipe = tiny_pipeline(family)
    add_lora(pipe.unet, rank=4, seed=1)
    g = torch.Generator().manual_seed(3)
    for name, p in pipe.unet.named_parameters():
        if "lora_B" in name:
            p.data = torch.randn(p.shape, generator=g) * 0.2
    save_lora(pipe.unet, tmp_path / "lora")
    return tmp_path / "lora"


def engine_model(family, lora_dir):
    pipe = tiny_pipeline(family)
    pipe.unet.load_lora_adapter(str(lora_dir), prefix="unet", weight_name="pytorch_lora_weights.safetensors")
    tokenizers = [pipe.tokenizer] + ([pipe.tokenizer_2] if family == "sdxl" else [])
    encoders = [pipe.text_encoder] + ([pipe.text_encoder_2] if family == "sdxl" else [])
    return BaseModel(None, family, pipe.unet, pipe.vae, tokenizers, encoders, pipe.scheduler)


def reference_pipeline(family, lora_dir):
    pipe = tiny_pipeline(family)
    pipe.load_lora_weights(str(lora_dir))
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def pipeline_image(pipe, prompt, seed, guidance, adapter, **kwargs):
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
        **kwargs,
    )
    return out.images[0]


def assert_images_equal_the_pipelines(got, pipe, guidance, **kwargs):
    for i, job in enumerate(JOBS):
        want = {
            "tok": pipeline_image(pipe, job.token_prompt, job.seed, guidance, True, **kwargs),
            "ada": pipeline_image(pipe, job.plain_prompt, job.seed, guidance, True, **kwargs),
            "base": pipeline_image(pipe, job.plain_prompt, job.seed, guidance, False, **kwargs),
        }
        for name in sampling.SETS:
            torch.testing.assert_close(
                got[name][i], want[name], atol=2e-5, rtol=0, msg=f"{name} image of {job}"
            )
        # the LoRA must show, or the comparison above proves nothing about adapter rows
        assert (want["ada"] - want["base"]).abs().max() > 1e-2


@pytest.mark.parametrize(("family", "guidance"), [("sd", 7.5), ("sd", 1.0), ("sdxl", 5.0)])
def test_batched_images_equal_the_pipeline_one_at_a_time(tmp_path, family, guidance):
    lora_dir = random_lora_dir(tmp_path, family)
    # batch_jobs=3 over 4 jobs: a full batch and a ragged one
    settings = SampleSettings(resolution=64, steps=STEPS, guidance=guidance, batch_jobs=3)
    got = sample_jobs(engine_model(family, lora_dir), JOBS, settings, progress=False)
    assert_images_equal_the_pipelines(got, reference_pipeline(family, lora_dir), guidance)


@pytest.fixture(scope="module")
def transformer_loras(tmp_path_factory):
    """A LoRA per transformer family with non-zero B, saved by the engine."""
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


def transformer_model(name, lora_dir):
    model = load_base(f"builtin-tiny-{name}")
    model.unet.load_lora_adapter(str(lora_dir), prefix="transformer", weight_name=LORA_WEIGHT_NAME)
    return model


@pytest.mark.parametrize(
    ("family", "guidance"),
    [("sd3", 7.0), ("sd3", 1.0), ("flux", 3.5), ("zimage", 5.0), ("zimage", 0.0)],
    ids=["sd3-cfg", "sd3-nocfg", "flux-embedded", "zimage-cfg", "zimage-nocfg"],
)
def test_transformer_images_equal_the_pipeline_one_at_a_time(transformer_loras, family, guidance):
    model = transformer_model(family, transformer_loras[family])
    settings = SampleSettings(resolution=64, steps=STEPS, guidance=guidance, batch_jobs=3)
    got = sample_jobs(model, JOBS, settings, progress=False)
    pipeline_cls = getattr(diffusers, DIT_FAMILIES[family].pipeline_class)
    pipe = pipeline_cls.from_pretrained(str(model.path), local_files_only=True)
    pipe.load_lora_weights(str(transformer_loras[family]), weight_name=LORA_WEIGHT_NAME)
    pipe.set_progress_bar_config(disable=True)
    assert_images_equal_the_pipelines(got, pipe, guidance, max_sequence_length=TEXT_TOKENS)


def test_one_transformer_call_per_step(transformer_loras):
    """Adapter and base rows share one call per step (the layers are fused by sample_jobs)."""
    model = transformer_model("flux", transformer_loras["flux"])
    rows = []
    model.unet.register_forward_pre_hook(
        lambda m, args, kwargs: rows.append(kwargs["hidden_states"].shape[0]), with_kwargs=True
    )
    settings = SampleSettings(resolution=64, steps=2, guidance=3.5, batch_jobs=2)
    sample_jobs(model, JOBS[:2], settings, progress=False)
    assert sampling.split_batch_native(model.unet)
    assert rows == [6, 6]  # 2 jobs x 3 rows (no classifier-free guidance), one call per step


def test_initial_latents_are_the_pipelines_noise_for_the_seed():
    shape = (4, 16, 16)
    want = randn_tensor((1, *shape), generator=torch.Generator().manual_seed(5), dtype=torch.float32)
    assert torch.equal(initial_latents(5, shape, "cpu", torch.float32), want)


def test_rows_are_adapter_first_with_their_uncond_rows(tmp_path, monkeypatch):
    """Row layout of a guided batch of K jobs: [tok, ada, tok-unc, ada-unc | base, base-unc]."""
    model = engine_model("sd", random_lora_dir(tmp_path, "sd"))
    calls = []
    real = sampling.split_unet_call

    def spy(unet, x, t, embeds, n_adapter, resolution):
        calls.append((x.clone(), embeds.embeds.clone(), n_adapter))
        return real(unet, x, t, embeds, n_adapter, resolution)

    monkeypatch.setattr(sampling, "split_unet_call", spy)
    jobs = JOBS[:2]
    sample_jobs(
        model, jobs, SampleSettings(resolution=64, steps=1, guidance=7.5, batch_jobs=2), progress=False
    )
    ((x, embeds, n_adapter),) = calls
    k = len(jobs)
    assert n_adapter == 4 * k and x.shape[0] == 6 * k
    enc = sampling.encode_prompts(
        model, [j.token_prompt for j in jobs] + [j.plain_prompt for j in jobs] + [""]
    )
    tok, plain, unc = enc.embeds[:k], enc.embeds[k : 2 * k], enc.embeds[2 * k :]
    want = torch.cat([tok, plain, unc.expand(k, -1, -1), unc.expand(k, -1, -1), plain, unc.expand(k, -1, -1)])
    torch.testing.assert_close(embeds, want)
    # all three images of a job start from the same noise; a set's cond and uncond rows share latents
    noise = torch.cat([initial_latents(j.seed, (4, 16, 16), "cpu", torch.float32) for j in jobs])
    for block in x.split(k):
        torch.testing.assert_close(block, noise)


def test_fallback_matches_separate_adapter_and_base_calls(tmp_path):
    model = engine_model("sd", random_lora_dir(tmp_path, "sd"))
    unet = model.unet
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 4, 16, 16, generator=g)
    embeds = sampling.PromptEmbeds(torch.randn(3, 77, 32, generator=g))
    t = torch.tensor(500)
    with torch.no_grad():
        got = sampling.split_unet_call(unet, x, t, embeds, 2, 64)
        ada = unet(x[:2], t, encoder_hidden_states=embeds.embeds[:2]).sample
        unet.disable_adapters()
        base = unet(x[2:], t, encoder_hidden_states=embeds.embeds[2:]).sample
        unet.enable_adapters()
    torch.testing.assert_close(got, torch.cat([ada, base]), atol=1e-5, rtol=0)
    assert (ada[1] - unet(x[1:2], t, encoder_hidden_states=embeds.embeds[1:2]).sample[0]).abs().max() < 1e-5


def test_one_unet_call_per_step_once_the_layers_are_fused(tmp_path):
    """sample_jobs fuses the LoRA layers, so adapter and base rows share one UNet call per step."""
    model = engine_model("sd", random_lora_dir(tmp_path, "sd"))
    rows = []
    model.unet.register_forward_pre_hook(
        lambda module, args, kwargs: rows.append(args[0].shape[0]), with_kwargs=True
    )
    settings = SampleSettings(resolution=64, steps=2, guidance=7.5, batch_jobs=2)
    sample_jobs(model, JOBS[:2], settings, progress=False)
    assert sampling.split_batch_native(model.unet)
    assert rows == [12, 12]  # 2 jobs x 6 rows, one call per step
