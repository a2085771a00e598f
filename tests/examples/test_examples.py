"""The examples run as written: accelerate_cat.py (accelerate around CatLoss) and torchrun_cat.py
(data_parallel_cat_loss), one process and two CPU ranks under torchrun; the ranks' adapters are equal
to each other and to the one process's (DDP averages the LoRA gradients), whichever way is used."""

import os
import subprocess
import sys
from pathlib import Path

from safetensors.torch import load_file

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
TORCHRUN = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
# The same tolerance and reasoning as tests/cat/test_distributed_train.py: two ranks sum the rows'
# gradients in another order; a rank without the all-reduce would be far off.
TOL = 5e-5


def _run(prefix: list[str], example: str, output: Path, cwd: Path) -> None:
    from cat_engine.engine.builtin import builtin_model_dir

    args = [
        "--base",
        str(builtin_model_dir(pretrained=False)),
        "--steps",
        "3",
        "--output",
        str(output),
        "--each-rank",
    ]
    result = subprocess.run(
        [sys.executable, *prefix, str(EXAMPLES / example), *args],
        cwd=cwd,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-4000:]


def _max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys() and len(a) > 0
    return max((a[k] - b[k]).abs().max().item() for k in a)


def test_the_examples_train_alike_on_one_and_two_ranks(tmp_path):
    _run([], "accelerate_cat.py", tmp_path / "one", tmp_path)
    one = load_file(str(tmp_path / "one" / "rank-0.safetensors"))
    moved = max(v.abs().max().item() for k, v in one.items() if "lora_B" in k)
    for example in ("accelerate_cat.py", "torchrun_cat.py"):
        two = tmp_path / example.removesuffix(".py")
        _run(TORCHRUN, example, two, tmp_path)
        rank0 = load_file(str(two / "rank-0.safetensors"))
        rank1 = load_file(str(two / "rank-1.safetensors"))
        assert _max_diff(rank0, rank1) == 0.0, "DDP keeps the ranks' adapters identical"
        assert _max_diff(rank0, one) < TOL < moved / 20, example
        names = sorted(p.name for p in two.glob("*.safetensors") if not p.name.startswith("rank-"))
        assert names == sorted([f"{two.name}.safetensors", "pytorch_lora_weights.safetensors"])
