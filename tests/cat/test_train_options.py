"""The trainer options on the random tiny model: gradient accumulation equals a larger batch (and
keeps micro-batches local under DDP), the noise offset, caption options in training, min-SNR, the
schedules in the log, and bit-exact resume with every option and optimizer."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

import cat_engine.cat.train as train_mod
from cat_engine.cat.config import TrainConfig
from cat_engine.cat.data import NoiseOptions, draw_batch, prepare_data
from cat_engine.engine.builtin import builtin_model_dir
from cat_engine.engine.models import load_base

FAST = dict(rank=4, steps=3, save_every=0, batch_size=2, lr=1e-3)
# Accumulated and whole-batch gradients sum the rows in another order; Adam's g / sqrt(v)
# amplifies that on small gradients to ~1e-6 (as between 2 ranks and 1 process). lora_B starts at
# zero and moves ~1e-3 a step, so a wrong batch is far outside this.
TOL = 5e-5


def _config(tmp_path, name, **overrides):
    base = str(builtin_model_dir(pretrained=False))
    return TrainConfig(base=base, output=str(tmp_path / name), **{**FAST, **overrides}).validate()


def _train(tmp_path, name, **overrides):
    return load_file(str(train_mod.train(_config(tmp_path, name, **overrides), progress=False)))


def _log(tmp_path, name):
    return [json.loads(line) for line in (tmp_path / name / train_mod.LOG_FILE).read_text().splitlines()]


def _max_diff(a, b):
    return max((a[k] - b[k]).abs().max().item() for k in a)


def test_gradient_accumulation_equals_a_larger_batch(tmp_path):
    whole = _train(tmp_path, "whole", batch_size=4)
    accumulated = _train(tmp_path, "accumulated", batch_size=2, gradient_accumulation_steps=2)
    moved = max(v.abs().max().item() for k, v in whole.items() if "lora_B" in k)
    assert _max_diff(whole, accumulated) < TOL < moved / 20
    a, b = _log(tmp_path, "whole"), _log(tmp_path, "accumulated")
    for x, y in zip(a, b):
        assert x["ldm"] == pytest.approx(y["ldm"], rel=1e-5) and x["cat"] == pytest.approx(
            y["cat"], rel=1e-3, abs=1e-12
        )


def test_micro_batches_before_the_last_skip_the_ddp_all_reduce(tmp_path):
    trainer = train_mod.Trainer.setup(
        _config(tmp_path, "ddp", gradient_accumulation_steps=3, weight_decay=0.3)
    )
    assert trainer.optimizer.param_groups[0]["weight_decay"] == 0.3
    seen = []

    class FakeDDP(torch.nn.Module):
        """What the loop needs of DistributedDataParallel: a forward and no_sync."""

        def __init__(self, step):
            super().__init__()
            self.step = step
            self.syncing = True

        def forward(self, batch):
            seen.append(self.syncing)
            return self.step(batch)

        def no_sync(self):
            import contextlib

            @contextlib.contextmanager
            def off():
                self.syncing = False
                yield
                self.syncing = True

            return off()

    trainer.step_fn = FakeDDP(trainer.step_fn)
    trainer.run_step()
    assert seen == [False, False, True]


def test_noise_offset_adds_a_per_channel_constant_drawn_after_the_timesteps(tmp_path):
    config = _config(tmp_path, "offset")
    model = load_base(config.base)
    data = prepare_data(config, model, 64, "cpu")
    scheduler = model.noise_scheduler
    plain = draw_batch(data, [0, 1], torch.Generator().manual_seed(4), scheduler)
    shifted = draw_batch(data, [0, 1], torch.Generator().manual_seed(4), scheduler, noise=NoiseOptions(0.1))
    # by hand: the same draws, then a [B, C, 1, 1] normal sample times the offset
    g = torch.Generator().manual_seed(4)
    shape = data.latents.rows([0, 1]).mean.shape
    for _ in range(2):
        torch.randn(shape, generator=g)
    torch.randint(0, 1000, (2,), generator=g)
    offset = 0.1 * torch.randn((2, 4, 1, 1), generator=g)
    torch.testing.assert_close(shifted.target, plain.target + offset)
    assert torch.equal(shifted.timesteps, plain.timesteps)


def test_caption_options_train_consistent_pairs(tmp_path, monkeypatch):
    folder = tmp_path / "data"
    folder.mkdir()
    from PIL import Image

    for i in range(3):
        Image.new("RGB", (64, 64), (60 * i, 90, 200)).save(folder / f"{i}.png")
        (folder / f"{i}.txt").write_text(f"a photo of sks star, tag{i}, blue, small")
    asked = []
    real = prepare_data

    def spy(*args, **kwargs):
        data = real(*args, **kwargs)
        lookup = data.texts.lookup

        def recording(captions):
            asked.append(list(captions))
            return lookup(captions)

        data.texts.lookup = recording
        return data

    monkeypatch.setattr(train_mod, "prepare_data", spy)
    _train(
        tmp_path,
        "captions",
        data=str(folder),
        caption_dropout=0.3,
        shuffle_caption=True,
        keep_tokens=1,
        steps=6,
    )
    from cat_engine.cat.captions import plain_caption

    pairs = [(t, p) for tokens, plains in zip(asked[0::2], asked[1::2]) for t, p in zip(tokens, plains)]
    assert len(pairs) == 12
    for token, plain in pairs:
        assert plain == plain_caption(token, "sks", "star", "class")
        assert token == "" or token.startswith("a photo of sks star, ")
    assert any(t == "" for t, _ in pairs) and len({t for t, _ in pairs if t}) > 3  # dropped, and shuffled


def test_min_snr_weights_the_logged_ldm_term(tmp_path):
    _train(tmp_path, "plain", steps=2)
    _train(tmp_path, "snr", steps=2, min_snr_gamma=0.01)  # a small gamma: every weight but t ~ 999 is < 1
    plain, snr = _log(tmp_path, "plain"), _log(tmp_path, "snr")
    # the first step: the same adapter and draws, the LDM rows weighted down, the CAT term as it was
    assert snr[0]["ldm"] < plain[0]["ldm"] and snr[0]["cat"] == pytest.approx(plain[0]["cat"], rel=1e-4)
    assert all(r["loss"] == pytest.approx(r["ldm"] + r["cat"], rel=1e-6) for r in snr)


def test_the_log_shows_the_rate_each_step_used(tmp_path):
    _train(tmp_path, "cosine", steps=6, lr=1e-2, lr_scheduler="cosine", lr_warmup_steps=2)
    lrs = [r["lr"] for r in _log(tmp_path, "cosine")]
    assert lrs[:3] == pytest.approx([5e-3, 1e-2, 1e-2]) and lrs[3] > lrs[4] > lrs[5] > 0


@pytest.mark.parametrize(
    "options",
    [
        dict(optimizer="adamw8bit"),
        dict(optimizer="prodigy", lr=1.0, lr_scheduler="cosine_with_restarts", lr_scheduler_num_cycles=2),
        dict(
            min_snr_gamma=5.0,
            noise_offset=0.05,
            caption_dropout=0.3,
            shuffle_caption=True,
            gradient_accumulation_steps=2,
            lr_scheduler="polynomial",
            lr_warmup_steps=2,
            weight_decay=0.1,
            flip=True,
        ),
    ],
    ids=["adamw8bit", "prodigy", "loss-and-data-options"],
)
def test_resume_is_bit_exact_with_the_options(tmp_path, options):
    if options.get("optimizer") == "adamw8bit":
        pytest.importorskip("bitsandbytes")
    if options.get("optimizer") == "prodigy":
        pytest.importorskip("prodigyopt")
    # the schedules depend on the total steps: resume the straight run's own step-3 checkpoint
    straight = _train(tmp_path, "straight", steps=6, save_every=3, **options)
    middle = tmp_path / "straight" / "checkpoints" / "step-3"
    resumed = _train(tmp_path, "resumed", steps=6, resume=str(middle), **options)
    for key in straight:
        assert torch.equal(straight[key], resumed[key]), key


@pytest.mark.parametrize("option", [dict(min_snr_gamma=5.0), dict(noise_offset=0.1)])
def test_ddpm_noise_options_are_refused_on_a_flow_matching_family(tmp_path, option):
    from cat_engine.cat.config import ConfigError

    config = TrainConfig(
        base="builtin-tiny-sd3", output=str(tmp_path / "dit"), **{**FAST, **option}
    ).validate()
    with pytest.raises(ConfigError, match="a DDPM-noise option; .* trains by flow matching"):
        train_mod.Trainer.setup(config)
