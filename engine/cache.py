"""Caching before training: VAE latents and text embeddings, computed once (docs/design.md §3, §6).

After ``encode_latents`` and ``encode_captions`` the trainer calls ``model.release_encoders()``,
so the VAE and the text encoder(s) need no memory during training.

Images of several sizes (aspect-ratio buckets) are encoded per size: :class:`BucketedLatents`
holds one :class:`LatentCache` per size and finds any row in it.

Latents keep the VAE's *distribution*, not one sample: the loop draws
``mean + std * noise`` each step with its own generator, as diffusers' training scripts do
when they call ``latent_dist.sample()`` per step, so the cache changes nothing about training.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from cat_engine.engine.text import PromptEmbeds, encode_prompts


@dataclass
class LatentCache:
    """Scaled VAE latent distributions of N images.

    ``mean``, ``std``: ``[N, C, r, r]`` float32 (C = 4 for SD/SDXL, r = resolution / VAE factor),
    already in the UNet's latent space: ``(z - shift_factor) * scaling_factor`` for a VAE
    sample ``z``, so ``mean + std * noise`` is what the UNet is trained on.
    """

    mean: torch.Tensor
    std: torch.Tensor

    def __len__(self) -> int:
        return self.mean.shape[0]

    def to(self, device) -> LatentCache:
        return LatentCache(self.mean.to(device), self.std.to(device))

    def groups(self) -> list[list[int]]:
        """One bucket: every row (as :meth:`BucketedLatents.groups`)."""
        return [list(range(len(self)))]

    def rows(self, index) -> LatentCache:
        """The latents of image rows ``index``."""
        index = torch.as_tensor(index, dtype=torch.long)
        return LatentCache(self.mean[index], self.std[index])


@torch.no_grad()
def encode_latents(vae, images: torch.Tensor, batch_size: int = 8) -> LatentCache:
    """Encode ``images`` ``[N, 3, R, R]`` (any float dtype, values in ``[-1, 1]``) with ``vae``.

    Runs in batches of ``batch_size`` on the VAE's device and dtype; returns float32 on that
    device. Raises ``ValueError`` for a wrong shape, and when the VAE gives non-finite values
    (an fp16 VAE can overflow; SDXL's does).
    """
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be [N, 3, R, R], got {list(images.shape)}")
    if images.shape[0] == 0:
        raise ValueError("no images to encode")
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    param = next(vae.parameters())
    scale = vae.config.scaling_factor
    # SD3/Flux-style VAEs centre their latents; SD/SDXL configs have no shift (or None).
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    means, stds = [], []
    for start in range(0, images.shape[0], batch_size):
        part = images[start : start + batch_size].to(param.device, param.dtype)
        dist = vae.encode(part).latent_dist
        means.append((dist.mean.float() - shift) * scale)
        stds.append(dist.std.float() * scale)
    mean, std = torch.cat(means), torch.cat(stds)
    if not (torch.isfinite(mean).all() and torch.isfinite(std).all()):
        raise ValueError(f"the VAE gave non-finite latents in {param.dtype}; encode with the VAE in float32")
    return LatentCache(mean, std)


@dataclass
class BucketedLatents:
    """Latent distributions of N images of one or more sizes: one :class:`LatentCache` per size.

    ``bucket[i]`` is the cache that holds image ``i``, ``position[i]`` its row there (``[N]``
    int64 on the CPU). A batch takes its rows from one bucket (:meth:`rows`).
    """

    buckets: list[LatentCache]
    bucket: torch.Tensor
    position: torch.Tensor

    def __len__(self) -> int:
        return self.bucket.shape[0]

    def groups(self) -> list[list[int]]:
        """The image rows of each bucket, in row order."""
        return [torch.nonzero(self.bucket == b).flatten().tolist() for b in range(len(self.buckets))]

    def rows(self, index) -> LatentCache:
        """The latents of image rows ``index`` (a list or tensor), which must share one bucket."""
        index = torch.as_tensor(index, dtype=torch.long)
        found = self.bucket[index].unique()
        if found.numel() != 1:
            raise ValueError(f"rows {index.tolist()} lie in {found.numel()} buckets; a batch takes one")
        cache = self.buckets[int(found)]
        where = self.position[index]
        return LatentCache(cache.mean[where], cache.std[where])

    def to(self, device) -> BucketedLatents:
        return BucketedLatents([c.to(device) for c in self.buckets], self.bucket, self.position)


def encode_latents_by_size(vae, images: list[torch.Tensor], batch_size: int = 8) -> BucketedLatents:
    """:func:`encode_latents` of ``images`` (``[3, H, W]`` each, sizes may differ), one cache per size.

    Sizes are cached in order of first appearance; images of one size in row order, so a set of
    one size is encoded exactly as :func:`encode_latents` encodes the stacked set.
    """
    if not images:
        raise ValueError("no images to encode")
    sizes: dict[tuple[int, ...], list[int]] = {}
    for i, image in enumerate(images):
        sizes.setdefault(tuple(image.shape), []).append(i)
    bucket = torch.empty(len(images), dtype=torch.long)
    position = torch.empty(len(images), dtype=torch.long)
    caches = []
    for b, rows in enumerate(sizes.values()):
        caches.append(encode_latents(vae, torch.stack([images[i] for i in rows]), batch_size))
        bucket[rows] = b
        position[rows] = torch.arange(len(rows))
    return BucketedLatents(caches, bucket, position)


@dataclass
class CaptionCache:
    """Text embeddings of the distinct captions, and which one each image row uses.

    ``embeds``: ``PromptEmbeds`` of U distinct captions (``[U, 77, D]``, SDXL also pooled
    ``[U, P]``; a transformer family's own shapes, ``engine/families/``), float32. ``captions``: those U strings, in order of first appearance.
    ``token_index``, ``plain_index``: ``[N]`` int64 on the CPU, the row of ``embeds`` for image
    ``i``'s token caption and plain caption.
    """

    embeds: PromptEmbeds
    captions: list[str]
    token_index: torch.Tensor
    plain_index: torch.Tensor

    def token(self, index) -> PromptEmbeds:
        """Token-caption embeddings of image rows ``index`` (tensor, list, slice or int)."""
        return self.embeds.rows(self.token_index[index].to(self.embeds.embeds.device))

    def plain(self, index) -> PromptEmbeds:
        """Plain-caption embeddings of image rows ``index``."""
        return self.embeds.rows(self.plain_index[index].to(self.embeds.embeds.device))

    def lookup(self, captions: list[str]) -> PromptEmbeds:
        """The embeddings of ``captions``, each one of the cached captions (``KeyError`` otherwise)."""
        row = {c: i for i, c in enumerate(self.captions)}
        index = torch.tensor([row[c] for c in captions], dtype=torch.long)
        return self.embeds.rows(index.to(self.embeds.embeds.device))

    def to(self, device) -> CaptionCache:
        moved = self.embeds.map(lambda t: t.to(device))
        return CaptionCache(moved, self.captions, self.token_index, self.plain_index)


def _distinct(captions: list[str], table: dict[str, int]) -> torch.Tensor:
    return torch.tensor([table.setdefault(c, len(table)) for c in captions], dtype=torch.long)


def encode_captions(
    model, token_captions: list[str], plain_captions: list[str], batch_size: int = 64, extra=()
) -> CaptionCache:
    """Encode each distinct caption once with ``model``'s text encoder(s) (``encode_prompts``).

    Most data sets share one caption, so N images usually need two encoder rows, not 2N.
    ``token_captions`` and ``plain_captions`` are per image (equal length N); ``extra`` captions
    (such as the empty one of caption dropout) are cached after them, for :meth:`CaptionCache.lookup`.
    """
    if len(token_captions) != len(plain_captions):
        raise ValueError(
            f"need one plain caption per token caption, got {len(token_captions)} and {len(plain_captions)}"
        )
    if not token_captions:
        raise ValueError("no captions to encode")
    table: dict[str, int] = {}
    token_index = _distinct(list(token_captions), table)
    plain_index = _distinct(list(plain_captions), table)
    _distinct(list(extra), table)
    distinct = list(table)  # dicts keep insertion order: row u is the u-th new caption
    embeds = encode_prompts(model, distinct, batch_size=batch_size)
    return CaptionCache(embeds, distinct, token_index, plain_index)
