"""LoRA adapters on a diffusers UNet: add, prepare for the engine, disable, save (diffusers and kohya formats).

The adapter itself is peft's (``unet.add_adapter(LoraConfig(...))``), so anything trained here
loads with ``StableDiffusionPipeline.load_lora_weights`` and anything trained elsewhere with
peft can be handed to :func:`fuse_lora`.
"""

from __future__ import annotations

import json
import os
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from cat_engine.engine.families import denoiser_family, lora_prefix
from cat_engine.engine.files import write_atomically
from cat_engine.engine.split_batch import adapter_rows, split_state

DEFAULT_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
FEED_FORWARD_TARGETS = ("ff.net.0.proj", "ff.net.2")
LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
# diffusers reads the peft config of a saved adapter from this safetensors metadata key.
DIFFUSERS_METADATA_KEY = "lora_adapter_metadata"
ENGINE_METADATA_KEY = "cat_engine"


def add_lora(
    unet,
    rank: int = 16,
    alpha: float | None = None,
    targets=DEFAULT_TARGETS,
    seed: int | None = None,
    dropout: float = 0.0,
):
    """Add a trainable peft LoRA adapter (default name) to a frozen diffusers UNet; return the UNet.

    ``alpha`` defaults to ``rank`` (scale 1). ``lora_B`` starts at zero as in peft, so the adapter
    model initially equals the base model; ``lora_A`` is Gaussian, seeded by ``seed`` when given.
    ``dropout``: peft's ``lora_dropout`` on the adapter's input (in training mode).
    """
    from peft import LoraConfig

    if rank < 1:
        raise ValueError(f"LoRA rank must be >= 1, got {rank}")
    unet.requires_grad_(False)
    config = LoraConfig(
        r=rank,
        lora_alpha=float(rank if alpha is None else alpha),
        init_lora_weights="gaussian",
        target_modules=list(targets),
        lora_dropout=float(dropout),
    )
    if seed is None:
        unet.add_adapter(config)
    else:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            unet.add_adapter(config)
    return unet


def default_targets(model) -> tuple[str, ...]:
    """The LoRA targets of ``model``'s family: :data:`DEFAULT_TARGETS` for UNets, the family's
    own for a diffusion transformer (``engine/families/``)."""
    family = denoiser_family(model)
    return DEFAULT_TARGETS if family is None else family.default_targets


def lora_named_parameters(unet) -> dict[str, torch.nn.Parameter]:
    """The trainable LoRA parameters by name, in a stable (module) order."""
    return {n: p for n, p in unet.named_parameters() if "lora_" in n and p.requires_grad}


def perturb_lora_b(model: torch.nn.Module, std: float) -> torch.nn.Module:
    """Draw every ``lora_B`` weight of ``model`` from N(0, std) (the global RNG, in parameter order);
    returns ``model``. peft starts B at zero, so an untrained adapter changes nothing: tests and
    benchmarks use this to make its delta show."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, std)
    return model


def lora_parameters(unet) -> list[torch.nn.Parameter]:
    """The trainable LoRA parameters, in a stable (module) order."""
    return list(lora_named_parameters(unet).values())


def has_peft_adapter(unet) -> bool:
    return bool(getattr(unet, "peft_config", None))


def fuse_lora(unet):
    """Prepare a UNet carrying a peft LoRA adapter for the engine, in place; return it.

    Every peft LoRA ``Linear`` (``to_q``, ``to_k``, ``to_v``, ``to_out.0`` and the feed-forward
    linears when targeted) becomes a :class:`~cat_engine.engine.fused_lora.FusedLoraLinear`: the
    same module object with a forward that runs the fused split-batch op on the UNet's
    ``adapter_rows``. The trainable tensors stay the same ``Parameter`` objects, so an optimizer
    built before the call keeps working, and state-dict keys do not change. LoRA on convolutions
    stays peft's. Calling it twice is harmless; :func:`unfuse_lora` undoes it. Raises
    ``ValueError`` when the UNet has no LoRA adapter, and ``UnsupportedTargets`` (a user error) for
    LoRA on a transformer's modules that see all rows' tokens flattened (``engine/families/``).
    """
    from cat_engine.engine.fused_lora import fuse_lora_layers

    if not has_peft_adapter(unet) and not getattr(unet, "_cat_fused", False):
        raise ValueError(
            "fuse_lora: the UNet carries no LoRA adapter; add one first with "
            "unet.add_adapter(peft.LoraConfig(...)) or cat_engine.engine.add_lora(unet)"
        )
    family = denoiser_family(unet)
    if family is not None:  # a transformer: LoRA only where every input row is one sample's
        family.check_targets([n for n, m in unet.named_modules() if hasattr(m, "lora_A")])
    fuse_lora_layers(unet, split_state(unet))  # every fused call reads its adapter rows from here
    object.__setattr__(unet, "_cat_fused", True)
    return unet


def unfuse_lora(unet):
    """Turn the fused LoRA layers of :func:`fuse_lora` back into plain peft layers, in place; return it."""
    from cat_engine.engine.fused_lora import unfuse_lora_layers

    unfuse_lora_layers(unet)
    object.__setattr__(unet, "_cat_fused", False)
    return unet


@contextmanager
def adapters_disabled(unet):
    """Run the frozen base model: no LoRA delta on any row, whatever the layers are.

    Fused layers see both signals: ``adapter_rows=0`` and peft's disabled flag (on which they run
    the frozen layer alone, as peft does); layers left to peft, such as LoRA convolutions, need
    the flag.
    """
    peft_active = has_peft_adapter(unet) and getattr(unet, "_cat_peft_enabled", True)
    if peft_active:
        unet.disable_adapters()
        object.__setattr__(unet, "_cat_peft_enabled", False)
    try:
        with adapter_rows(unet, 0):
            yield unet
    finally:
        if peft_active:
            unet.enable_adapters()
            object.__setattr__(unet, "_cat_peft_enabled", True)


def lora_state_dict(unet) -> dict[str, torch.Tensor]:
    """The adapter's weights under the keys diffusers' ``load_lora_weights`` reads (peft form).

    ``unet.<module>.lora_A.weight`` / ``lora_B.weight`` for every targeted module (``transformer.``
    for a diffusion transformer, ``engine/families/``). (diffusers'
    ``convert_state_dict_to_diffusers`` renames attention keys to the old ``lora.down/up`` form but
    leaves others, such as ``proj_in`` or ``ff.net.2``, as ``lora_A/B``; the loader then reads the
    file as peft's and drops the renamed attention weights. Keeping one form avoids that.)
    """
    from peft.utils import get_peft_model_state_dict

    state = get_peft_model_state_dict(unet)
    prefix = lora_prefix(unet)
    return {f"{prefix}.{k}": v.detach().to("cpu", torch.float32).contiguous() for k, v in state.items()}


def lora_config_dict(unet) -> dict:
    cfg = unet.peft_config["default"]
    config = {
        "r": int(cfg.r),
        "lora_alpha": float(cfg.lora_alpha),
        "target_modules": sorted(cfg.target_modules),
    }
    # Per-module ranks and alphas, when the adapter has them: without them a loader scales those
    # modules by the global alpha / r.
    for key in ("rank_pattern", "alpha_pattern"):
        if getattr(cfg, key, None):
            config[key] = dict(getattr(cfg, key))
    return config


@dataclass
class ExtraAdapters:
    """Other modules' LoRA (trained text encoders), saved in the same files as the denoiser's."""

    tensors: dict[str, torch.Tensor]  # diffusers keys: ``<prefix>.<module>.lora_A.weight``
    configs: dict[str, dict]  # each prefix's peft config (:func:`lora_config_dict`)
    kohya: dict[str, torch.Tensor]  # kohya keys, alphas included


def save_lora(
    unet, output_dir: str | os.PathLike, info: dict | None = None, extra: ExtraAdapters | None = None
) -> Path:
    """Write ``OUTPUT/pytorch_lora_weights.safetensors`` atomically (``engine/files.py``).

    ``info`` (token, class word, cat weight, ...) goes into the safetensors metadata under
    ``cat_engine`` as JSON, next to the peft config diffusers needs to rebuild the adapter
    (each of ``extra``'s too, under its own prefix).
    """
    from safetensors.torch import save_file

    output_dir = Path(output_dir)
    config = lora_config_dict(unet)
    configs = {lora_prefix(unet): config, **(extra.configs if extra else {})}
    metadata = {
        "format": "pt",
        DIFFUSERS_METADATA_KEY: json.dumps(
            {f"{p}.{k}": v for p, c in configs.items() for k, v in c.items()}, sort_keys=True
        ),
        ENGINE_METADATA_KEY: json.dumps({**config, **(info or {})}, sort_keys=True, default=str),
    }
    state = {**lora_state_dict(unet), **(extra.tensors if extra else {})}
    return write_atomically(
        output_dir / LORA_WEIGHT_NAME, lambda tmp: save_file(state, str(tmp), metadata=metadata)
    )


SAVE_FORMATS = ("diffusers", "kohya", "both")


def writes_kohya(unet, save_format: str) -> bool:
    """Whether ``save_format`` writes a kohya file for ``unet``: ``kohya`` always (refused for a
    model the format does not cover), ``both`` for the models it covers (SD1.x/2.x/SDXL UNets, SD3
    and Flux.1 transformers)."""
    from cat_engine.engine.kohya import kohya_supported

    if save_format not in SAVE_FORMATS:
        raise ValueError(f"save format must be one of {', '.join(SAVE_FORMATS)}, got {save_format!r}")
    return save_format == "kohya" or (save_format == "both" and kohya_supported(unet))


def save_lora_files(
    unet,
    output_dir: str | os.PathLike,
    save_format: str = "both",
    info: dict | None = None,
    *,
    name: str | None = None,
    extra: ExtraAdapters | None = None,
) -> list[Path]:
    """The adapter in the formats ``save_format`` names, written atomically into ``output_dir``.

    ``diffusers``: :func:`save_lora` (``pytorch_lora_weights.safetensors``, for ``load_lora_weights``).
    ``kohya``: ``<name>.safetensors`` with kohya keys, per-module alphas and ``ss_*`` metadata, for
    ComfyUI, AUTOMATIC1111/Forge and sd-scripts (``engine/kohya.py``); ``name`` defaults to the
    folder's name. ``both``: the two (the kohya file only for the models that format covers: not
    Z-Image, whose diffusers file those tools read). ``extra``: other modules' LoRA, in both files.
    Returns the paths written, the diffusers file first.
    """
    from cat_engine.engine.kohya import save_kohya

    paths = []
    if save_format in ("diffusers", "both"):
        paths.append(save_lora(unet, output_dir, info, extra))
    if writes_kohya(unet, save_format):
        record = json.dumps({**lora_config_dict(unet), **(info or {})}, sort_keys=True, default=str)
        more = extra.kohya if extra else None
        paths.append(
            save_kohya(
                unet,
                output_dir,
                info,
                name=name,
                extra_metadata={ENGINE_METADATA_KEY: record},
                extra_tensors=more,
            )
        )
    return paths


def read_lora_metadata(path: str | os.PathLike) -> dict:
    """The engine metadata of a saved adapter (a folder, or either .safetensors file)."""
    from safetensors import safe_open

    path = Path(path)
    if path.is_dir():
        path = path / LORA_WEIGHT_NAME
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    return json.loads(meta.get(ENGINE_METADATA_KEY, "{}"))
