"""What the engine needs to know about a family of diffusion transformers (docs/design.md §9).

A family is one small module (``sd3.py``, ``flux.py``, ``zimage.py``) holding a :class:`DitFamily`:

* which folders are its own (the transformer class named in ``model_index.json``) and how their
  components load;
* the conditioning: how prompts are encoded (:meth:`DitFamily.encode_prompts`, as the family's
  diffusers pipeline encodes them) and which per-row tensors the transformer takes besides the text
  embeddings (:meth:`DitFamily.conditioning`);
* the model call (:meth:`DitFamily.forward`): latents ``[N, C, h, w]`` and timesteps ``1000 * sigma``
  in, the velocity ``noise - x_0`` in the same layout out; packing, position ids and the family's
  time convention stay inside;
* the training recipe: default LoRA targets and the training noise levels
  (:meth:`DitFamily.training_sigmas`, ``flow.py``);
* sampling: the scheduler's timesteps, guidance and the negative prompt, as the pipeline does them.

Every tensor of a call's conditioning is per row (dim 0 is the batch), so the split batch
concatenates adapter and base rows along dim 0 unchanged; what is not per row (Flux's position ids,
rotary tables) is made inside :meth:`~DitFamily.forward` from shapes.
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path

import torch

from cat_engine.engine.errors import CatEngineError
from cat_engine.engine.families import flow


class UnsupportedTargets(CatEngineError):
    """LoRA on modules whose inputs are not one row per sample (the split batch cannot serve them)."""


# Libraries a model_index.json may name for a component (nothing else is imported from a folder).
COMPONENT_LIBRARIES = ("diffusers", "transformers")
DEFAULT_NATIVE_RESOLUTION = 1024


def read_index(path: Path) -> dict:
    return json.loads((Path(path) / "model_index.json").read_text())


def component_class(index: dict, name: str) -> str | None:
    """The class name ``model_index.json`` gives component ``name`` (``None`` when absent or null)."""
    entry = index.get(name)
    if not isinstance(entry, (list, tuple)) or len(entry) != 2 or entry[1] is None:
        return None
    return entry[1]


def load_component(path: Path, index: dict, name: str):
    """Component ``name`` of the folder, with the class its ``model_index.json`` names; ``None`` when
    the index has none. Models are read from safetensors only; nothing is downloaded.
    Raises ``ValueError`` for a library other than diffusers/transformers or an unknown class."""
    entry = index.get(name)
    if not isinstance(entry, (list, tuple)) or len(entry) != 2 or entry[1] is None:
        return None
    library, class_name = entry
    if library not in COMPONENT_LIBRARIES:
        raise ValueError(
            f"model_index.json: component {name} comes from {library!r}, not diffusers/transformers"
        )
    cls = getattr(importlib.import_module(library), class_name, None)
    if cls is None:
        raise ValueError(f"model_index.json: {library} has no class {class_name} (component {name})")
    kwargs = {"subfolder": name, "local_files_only": True}
    if isinstance(cls, type) and issubclass(cls, torch.nn.Module):
        kwargs["use_safetensors"] = True
    return cls.from_pretrained(str(path), **kwargs)


def vae_geometry(path: Path) -> tuple[int, int]:
    """``(native resolution in pixels, VAE scale factor)`` from ``vae/config.json``."""
    config = json.loads((Path(path) / "vae" / "config.json").read_text())
    factor = 2 ** (len(config["block_out_channels"]) - 1)
    return int(config.get("sample_size") or DEFAULT_NATIVE_RESOLUTION), factor


def per_row(timesteps, n: int, like: torch.Tensor) -> torch.Tensor:
    """``timesteps`` as a float tensor ``[n]`` on ``like``'s device (a scalar is repeated)."""
    t = torch.as_tensor(timesteps, device=like.device)
    if not t.is_floating_point():
        t = t.float()
    return t.expand(n) if t.dim() == 0 else t


def tokenize(tokenizer, prompts: list[str], max_length: int, device) -> dict:
    """The pipelines' tokenization: padded to ``max_length``, truncated."""
    out = tokenizer(
        prompts, padding="max_length", max_length=max_length, truncation=True, return_tensors="pt"
    )
    return {k: v.to(device) for k, v in out.items()}


class DitFamily:
    """A family of diffusers transformers; subclasses fill in the class attributes and the hooks."""

    name: str  # the engine's family id: --base folders of this family report it
    title: str  # for messages and reports
    transformer_class: str  # the class model_index.json names for "transformer"
    pipeline_class: str  # the diffusers pipeline that loads its LoRA files
    # Pipeline components: the denoiser, the VAE and the text side (tokenizers and encoders, in the
    # order BaseModel keeps them), as model_index.json names them.
    tokenizer_names: tuple[str, ...] = ()
    encoder_names: tuple[str, ...] = ()
    default_targets: tuple[str, ...] = ()  # LoRA targets of the family's diffusers training script
    lora_prefix = "transformer"  # key prefix of LoRA files: what load_lora_weights reads
    # The transformer blocks diffusers hands to its gradient-checkpointing function: the split
    # batch's units (engine/split_unet.py).
    block_classes: tuple[str, ...] = ()
    # Leaf modules whose inputs are positions, not rows (Flux's rotary table): the split batch leaves
    # them alone, whatever their leading dimension happens to be.
    position_modules: tuple[str, ...] = ()
    # Modules whose inputs are the tokens of all rows flattened together (not [rows, ...]): a LoRA
    # layer there cannot tell adapter rows from base rows, so the engine refuses to adapt them.
    flattened_modules: tuple[str, ...] = ()
    max_sequence_length = 256  # text tokens of the (T5/LLM) encoder, the pipeline's default
    sample_guidance = 7.0  # cat-engine eval's default guidance scale, the pipeline's default
    scheduler_name = "FlowMatchEulerDiscrete"
    # The pipelines' default for the scheduler's max_shift where its config has none.
    default_max_shift = 1.15

    # ------------------------------------------------------------------------------ folders
    def owns(self, index: dict) -> bool:
        return component_class(index, "transformer") == self.transformer_class

    def load(self, path: Path, load_encoders: bool = True) -> dict:
        """The folder's components: ``transformer``, ``scheduler``, and with ``load_encoders`` the
        ``vae``, ``tokenizers`` and ``text_encoders`` (lists, in the family's order)."""
        index = read_index(path)
        out = {
            "transformer": load_component(path, index, "transformer"),
            "scheduler": load_component(path, index, "scheduler"),
            "vae": None,
            "tokenizers": [],
            "text_encoders": [],
        }
        if out["transformer"] is None or out["scheduler"] is None:
            raise ValueError("model_index.json names no transformer or no scheduler")
        if load_encoders:
            out["vae"] = load_component(path, index, "vae")
            out["tokenizers"] = [load_component(path, index, n) for n in self.tokenizer_names]
            out["text_encoders"] = [load_component(path, index, n) for n in self.encoder_names]
        return out

    def check_targets(self, lora_modules: list[str]) -> None:
        """Raise :class:`UnsupportedTargets` when a LoRA layer sits where rows are flattened together."""
        bad = [n for n in lora_modules if any(n.startswith(p + ".") for p in self.flattened_modules)]
        if bad:
            raise UnsupportedTargets(
                f"LoRA on {bad[0]} cannot run a split batch: {self.title} flattens the rows' tokens "
                f"together before it ({', '.join(self.flattened_modules)}); choose targets inside the blocks"
            )

    # -------------------------------------------------------------------------- conditioning
    def encode_prompts(self, model, prompts: list[str], batch_size: int = 64):
        """:class:`~cat_engine.engine.text.PromptEmbeds` of ``prompts``, float32, as the pipeline
        encodes them (one call per ``batch_size`` prompts)."""
        from cat_engine.engine.text import PromptEmbeds

        parts = [
            self.encode_batch(model, list(prompts[i : i + batch_size]))
            for i in range(0, len(prompts), batch_size)
        ]
        return PromptEmbeds.concat(parts)

    def encode_batch(self, model, prompts: list[str]):
        raise NotImplementedError

    def conditioning(self, prompt) -> dict:
        """The transformer's per-row keyword tensors besides the text embeddings (pooled text, masks)."""
        raise NotImplementedError

    # ------------------------------------------------------------------------------ the call
    def forward(
        self, transformer, latents: torch.Tensor, timesteps, embeds: torch.Tensor, cond: dict | None, **kwargs
    ):
        """The velocity ``noise - x_0`` for ``latents`` ``[N, C, h, w]`` at ``timesteps`` (``1000 * sigma``,
        ``[N]`` or a scalar), text ``embeds`` ``[N, L, D]`` and the per-row ``cond`` of
        :meth:`conditioning`; shaped like ``latents``."""
        raise NotImplementedError

    # ------------------------------------------------------------------------------ training
    def training_sigmas(
        self, scheduler_config, n: int, generator: torch.Generator, latent_shape
    ) -> torch.Tensor:
        """``[n]`` noise levels in [0, 1] for one training batch of latents ``latent_shape``."""
        raise NotImplementedError

    # ------------------------------------------------------------------------------ sampling
    def image_seq_len(self, transformer, latent_shape) -> int:
        """Tokens of one image: the latent pixels over the 2x2 patches of every family here."""
        h, w = latent_shape[-2:]
        return (h // 2) * (w // 2)

    def set_timesteps(self, scheduler, steps: int, latent_shape, transformer, device) -> None:
        """``scheduler.set_timesteps`` as the pipeline calls it (``mu`` where the config shifts dynamically)."""
        kwargs = {}
        if scheduler.config.get("use_dynamic_shifting", False):
            kwargs["mu"] = self.mu(scheduler.config, self.image_seq_len(transformer, latent_shape))
        scheduler.set_timesteps(steps, device=device, **kwargs)

    def mu(self, scheduler_config, image_seq_len: int) -> float:
        c = dict(scheduler_config)
        return flow.calculate_shift(
            image_seq_len,
            c.get("base_image_seq_len", 256),
            c.get("max_image_seq_len", 4096),
            c.get("base_shift", 0.5),
            c.get("max_shift", self.default_max_shift),
        )

    def uses_cfg(self, transformer, guidance: float) -> bool:
        """Whether sampling at ``guidance`` runs classifier-free guidance (negative-prompt rows)."""
        return guidance > 1.0

    def guide(self, cond: torch.Tensor, uncond: torch.Tensor, guidance: float) -> torch.Tensor:
        return uncond + guidance * (cond - uncond)

    def sample_conditioning(self, transformer, guidance: float, rows: int, device) -> dict:
        """Per-row tensors sampling adds to every row's conditioning (Flux's embedded guidance)."""
        return {}

    # ------------------------------------------------------------------- shapes, for tests and plans
    def latent_channels(self, config) -> int:
        """Channels of the VAE latents the transformer of ``config`` denoises."""
        return int(config["in_channels"])

    def example_prompt(self, config, rows: int, text_tokens: int, make):
        """:class:`~cat_engine.engine.text.PromptEmbeds` of ``rows`` prompts of ``text_tokens`` tokens
        for the transformer of ``config``; ``make(shape)`` makes each float tensor."""
        raise NotImplementedError

    def example_batch(
        self,
        config,
        batch: int,
        latent_size: int,
        text_tokens: int | None = None,
        generator=None,
        device="cpu",
    ):
        """A random :class:`~cat_engine.engine.batch.CatBatch` of ``batch`` rows with the shapes a
        training step of the transformer of ``config`` takes (values drawn from ``generator``; on the
        ``meta`` device, shapes only): latents ``latent_size`` square, token and plain captions of
        ``text_tokens`` tokens (default: the family's ``max_sequence_length``)."""
        from cat_engine.engine.batch import CatBatch

        config = dict(config)
        tokens = text_tokens or self.max_sequence_length

        def make(shape):
            if torch.device(device).type == "meta":
                return torch.empty(shape, device="meta")
            return torch.randn(shape, generator=generator).to(device)

        shape = (batch, self.latent_channels(config), latent_size, latent_size)
        z, target = make(shape), make(shape)
        t = make((batch,)).sigmoid() * flow.TRAIN_TIMESTEPS
        token, plain = (
            self.example_prompt(config, batch, tokens, make),
            self.example_prompt(config, batch, tokens, make),
        )
        if token.mask is not None and torch.device(device).type != "meta":
            plain.mask[:, -1] = False  # the plain captions are a token shorter, as without the trigger
        return CatBatch(
            z, t, token.embeds, plain.embeds, target, self.conditioning(token), self.conditioning(plain)
        )
