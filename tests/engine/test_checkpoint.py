import json

import pytest
import torch

from cat_engine.engine import checkpoint as ckpt


def _setup():
    torch.manual_seed(0)
    params = {
        "a.lora_A.weight": torch.nn.Parameter(torch.randn(3, 5)),
        "a.lora_B.weight": torch.nn.Parameter(torch.randn(5, 3)),
    }
    opt = torch.optim.AdamW(params.values(), lr=1e-2)
    for _ in range(2):
        opt.zero_grad()
        sum((p**2).sum() for p in params.values()).backward()
        opt.step()
    return params, opt


def test_roundtrip_restores_optimizer_and_rng(tmp_path):
    params, opt = _setup()
    gen = torch.Generator().manual_seed(5)
    gen_state = gen.get_state().clone()
    path = ckpt.save_checkpoint(tmp_path, 2, params, opt, gen, {"data_position": 2})
    assert path.name == "step-2" and not list((tmp_path / "checkpoints").glob(".step-*"))
    loaded = ckpt.load_checkpoint(path)
    for k, v in params.items():
        torch.testing.assert_close(loaded["lora"][k], v.detach())
    params2, opt2 = _setup()
    opt2.load_state_dict(loaded["optimizer"])
    for (_i, s1), (_, s2) in zip(opt.state_dict()["state"].items(), opt2.state_dict()["state"].items()):
        for key in s1:
            torch.testing.assert_close(torch.as_tensor(s1[key]), torch.as_tensor(s2[key]))
    g2 = torch.Generator()
    ckpt.restore_rng(loaded["rng"], g2)
    assert torch.equal(g2.get_state(), gen_state)
    assert loaded["state"]["step"] == 2 and loaded["state"]["data_position"] == 2


def test_no_pickle_in_checkpoint(tmp_path):
    params, opt = _setup()
    path = ckpt.save_checkpoint(tmp_path, 1, params, opt, torch.Generator(), {})
    names = sorted(p.name for p in path.iterdir())
    files = [ckpt.LORA_FILE, ckpt.OPTIMIZER_TENSORS, ckpt.RNG_FILE, ckpt.STATE_FILE, ckpt.MANIFEST_FILE]
    assert names == sorted(files)
    json.loads((path / ckpt.MANIFEST_FILE).read_text())
    json.loads((path / ckpt.STATE_FILE).read_text())


def test_latest_and_pruning(tmp_path):
    params, opt = _setup()
    for step in (1, 2, 3, 10):
        ckpt.save_checkpoint(tmp_path, step, params, opt, torch.Generator(), {}, keep=2)
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["step-3", "step-10"]  # numeric, not lexical
    assert ckpt.resolve_resume("latest", tmp_path).name == "step-10"
    # an interrupted write (temporary folder, or a folder without the state file) is never "latest"
    (tmp_path / "checkpoints" / "step-11").mkdir()
    assert ckpt.resolve_resume("latest", tmp_path).name == "step-10"


def test_resume_errors_are_clear(tmp_path):
    with pytest.raises(ckpt.CheckpointError, match="no checkpoint in"):
        ckpt.resolve_resume("latest", tmp_path)
    with pytest.raises(ckpt.CheckpointError, match="not a cat-engine checkpoint"):
        ckpt.resolve_resume(str(tmp_path), tmp_path)
