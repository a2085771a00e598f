"""The full-size transformer configurations have the published sizes; the tiny ones are the builtin
folders' denoisers; ``builtin-tiny-<family>`` and transformer folders resolve."""

from __future__ import annotations

import pytest

from cat_engine.engine.dit_configs import DIT_CONFIGS, build_transformer
from cat_engine.engine.unet_configs import resolve_model

# Exact: the total_size of each published folder's transformer index, in bf16, halved.
EXACT = {"flux": 11_901_408_320, "flux-schnell": 11_891_178_560, "zimage": 6_154_908_736}
# The model cards' rounded figures (SD3's position embedding table is a stored buffer).
ROUNDED = {"sd3-medium": 2.0e9, "sd35-medium": 2.5e9, "sd35-large": 8.1e9}


def _size(name):
    model = build_transformer(resolve_model(name))
    return sum(p.numel() for p in model.parameters()) + sum(b.numel() for b in model.buffers())


@pytest.mark.parametrize("name", list(DIT_CONFIGS))
def test_full_size_transformers_have_the_published_sizes(name):
    if name in EXACT:
        assert _size(name) == EXACT[name]
    else:
        assert _size(name) == pytest.approx(ROUNDED[name], rel=0.05)


def test_builtin_tiny_folders_and_transformer_folders_resolve():
    spec = resolve_model("builtin-tiny-flux")
    assert spec.family == "flux" and spec.name == "builtin-tiny-flux"
    assert spec.unet_folder.endswith("transformer") and spec.native_resolution == 64
    assert spec.config_json == resolve_model("tiny-flux").config_json
    folder = resolve_model(spec.unet_folder.rsplit("/", 1)[0])  # the folder itself
    assert folder.family == "flux" and folder.pixel_multiple == 8
