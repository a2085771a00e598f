"""The bench end to end on the tiny preset (1 timed step), and its peers against the reference."""

import json

import pytest
import torch

from cat_engine.bench import report
from cat_engine.bench.harness import MAIN_VARIANTS, VARIANTS, BenchConfig, build_models
from cat_engine.bench.peers import base_forward, naive_cat_loss, peft_lora_loss
from cat_engine.bench.presets import build_unet, make_batch
from cat_engine.cli import main
from cat_engine.engine.fused_lora import fused_layers
from cat_engine.engine.lora import lora_named_parameters, lora_parameters
from cat_engine.engine.unet_configs import resolve_model

TIMED_FIELDS = ("median_s", "q1_s", "q3_s", "min_s", "max_s", "steps_per_s", "images_per_s")
CUDA_FIELDS = ("cuda_peak_bytes", "cuda_step_bytes", "nvml_used_bytes", "mfu")


@pytest.fixture(scope="module")
def bench_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    args = ["bench", "--quick", "--steps", "1", "--warmup", "0", "--device", "cpu", "--results-dir", str(out)]
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CAT_ENGINE_CACHE", str(out / "cache"))  # the FLOPs cache, away from the user's
        rc = main(args)
    assert rc == 0
    assert (out / "cache" / "bench-flops.json").exists()
    records = report.read_jsonl(out / report.RESULTS_FILE)
    assert len(records) == 1
    return out, records[0]


def test_record_has_every_variant_and_field(bench_run):
    out, rec = bench_run
    assert rec["schema"] == report.SCHEMA
    assert [v["name"] for v in rec["variants"]] == list(VARIANTS)
    for v in rec["variants"]:
        assert len(v["times_s"]) == 1
        for f in TIMED_FIELDS:
            assert v[f] > 0, (v["name"], f)
        assert v["flops_per_step"] > 0 and v["achieved_flops_per_s"] > 0, v["name"]
        assert v["flops_source"] in ("meta", "device")
        for f in CUDA_FIELDS:
            assert v[f] is None, (v["name"], f)  # a CPU run
        if v["name"] == "base_forward":
            assert v["saved_bytes"] == 0
        else:
            assert v["saved_bytes"] > 0, v["name"]
    by = {v["name"]: v for v in rec["variants"]}
    assert by["peft_lora_2b"]["rows"] == 2 * by["peft_lora"]["rows"] == 2
    # CAT runs the LoRA work plus a second adapter pass: more FLOPs than plain LoRA, fewer than 3x.
    assert (
        by["peft_lora"]["flops_per_step"]
        < by["naive_cat"]["flops_per_step"]
        < 3 * by["peft_lora"]["flops_per_step"]
    )
    assert by["naive_cat"]["saved_bytes"] == by["peft_lora_2b"]["saved_bytes"]  # two grad passes of B rows
    r = rec["ratios"]
    t = {k: v["median_s"] for k, v in by.items()}
    assert r["engine_cat_over_naive_cat_time"] == pytest.approx(t["engine_cat"] / t["naive_cat"])
    assert r["cat_overhead_engine_fwd"] == pytest.approx(
        (t["engine_cat"] - t["engine_lora_2b"]) / t["base_forward"]
    )
    assert r["cat_overhead_naive_fwd"] == pytest.approx(
        (t["naive_cat"] - t["peft_lora_2b"]) / t["base_forward"]
    )
    assert set(rec["versions"]) >= {"torch", "triton", "diffusers", "peft"}
    assert {"commit", "dirty"} <= set(rec["git"])
    assert rec["device"]["type"] == "cpu"
    assert rec["config"]["preset"] == "tiny" and rec["config"]["resolution"] == 64
    json.dumps(rec)  # plain JSON all the way down


def test_chart_and_table(bench_run):
    out, rec = bench_run
    chart = out / rec["chart"]
    assert chart.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(out.glob("*.tmp"))
    text = report.table(rec)
    for v in rec["variants"]:
        assert v["label"] in text
    assert "CAT overhead" in text
    assert "tiny" in report.summary([rec])


def test_unknown_preset_is_a_one_line_error(capsys, tmp_path):
    rc = main(["bench", "--preset", "no-such-model", "--results-dir", str(tmp_path)])
    assert rc == 2
    assert "unknown model 'no-such-model'" in capsys.readouterr().err
    assert not (tmp_path / report.RESULTS_FILE).exists()


@pytest.mark.parametrize("preset_name", ["tiny", "tiny-xl", "tiny-sd3", "tiny-flux", "tiny-zimage"])
def test_naive_peer_matches_the_reference_cat_loss(preset_name):
    """The peer is written independently of cat/loss.py; both must give the same loss and grads."""
    from cat_engine.cat.loss import cat_loss_reference

    spec = resolve_model(preset_name)
    cfg = BenchConfig(preset=preset_name, rank=4)
    b = make_batch(spec, 2, spec.native_resolution, "cpu", seed=1)
    peft_unet, _ = build_models(cfg, spec, torch.device("cpu"), b)
    for p in lora_parameters(peft_unet):  # lora_B starts at zero: move off it so CAT is non-trivial
        p.data.normal_(std=0.05)

    def grads(loss):
        params = lora_parameters(peft_unet)
        return loss.detach(), torch.autograd.grad(loss, params)

    peer_loss, peer_grads = grads(naive_cat_loss(peft_unet, b, 0.7))
    ref = cat_loss_reference(
        peft_unet,
        b.noisy_latents,
        b.timesteps,
        b.token_embeds,
        b.plain_embeds,
        b.target,
        cat_weight=0.7,
        added_cond_kwargs=b.added_cond_kwargs,
        plain_added_cond_kwargs=b.plain_added_cond_kwargs,
    )
    ref_loss, ref_grads = grads(ref.loss)
    torch.testing.assert_close(peer_loss, ref_loss)
    for g, h in zip(peer_grads, ref_grads):
        torch.testing.assert_close(g, h)
    assert peer_loss > peft_lora_loss(peft_unet, b).detach()  # the CAT term is positive here
    assert peft_unet.active_adapters  # adapters enabled again after the base pass
    with torch.no_grad():
        again = base_forward(peft_unet, b)
    assert again.shape == b.noisy_latents.shape


def test_a_transformer_preset_runs_every_variant(tmp_path, monkeypatch):
    from cat_engine.bench.harness import run_bench

    monkeypatch.setenv("CAT_ENGINE_CACHE", str(tmp_path))
    result = run_bench(BenchConfig(preset="tiny-flux", rank=4, steps=1, warmup=0), log=lambda *_: None)
    variants = {v["name"]: v for v in result["variants"]}
    assert set(variants) == set(VARIANTS) and not [v["error"] for v in variants.values() if v["error"]]
    assert result["config"]["resolution"] == 64
    # the engine's CAT step does the naive peer's work, in the flop counter's eyes
    assert variants["engine_cat"]["flops_per_step"] == pytest.approx(
        variants["naive_cat"]["flops_per_step"], rel=0.05
    )


def test_main_variants_listed_first():
    assert VARIANTS[: len(MAIN_VARIANTS)] == MAIN_VARIANTS


def test_a_failed_variant_is_reported_not_fatal(bench_run, tmp_path):
    _, rec = bench_run
    rec = json.loads(json.dumps(rec))
    for v in rec["variants"]:
        if v["name"] == "engine_cat":
            v.update(error="RuntimeError: boom", median_s=None, q1_s=None, q3_s=None, times_s=[])
    rec["ratios"]["engine_cat_over_naive_cat_time"] = None
    rec["ratios"]["cat_overhead_engine_fwd"] = None
    text = report.table(rec)
    assert "failed: RuntimeError: boom" in text
    assert "engine -" in text
    assert report.summary([rec]).splitlines()[1].split()[6] == "-"  # engine ms
    report.write_chart(rec, tmp_path / "c.png")


def test_models_share_frozen_weights_and_keep_lora_in_fp32():
    spec = resolve_model("tiny")
    cfg = BenchConfig(precision="bf16", checkpointing=True)
    batch = make_batch(spec, 1, 64, "cpu")
    with pytest.warns(UserWarning, match="bf16 on CPU"):
        peft_unet, ctx = build_models(cfg, spec, torch.device("cpu"), batch)
    engine_unet = ctx.unet
    assert ctx.plan.precision == "bf16" and ctx.plan.gradient_checkpointing
    assert peft_unet.conv_in.weight.dtype == torch.bfloat16
    assert peft_unet.conv_in.weight.data_ptr() == engine_unet.conv_in.weight.data_ptr()
    to_q = peft_unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1.to_q
    engine_to_q = engine_unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1.to_q
    assert to_q.base_layer.weight.data_ptr() == engine_to_q.base_layer.weight.data_ptr()
    a, b = lora_named_parameters(peft_unet), lora_named_parameters(engine_unet)
    assert list(a) == list(b) and len(a) > 0
    for name, p in a.items():
        q = b[name]
        assert p.dtype == q.dtype == torch.float32 and p.requires_grad
        assert p.data_ptr() != q.data_ptr()
        torch.testing.assert_close(p, q, rtol=0, atol=0)  # the same initial adapter
    # The engine's UNet is the one train() prepares: fused layers; the peers keep peft's.
    assert fused_layers(engine_unet) and not fused_layers(peft_unet)
    assert engine_unet.is_gradient_checkpointing and peft_unet.is_gradient_checkpointing
    assert engine_unet.training and peft_unet.training


def test_flop_counts_are_cached_per_model_and_shape(tmp_path):
    from cat_engine.bench.harness import cached_variant_flops

    cache = tmp_path / "flops.json"
    spec = resolve_model("tiny")
    cfg = BenchConfig(rank=4)
    first = cached_variant_flops(cfg, spec, 64, cache)
    again = cached_variant_flops(cfg, spec, 64, cache)
    assert first[2] is False and again[2] is True
    assert again[:2] == (first[0], first[1])
    bigger = cached_variant_flops(cfg, spec, 96, cache)
    assert bigger[2] is False
    assert bigger[0]["peft_lora"] > first[0]["peft_lora"]


def test_a_local_model_folder_is_a_preset(tmp_path):
    from cat_engine.engine.builtin import tiny_unet

    torch.manual_seed(0)
    saved = tiny_unet("sdxl")
    saved.save_pretrained(tmp_path / "model" / "unet")
    spec = resolve_model(str(tmp_path / "model"))
    assert spec.unet_folder == str(tmp_path / "model" / "unet")
    assert spec.vae_scale_factor == 8  # no vae/config.json: the SD default
    unet = build_unet(spec, "cpu")
    assert not any(p.requires_grad for p in unet.parameters())
    torch.testing.assert_close(unet.conv_in.weight, saved.conv_in.weight)  # its weights, not random
    b = make_batch(spec, 1, 64, "cpu")
    assert b.added_cond_kwargs["text_embeds"].shape == (1, 32)
    assert build_unet(spec, "meta").conv_in.weight.is_meta


def test_compile_goes_through_the_engines_gradient_check(monkeypatch):
    """--compile: the engine's UNet is compiled the way train compiles it (compile_unet, checked on
    one row of the batch); the peers' UNet with a plain ``unet.compile()``."""
    from cat_engine.engine import memory_plan

    calls = []

    def checked_compile(unet, plan, check_inputs, **kwargs):
        calls.append(check_inputs)
        return unet  # as when the gradient check refuses the compiled UNet

    monkeypatch.setattr(memory_plan, "compile_unet", checked_compile)
    spec = resolve_model("tiny")
    batch = make_batch(spec, 2, 64, "cpu")
    peft_unet, ctx = build_models(BenchConfig(compile=True), spec, torch.device("cpu"), batch)
    checked = calls[0]
    assert (
        len(calls) == 1 and checked.rows == checked.timesteps.shape[0] == checked.token_embeds.shape[0] == 1
    )
    assert checked.added_cond_kwargs is None
    assert memory_plan.compiled_modules(peft_unet) == [peft_unet]
    assert memory_plan.compiled_modules(ctx.unet) == []


def test_cuda_graphs_in_the_bench_need_cuda_and_say_so():
    from cat_engine.bench.harness import run_bench
    from cat_engine.engine.cuda_graphs import CudaGraphError

    with pytest.raises(CudaGraphError, match="--cuda-graphs needs a CUDA device"):
        run_bench(BenchConfig(cuda_graphs=True), log=lambda *a: None)


def test_bench_flags_take_a_compile_mode_and_cuda_graphs():
    import argparse

    from cat_engine.bench import cli

    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    for argv, mode in (
        ([], False),
        (["--compile"], "default"),
        (["--compile", "max-autotune"], "max-autotune"),
    ):
        cfg = cli.config_from_args(parser.parse_args(argv + ["--device", "cpu"]))
        assert cfg.plan().compile == mode and not cfg.cuda_graphs
    assert cli.config_from_args(parser.parse_args(["--cuda-graphs", "--device", "cpu"])).cuda_graphs


def test_variants_selects_an_a_b_and_the_ratios_of_the_others_are_none(tmp_path):
    from cat_engine.bench.harness import run_bench

    cfg = BenchConfig(steps=1, warmup=0, variants=("peft_lora", "engine_lora"), clock="cpu")
    result = run_bench(cfg, log=lambda *a: None)
    assert [v["name"] for v in result["variants"]] == ["peft_lora", "engine_lora"]
    assert result["ratios"]["engine_lora_over_peft_lora_time"] > 0
    assert result["ratios"]["engine_cat_over_naive_cat_time"] is None
    assert result["config"]["clock"] == "cpu"
    record = report.make_record(result, torch.device("cpu"))
    assert "engine LoRA / peft LoRA: time" in report.table(record)
    assert "tiny" in report.summary([record])
    with pytest.raises(ValueError, match="unknown variant 'peft'"):
        BenchConfig(variants=("peft",)).validate()
