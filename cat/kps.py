"""KPS and its components (docs/design.md §2, definition ``kps-v1``), as pure functions of embeddings.

Every function takes embeddings as float tensors ``[N, D]`` (one row per image or text, any
scale: rows are L2-normalised here) and returns a Python float. ``cos(a, b) = a·b / (|a| |b|)``.

Sets, generated with the same seeds: ``G_tok`` (adapter, token prompts), ``G_ada`` (adapter,
plain prompts), ``G_base`` (base model, plain prompts); ``R`` the reference images. Row ``i``
of ``G_tok``, ``G_ada`` and ``G_base`` share a prompt template and a seed.
"""

from __future__ import annotations

import math

import torch

KPS_VERSION = "kps-v1"


def _unit(x: torch.Tensor) -> torch.Tensor:
    if x.ndim != 2:
        raise ValueError(f"embeddings must be [N, D], got shape {tuple(x.shape)}")
    x = x.double()  # sums over many pairs: float64 keeps them independent of order and sharding
    return x / x.norm(dim=1, keepdim=True).clamp_min(1e-12)


def _check_rows(a: torch.Tensor, b: torch.Tensor, what: str) -> None:
    if a.shape[0] != b.shape[0]:
        raise ValueError(
            f"{what}: paired sets need the same number of rows, got {a.shape[0]} and {b.shape[0]}"
        )


def mean_cross_cos(a: torch.Tensor, b: torch.Tensor) -> float:
    """``mean_{i,j} cos(a_i, b_j)`` over all ``N_a * N_b`` pairs."""
    return float((_unit(a) @ _unit(b).T).mean())


def mean_paired_cos(a: torch.Tensor, b: torch.Tensor) -> float:
    """``mean_i cos(a_i, b_i)``; ``a`` and ``b`` have the same number of rows."""
    _check_rows(a, b, "mean_paired_cos")
    return float((_unit(a) * _unit(b)).sum(dim=1).mean())


def identity(g_tok: torch.Tensor, refs: torch.Tensor) -> float:
    """``ID = mean_{g in G_tok, r in R} cos(E(g), E(r))``: does the token bring the concept?"""
    return mean_cross_cos(g_tok, refs)


def preservation(g_ada: torch.Tensor, g_base: torch.Tensor) -> float:
    """``PRES = mean_i cos(E(G_ada[i]), E(G_base[i]))``, paired by seed and prompt."""
    _check_rows(g_ada, g_base, "preservation")
    return mean_paired_cos(g_ada, g_base)


def prompt_similarity(g_tok: torch.Tensor, texts: torch.Tensor) -> float:
    """``PS = mean_i cos(E(G_tok[i]), E_text(p_i))`` with ``p_i`` image i's prompt *without* the token.

    ``texts`` has one row per image (repeat a prompt's text embedding for each of its seeds).
    """
    _check_rows(g_tok, texts, "prompt_similarity")
    return mean_paired_cos(g_tok, texts)


def leakage(g_ada: torch.Tensor, g_base: torch.Tensor, refs: torch.Tensor) -> float:
    """``LEAK = mean cos(E(G_ada), E(R)) - mean cos(E(G_base), E(R))`` (all pairs with R).

    Positive: plain prompts drift towards the concept under the adapter.
    """
    return mean_cross_cos(g_ada, refs) - mean_cross_cos(g_base, refs)


def diversity(images: torch.Tensor) -> float:
    """``DIV(S) = 1 - mean_{i<j} cos(E(s_i), E(s_j))`` over the ``N(N-1)/2`` distinct pairs of S.

    ``nan`` for fewer than two images (no pair to compare).
    """
    n = images.shape[0]
    if n < 2:
        return math.nan
    sims = _unit(images) @ _unit(images).T
    off_diagonal_sum = sims.sum() - sims.diagonal().sum()  # each pair counted twice
    return float(1.0 - off_diagonal_sum / (n * (n - 1)))


def kps(identity_score: float, preservation_score: float) -> float:
    """``KPS = 2 * ID * PRES / (ID + PRES)``, the harmonic mean of identity and preservation.

    High only when both are. The harmonic mean is defined for positive values; cosine means can
    be zero or negative, and a component ``<= 0`` (no concept, or nothing preserved) gives 0.
    """
    if identity_score <= 0 or preservation_score <= 0:
        return 0.0
    return 2.0 * identity_score * preservation_score / (identity_score + preservation_score)


# The components all_metrics returns, in its order (the order of kps.json).
METRICS = (
    "kps",
    "identity",
    "preservation",
    "prompt_similarity",
    "leakage",
    "diversity_adapter",
    "diversity_base",
)


def all_metrics(
    g_tok: torch.Tensor, g_ada: torch.Tensor, g_base: torch.Tensor, refs: torch.Tensor, texts: torch.Tensor
) -> dict[str, float]:
    """Every kps-v1 component for one set of embeddings (see the functions above)."""
    id_score = identity(g_tok, refs)
    pres = preservation(g_ada, g_base)
    return {
        "kps": kps(id_score, pres),
        "identity": id_score,
        "preservation": pres,
        "prompt_similarity": prompt_similarity(g_tok, texts),
        "leakage": leakage(g_ada, g_base, refs),
        "diversity_adapter": diversity(g_ada),
        "diversity_base": diversity(g_base),
    }
