"""Loading a base model: a local diffusers folder or a built-in one.

Families (``engine/families/``): UNets (SD1.x, SD2.x: ``sd``; SDXL: ``sdxl``) and diffusion
transformers (SD3/3.5: ``sd3``; Flux.1: ``flux``; Z-Image: ``zimage``), told apart by the folder's
``model_index.json``. Built-in folders: ``builtin`` (the toy world) and the random tiny pipelines
``builtin-tiny-<family>`` (:data:`BUILTIN_TINY`), generated on first use.

Only safetensors weights are read (``use_safetensors=True``): nothing a user hands the engine is
unpickled. Nothing is downloaded (``local_files_only=True``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from cat_engine.engine.builtin import builtin_model_dir
from cat_engine.engine.errors import CatEngineError
from cat_engine.engine.families import FAMILY_NAMES, dit_family, family_of_index
from cat_engine.engine.families.base import vae_geometry

BUILTIN = "builtin"
# --base builtin-tiny-<family>: the random-initialised tiny pipeline of that family.
BUILTIN_TINY = {f"builtin-tiny-{family}": family for family in FAMILY_NAMES}


class ModelLoadError(CatEngineError):
    """A --base that cannot be used; the message names the folder and the problem."""


@dataclass
class BaseModel:
    """The components of a Stable-Diffusion-class pipeline that training and sampling need."""

    path: Path
    family: str  # "sd" (SD1.x/SD2.x), "sdxl", or a transformer family: "sd3", "flux", "zimage"
    unet: torch.nn.Module  # the denoiser: a UNet, or the family's transformer
    vae: torch.nn.Module | None
    tokenizers: list = field(default_factory=list)
    text_encoders: list = field(default_factory=list)
    # UNets: a DDPMScheduler built from the folder's scheduler config; transformers: the folder's
    # FlowMatchEulerDiscreteScheduler (its config holds the training shift).
    noise_scheduler: object = None
    # Transformers: (native resolution, VAE scale factor), read from vae/config.json at load time,
    # so they stay known after release_encoders().
    geometry: tuple[int, int] | None = None

    @property
    def prediction_type(self) -> str:
        """``epsilon``, ``v_prediction`` or ``sample`` for UNets; ``flow`` (the velocity) for transformers."""
        if dit_family(self.family) is not None:
            return "flow"
        return self.noise_scheduler.config.prediction_type

    @property
    def vae_scale_factor(self) -> int:
        if self.geometry is not None:
            return self.geometry[1]
        return 2 ** (len(self.vae.config.block_out_channels) - 1) if self.vae is not None else 8

    @property
    def native_resolution(self) -> int:
        if self.geometry is not None:
            return self.geometry[0]
        return int(self.unet.config.sample_size) * self.vae_scale_factor

    def release_encoders(self) -> None:
        """Drop the VAE and text encoders (after latents and embeddings are cached)."""
        self.vae = None
        self.text_encoders = []


def resolve_base(base: str | Path | None) -> Path:
    """The folder of ``--base`` (``None`` or ``builtin``: the toy world; ``builtin-tiny-<family>``:
    that family's random tiny pipeline)."""
    if base is None or str(base) == BUILTIN:
        return builtin_model_dir()
    if str(base) in BUILTIN_TINY:
        return builtin_model_dir(BUILTIN_TINY[str(base)], pretrained=False)
    path = Path(base).expanduser()
    if not path.exists():
        raise ModelLoadError(f"--base {path}: no such folder")
    if not path.is_dir():
        raise ModelLoadError(
            f"--base {path}: is a file; give a diffusers model folder (with model_index.json)"
        )
    if not (path / "model_index.json").exists():
        raise ModelLoadError(
            f"--base {path}: not a diffusers model folder (no model_index.json); "
            "convert single-file checkpoints with diffusers' from_single_file first"
        )
    return path


def model_family(path: Path) -> str:
    """The family of the diffusers folder ``path`` (``engine/families/``), from its model_index.json."""
    try:
        return family_of_index(json.loads((path / "model_index.json").read_text()))
    except (ValueError, KeyError, TypeError, IndexError) as exc:
        raise ModelLoadError(f"--base {path}: not a model family the engine trains: {exc}") from None


def load_base(base: str | Path | None = None, *, load_encoders: bool = True) -> BaseModel:
    """Load ``--base`` in float32 on the CPU; the caller moves and casts what it needs."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    path = resolve_base(base)
    _quiet_loading()
    family = model_family(path)
    if dit_family(family) is not None:
        return _load_transformer_base(path, family, load_encoders)
    common = dict(local_files_only=True)
    try:
        unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet", use_safetensors=True, **common)
        scheduler = DDPMScheduler.from_pretrained(path, subfolder="scheduler", **common)
        vae, tokenizers, encoders = None, [], []
        if load_encoders:
            vae = AutoencoderKL.from_pretrained(path, subfolder="vae", use_safetensors=True, **common)
            tokenizers.append(CLIPTokenizer.from_pretrained(path, subfolder="tokenizer", **common))
            encoders.append(
                CLIPTextModel.from_pretrained(path, subfolder="text_encoder", use_safetensors=True, **common)
            )
            if family == "sdxl":
                tokenizers.append(CLIPTokenizer.from_pretrained(path, subfolder="tokenizer_2", **common))
                encoders.append(
                    CLIPTextModelWithProjection.from_pretrained(
                        path, subfolder="text_encoder_2", use_safetensors=True, **common
                    )
                )
    except (OSError, ValueError, KeyError, json.JSONDecodeError) as exc:
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelLoadError(f"--base {path}: cannot load it as a diffusers model: {first_line}") from None
    check_no_missing_weights(path, {"unet": unet, "vae": vae, **dict(zip(TEXT_ENCODER_FOLDERS, encoders))})
    for module in [unet, vae, *encoders]:
        if module is not None:
            module.requires_grad_(False).eval()
    return BaseModel(path, family, unet, vae, tokenizers, encoders, scheduler)


def _load_transformer_base(path: Path, family: str, load_encoders: bool) -> BaseModel:
    try:
        parts = dit_family(family).load(path, load_encoders)
        geometry = vae_geometry(path)
    except (OSError, ValueError, KeyError, TypeError, json.JSONDecodeError) as exc:
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelLoadError(f"--base {path}: cannot load it as a diffusers model: {first_line}") from None
    encoders = dict(zip(TEXT_ENCODER_FOLDERS, parts["text_encoders"]))
    check_no_missing_weights(path, {"transformer": parts["transformer"], "vae": parts["vae"], **encoders})
    for module in [parts["transformer"], parts["vae"], *parts["text_encoders"]]:
        if module is not None:
            module.requires_grad_(False).eval()
    return BaseModel(
        path,
        family,
        parts["transformer"],
        parts["vae"],
        parts["tokenizers"],
        parts["text_encoders"],
        parts["scheduler"],
        geometry,
    )


TEXT_ENCODER_FOLDERS = ("text_encoder", "text_encoder_2", "text_encoder_3")


def check_no_missing_weights(path: Path, modules: dict) -> None:
    """Refuse a model whose weight files lack tensors: diffusers leaves those on the meta device
    (no data), and the first step would fail far from the cause."""
    for folder, module in modules.items():
        if module is None:
            continue
        missing = [n for n, t in [*module.named_parameters(), *module.named_buffers()] if t.is_meta]
        if missing:
            raise ModelLoadError(
                f"--base {path}: the weights in {folder}/ lack {len(missing)} tensor(s) the model needs "
                f"(e.g. {missing[0]}); the file is incomplete or belongs to another model"
            )


def _quiet_loading() -> None:
    """Loading a local folder needs no per-file progress bars; the engine shows its own."""
    import diffusers.utils.logging as dlog
    import transformers.utils.logging as tlog

    dlog.disable_progress_bar()
    tlog.disable_progress_bar()
