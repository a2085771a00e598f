"""kps-v1 metrics against hand computations on fixed embeddings (docs/design.md §2)."""

import math

import pytest
import torch

from cat_engine.cat import kps

# Unit vectors at known angles in the plane, so every cosine is known by hand:
# cos(E0, E0)=1, cos(E0, E90)=0, cos(E0, E60)=0.5, cos(E0, E180)=-1, cos(E60, E90)=cos(30°).
E0 = [1.0, 0.0]
E60 = [0.5, math.sqrt(3) / 2]
E90 = [0.0, 1.0]
E180 = [-1.0, 0.0]
COS30 = math.sqrt(3) / 2


def t(*rows, scale=1.0):
    return torch.tensor(rows, dtype=torch.float32) * scale


def test_identity_is_mean_over_all_pairs_with_refs():
    g_tok = t(E0, E90)
    refs = t(E0, E60, scale=3.0)  # scale must not matter: rows are normalised
    # pairs: (E0,E0)=1, (E0,E60)=.5, (E90,E0)=0, (E90,E60)=cos30
    assert kps.identity(g_tok, refs) == pytest.approx((1 + 0.5 + 0 + COS30) / 4, abs=1e-7)


def test_preservation_pairs_rows_by_index_not_all_pairs():
    g_ada = t(E0, E90, E60)
    g_base = t(E0, E0, E90)
    # paired: 1, 0, cos30 (an all-pairs mean would differ)
    assert kps.preservation(g_ada, g_base) == pytest.approx((1 + 0 + COS30) / 3, abs=1e-7)
    with pytest.raises(ValueError, match="same number of rows"):
        kps.preservation(g_ada, g_base[:2])


def test_prompt_similarity_uses_each_images_own_text():
    g_tok = t(E0, E60)
    texts = t(E60, E180, scale=0.1)
    assert kps.prompt_similarity(g_tok, texts) == pytest.approx((0.5 + -0.5) / 2, abs=1e-7)


def test_leakage_is_difference_of_mean_similarity_to_refs():
    refs = t(E0)
    g_ada = t(E0, E60)  # mean cos to refs 0.75
    g_base = t(E90, E180)  # mean cos to refs -0.5
    assert kps.leakage(g_ada, g_base, refs) == pytest.approx(0.75 - (-0.5), abs=1e-7)
    assert kps.leakage(g_base, g_base, refs) == 0.0


def test_diversity_is_one_minus_mean_distinct_pair_cosine():
    s = t(E0, E60, E90)
    # distinct pairs: (E0,E60)=.5, (E0,E90)=0, (E60,E90)=cos30; the diagonal does not count
    assert kps.diversity(s) == pytest.approx(1 - (0.5 + 0 + COS30) / 3, abs=1e-7)
    assert kps.diversity(t(E60, E60, E60)) == pytest.approx(0.0, abs=1e-7)
    assert math.isnan(kps.diversity(t(E0)))


def test_kps_is_the_harmonic_mean():
    assert kps.kps(0.6, 0.9) == pytest.approx(2 * 0.6 * 0.9 / 1.5)
    assert kps.kps(0.5, 0.5) == pytest.approx(0.5)
    # the harmonic mean sits below the arithmetic mean and is dragged down by the weaker side
    assert kps.kps(0.1, 0.9) == pytest.approx(0.18)
    assert kps.kps(0.0, 0.9) == 0.0
    assert kps.kps(-0.2, 0.9) == 0.0


def test_all_metrics_names_every_component_and_matches_the_functions():
    g = torch.Generator().manual_seed(0)
    g_tok, g_ada, g_base, refs, texts = (torch.randn(n, 8, generator=g) for n in (6, 6, 6, 3, 6))
    got = kps.all_metrics(g_tok, g_ada, g_base, refs, texts)
    assert tuple(got) == kps.METRICS  # every component, in the order reports write them
    assert {"kps", "identity", "preservation", "prompt_similarity", "leakage"} < set(got)
    assert {"diversity_adapter", "diversity_base"} < set(got)
    assert got["identity"] == kps.identity(g_tok, refs)
    assert got["preservation"] == kps.preservation(g_ada, g_base)
    assert got["kps"] == kps.kps(got["identity"], got["preservation"])
    assert got["diversity_base"] == kps.diversity(g_base)


def test_metrics_do_not_depend_on_row_order_of_unpaired_sets():
    g = torch.Generator().manual_seed(1)
    a, refs = torch.randn(5, 4, generator=g), torch.randn(3, 4, generator=g)
    perm = torch.tensor([3, 0, 4, 1, 2])
    assert kps.identity(a[perm], refs) == pytest.approx(kps.identity(a, refs), abs=1e-12)
    assert kps.diversity(a[perm]) == pytest.approx(kps.diversity(a), abs=1e-12)


def test_rejects_non_matrix_embeddings():
    with pytest.raises(ValueError, match=r"\[N, D\]"):
        kps.identity(torch.ones(3), torch.ones(2, 3))
