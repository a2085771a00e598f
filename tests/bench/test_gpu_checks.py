"""The GPU suite's checks: their summary against the targets (from records written here), and a
clear refusal without a GPU. The checks themselves run in bench/gpu_suite.sh on a GPU."""

import json

import pytest
import torch

from cat_engine.bench import gpu_checks
from cat_engine.bench.report import append_jsonl


def _micro(out, m, peft, engine):
    for method, seconds in (("peft", peft), ("engine", engine)):
        config = {"M": m, "K": 320, "N": 320, "r": 16}
        append_jsonl(
            out / "lora_microbench.jsonl",
            {"config": config, "method": method, "mode": "fwd+bwd", "seconds": seconds},
        )


def test_summary_checks_targets_and_says_what_is_owed(tmp_path):
    _micro(tmp_path, 1024, peft=1.0, engine=0.9)  # 1.11 >= 1.0
    _micro(tmp_path, 4096, peft=1.0, engine=0.9)  # 1.11 < 1.2
    append_jsonl(tmp_path / "train_peak.jsonl", {"base": "/m/sd15", "resolution": 512, "process_peak_bytes": 3 * 2**30,
                                                  "train_peak_bytes": 2 * 2**30})  # fmt: skip
    (tmp_path / "eval_throughput.json").write_text(json.dumps({"ratio_per_prompt": 2.5}))
    text = gpu_checks.summary(tmp_path)
    lines = text.splitlines()
    m1024 = next(line for line in lines if "M=1024" in line)
    m4096 = next(line for line in lines if "M=4096" in line)
    assert "1.111" in m1024 and m1024.endswith("ok") and m4096.endswith("MISSED")
    assert any("sd15 512 px" in line and line.endswith("ok") for line in lines)
    assert any("images/s" in line and "2.500" in line for line in lines)
    assert (
        "bench: OWED" in text
        and "--compile on CUDA (gradient check): OWED" in text
        and "nccl, world size 1: OWED" in text
    )


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for machines without a GPU")
def test_checks_refuse_without_a_gpu(tmp_path):
    with pytest.raises(SystemExit, match="needs a CUDA device"):
        gpu_checks.main(["nccl", "--out", str(tmp_path / "x.jsonl")])
