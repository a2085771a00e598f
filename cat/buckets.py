"""Aspect-ratio buckets: images keep their shape, and each batch comes from one bucket.

A bucket is a training size ``(height, width)`` of about ``resolution``² pixels, both sides
multiples of ``step`` (64 by default, as in kohya's trainers), between half and twice the
resolution. Each image goes to the bucket whose aspect ratio is closest to its own, is scaled by
exactly the factor that makes it cover the bucket (never more), and the overhang is cut from both
sides evenly. The crop is recorded (:class:`Crop`): SDXL's micro-conditioning takes the image's
real original size and the crop's top-left corner. With a single square bucket this is the plain
centre crop, so a set of square images trains as it does without buckets.

:class:`BatchSampler` keeps the recipe's rule: the samples of a step are a pure function of the
step number and the seed (a resumed run reads what a straight run reads, and every rank of a
data-parallel run computes the same batch).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from PIL import Image

DEFAULT_STEP = 64
# Distinct seed domains for the per-bucket sample streams and for the order of the buckets.
_EPOCH_SEED = 1_000_003
_BUCKET_SEED = 7_777_777
_SCHEDULE_SEED = 10**12


@dataclass(frozen=True)
class Crop:
    """How a training row was cut from its image: the SDXL ``add_time_ids`` of that row.

    ``original``: ``(height, width)`` of the image as read (after its EXIF rotation);
    ``top_left``: ``(top, left)`` of the crop in the resized image; ``target``: ``(height, width)``
    of the training pixels (the bucket).
    """

    original: tuple[int, int]
    top_left: tuple[int, int]
    target: tuple[int, int]

    def time_ids(self) -> list[int]:
        """``original + crop top-left + target``, the order diffusers' SDXL pipelines use."""
        return [*self.original, *self.top_left, *self.target]

    def mirrored(self, resized_width: int) -> Crop:
        """The crop of the horizontally flipped image: the same window seen from the other side."""
        top, left = self.top_left
        return Crop(self.original, (top, resized_width - self.target[1] - left), self.target)


def bucket_step(resolution: int, step: int = DEFAULT_STEP) -> int:
    """The bucket side granularity: ``step``, or the resolution itself when it is smaller."""
    return min(step, resolution)


def bucket_sizes(resolution: int, step: int = DEFAULT_STEP) -> list[tuple[int, int]]:
    """Every bucket ``(height, width)`` for ``resolution``: at most ``resolution``² pixels, sides
    multiples of ``step`` between half and twice the resolution, the square one included; sorted."""
    step = bucket_step(resolution, step)
    area = resolution * resolution
    low = max(step, resolution // 2 // step * step)
    high = 2 * resolution
    square = math.isqrt(area) // step * step
    sizes = {(square, square)}
    for width in range(low, high + 1, step):
        height = min(high, area // width // step * step)
        if height >= low:
            sizes.update({(height, width), (width, height)})
    return sorted(sizes)


def choose_bucket(width: int, height: int, buckets: list[tuple[int, int]]) -> tuple[int, int]:
    """The bucket whose aspect ratio is closest to ``width / height`` (in log ratio, so a 2:1 and a
    1:2 image are equally far from square); of equal candidates the larger."""
    ratio = math.log(width / height)
    return min(buckets, key=lambda b: (abs(math.log(b[1] / b[0]) - ratio), -b[0] * b[1]))


def cover_scale(width: int, height: int, bucket: tuple[int, int]) -> float:
    """The smallest scale at which a ``width`` x ``height`` image covers ``bucket`` (h, w)."""
    return max(bucket[1] / width, bucket[0] / height)


def fit_to_bucket(image: Image.Image, bucket: tuple[int, int]) -> tuple[Image.Image, Crop, tuple[int, int]]:
    """Scale ``image`` to cover ``bucket`` (Lanczos down, bicubic up), cut the centre; the crop made
    and the resized ``(width, height)`` (the crop of a flipped copy is mirrored in it)."""
    w, h = image.size
    bh, bw = bucket
    scale = cover_scale(w, h, bucket)
    size = (max(bw, round(w * scale)), max(bh, round(h * scale)))
    if size != (w, h):
        resample = Image.Resampling.LANCZOS if scale < 1 else Image.Resampling.BICUBIC
        image = image.resize(size, resample)
    left, top = (size[0] - bw) // 2, (size[1] - bh) // 2
    crop = Crop(original=(h, w), top_left=(top, left), target=(bh, bw))
    return image.crop((left, top, left + bw, top + bh)), crop, size


# ------------------------------------------------------------------------------- the sampler
def sample_indices(step: int, batch_size: int, n: int, seed: int) -> list[int]:
    """Samples of ``step`` from a pool of ``n``: an epoch-wise shuffled stream, a pure function of the step.

    Sample ``k`` of the stream is ``perm(epoch)[k % n]`` with ``epoch = k // n``, so the data
    position is just the step number and a resumed run reads exactly what a straight run reads.
    """
    return _stream(range(step * batch_size, (step + 1) * batch_size), n, seed * _EPOCH_SEED)


def _stream(positions, n: int, base_seed: int) -> list[int]:
    out = []
    for k in positions:
        epoch, pos = divmod(k, n)
        g = torch.Generator().manual_seed((base_seed + epoch) % 2**64)  # any 64-bit --seed
        out.append(int(torch.randperm(n, generator=g)[pos]))
    return out


class BatchSampler:
    """The rows of each step's batch: all from one bucket, a pure function of the step.

    ``groups``: the rows of each bucket, a row listed once per repeat (``N_name`` folders). Each
    bucket has its own epoch-wise shuffled stream of its rows; an epoch of steps takes
    ``ceil(rows / batch)`` batches from each bucket, in an order shuffled per epoch. With one bucket
    this is :func:`sample_indices` on that bucket's rows.
    """

    def __init__(self, groups: list[list[int]], batch_size: int, seed: int):
        self.groups = [list(g) for g in groups if g]
        if not self.groups:
            raise ValueError("BatchSampler: no rows")
        self.batch_size = batch_size
        self.seed = seed
        self.batches = [-(-len(g) // batch_size) for g in self.groups]  # per bucket and epoch

    @property
    def steps_per_epoch(self) -> int:
        return sum(self.batches)

    def epoch_of(self, step: int) -> int:
        """The epoch (from 0) that ``step`` (from 0) belongs to."""
        return step // self.steps_per_epoch

    def indices(self, step: int) -> list[int]:
        group, batch = self._position(step)
        rows = self.groups[group]
        first = batch * self.batch_size
        picks = _stream(
            range(first, first + self.batch_size), len(rows), self.seed * _EPOCH_SEED + group * _BUCKET_SEED
        )
        return [rows[p] for p in picks]

    def _position(self, step: int) -> tuple[int, int]:
        """(bucket, how many batches that bucket gave before this step)."""
        if len(self.groups) == 1:
            return 0, step
        epoch, pos = divmod(step, self.steps_per_epoch)
        order = [g for g, count in enumerate(self.batches) for _ in range(count)]
        g = torch.Generator().manual_seed((_SCHEDULE_SEED + self.seed * _EPOCH_SEED + epoch) % 2**64)
        shuffled = [order[i] for i in torch.randperm(len(order), generator=g).tolist()]
        group = shuffled[pos]
        return group, epoch * self.batches[group] + shuffled[:pos].count(group)
