"""Sample grids during training: ``--sample-every N`` writes ``OUTPUT/samples/step-N.png``.

For each sample prompt the grid has three rows, the columns its fixed seeds: the adapter on the
prompt (token row), the adapter on its plain form (plain row) and the frozen base model on the
plain form (base row). The plain and base rows are what CAT protects: they should look alike.
The three sets come from the engine's batched split-batch sampler (``cat/sampling.py``) in one
denoising loop.

Sampling never touches the training run's randomness: every image draws its noise from its own
seeded generator, DDIM with eta 0 draws nothing, and the global RNG states are restored after, so
a run with samples trains exactly as one without. Only rank 0 samples.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from pathlib import Path

import torch

from cat_engine.cat.captions import has_token, plain_caption, token_caption
from cat_engine.cat.config import ConfigError, TrainConfig
from cat_engine.cat.grid import make_grid
from cat_engine.cat.sampling import SETS, Job, SampleSettings, sample_jobs, to_uint8
from cat_engine.engine.files import write_atomically

log = logging.getLogger("cat_engine")
SAMPLES = "samples"
PROMPT_SEPARATOR = "|"


def read_prompts(value) -> list[str]:
    """``--sample-prompts``: a ``.txt`` file (one prompt a line), prompts separated by ``|``, or a list."""
    if isinstance(value, (list, tuple)):
        prompts = [str(p).strip() for p in value]
    elif str(value).endswith(".txt") or Path(value).is_file():
        path = Path(value).expanduser()
        try:
            prompts = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"--sample-prompts {path}: cannot read it ({type(exc).__name__})") from None
    else:
        prompts = [p.strip() for p in str(value).split(PROMPT_SEPARATOR)]
    prompts = [p for p in prompts if p]
    if not prompts:
        raise ConfigError(f"--sample-prompts {value!r}: no prompt in it")
    return prompts


def sample_pairs(config: TrainConfig, concepts: list[dict]) -> list[tuple[str, str]]:
    """(token prompt, plain prompt) of each sample prompt.

    By default each concept's caption template. A prompt's plain form follows ``--plain-mode`` for
    the first concept whose token it contains (a prompt without any token is its own plain form).
    """
    if config.sample_prompts is None:
        prompts = [token_caption(c["caption_template"], c["token"], c["class_word"]) for c in concepts]
    else:
        prompts = read_prompts(config.sample_prompts)
    pairs = []
    for prompt in prompts:
        concept = next((c for c in concepts if has_token(prompt, c["token"])), None)
        if concept is None:
            pairs.append((prompt, prompt))
        else:
            pairs.append(
                (prompt, plain_caption(prompt, concept["token"], concept["class_word"], config.plain_mode))
            )
    return pairs


@contextlib.contextmanager
def _on(modules, device):
    """``modules`` on ``device`` for the block, then back where each was."""
    places = [next(m.parameters()).device for m in modules]
    for m in modules:
        m.to(device)
    try:
        yield
    finally:
        for m, place in zip(modules, places):
            m.to(place)


class TrainSamples:
    """The sample grids of one run (rank 0): :meth:`due` after a step, then :meth:`write`."""

    def __init__(
        self,
        config: TrainConfig,
        model,
        concepts: list[dict],
        resolution: int,
        device,
        park_text: bool = True,
    ):
        """``park_text``: keep the text encoders off the GPU between samples (not when training
        encodes captions each step with them)."""
        self.every = config.sample_every
        self.output = Path(config.output) / SAMPLES
        self.pairs = sample_pairs(config, concepts)
        self.seeds = list(range(config.sample_seeds))
        self.jobs = [Job(t, p, s) for t, p in self.pairs for s in self.seeds]
        self.settings = SampleSettings(resolution, steps=config.sample_steps)
        # The VAE and text encoders the sampler needs: kept here (training releases its own
        # references) and off the GPU between samples.
        self.model = dataclasses.replace(model, text_encoders=list(model.text_encoders))
        self.device = torch.device(device)
        self.components = [self.model.vae, *self.model.text_encoders]
        for m in self.components[: len(self.components) if park_text else 1]:
            m.to("cpu")

    def due(self, step: int) -> bool:
        return self.every > 0 and step % self.every == 0

    def write(self, step: int, autocast=contextlib.nullcontext):
        """Sample every job with the adapter as it is after ``step``; the grid is written and returned."""
        unet = self.model.unet
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices), _on(self.components, self.device), autocast():
            unet.eval()
            try:
                images = sample_jobs(self.model, self.jobs, self.settings, progress=False)
            finally:
                unet.train()
        pixels = {name: to_uint8(images[name]).numpy() for name in SETS}
        n = len(self.seeds)
        rows = []
        for i, (token, plain) in enumerate(self.pairs):
            cut = slice(i * n, (i + 1) * n)
            rows += [("tok", token, list(pixels["tok"][cut]))]
            rows += [("ada", plain, list(pixels["ada"][cut])), ("base", plain, list(pixels["base"][cut]))]
        grid = make_grid(rows, self.seeds)
        path = write_atomically(self.output / f"step-{step}.png", lambda tmp: grid.save(tmp, format="PNG"))
        log.info("samples of step %d: %s", step, path)
        return grid
