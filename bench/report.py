"""Bench output: the terminal table, the JSON-lines record, and the PNG chart.

python -m cat_engine.bench.report RESULTS.jsonl   # one summary line per recorded run
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

from cat_engine.bench.environment import environment
from cat_engine.engine.files import write_atomically

SCHEMA = "cat-engine-bench-v1"
RESULTS_FILE = "bench.jsonl"
MIB = 2**20


def default_results_dir() -> Path:
    """``bench/results`` in a source checkout; ``./bench-results`` for an installed package."""
    here = Path(__file__).resolve().parent
    if (here.parent / "pyproject.toml").exists():
        return here / "results"
    return Path.cwd() / "bench-results"


def make_record(result: dict, device: torch.device) -> dict:
    """The harness result plus what makes it comparable later: device, versions, commit, time."""
    return {"schema": SCHEMA, **environment(device), **result}


def append_jsonl(path: Path, record: dict) -> None:
    """Append one line with a single ``write`` on an ``O_APPEND`` descriptor: concurrent runs
    cannot interleave their lines, and a crash cannot leave half a line."""
    path.parent.mkdir(parents=True, exist_ok=True)
    data = (json.dumps(record, sort_keys=True) + "\n").encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)


def _fmt(x, scale=1.0, digits=1, none="-"):
    return none if x is None else f"{x / scale:.{digits}f}"


def table(record: dict) -> str:
    """The per-variant table and the ratios, as printed on the terminal."""
    head = (
        f"{'variant':<26}{'rows':>5}{'median ms':>11}{'IQR ms':>15}{'steps/s':>9}{'img/s':>8}"
        f"{'GFLOP/step':>12}{'GFLOP/s':>10}{'MFU':>7}{'saved MiB':>11}{'peak MiB':>10}{'NVML MiB':>10}"
    )
    lines = [head, "-" * len(head)]
    for v in record["variants"]:
        if v.get("error"):
            lines.append(f"{v['label']:<26}{v['rows']:>5}  failed: {v['error']}")
            continue
        iqr = f"{v['q1_s'] * 1e3:.1f}-{v['q3_s'] * 1e3:.1f}"
        lines.append(
            f"{v['label']:<26}{v['rows']:>5}{v['median_s'] * 1e3:>11.1f}{iqr:>15}{v['steps_per_s']:>9.2f}"
            f"{v['images_per_s']:>8.2f}{_fmt(v['flops_per_step'], 1e9):>12}{_fmt(v['achieved_flops_per_s'], 1e9):>10}"
            f"{_fmt(v['mfu'], 0.01, 1):>7}{_fmt(v['saved_bytes'], MIB):>11}{_fmt(v['cuda_peak_bytes'], MIB, 0):>10}"
            f"{_fmt(v['nvml_used_bytes'], MIB, 0):>10}"
        )
    r = record["ratios"]
    lines.append("")
    lines.append(
        f"engine CAT / naive CAT: time {_fmt(r['engine_cat_over_naive_cat_time'], digits=3)}, "
        f"saved bytes {_fmt(r['engine_cat_over_naive_cat_saved_bytes'], digits=3)}"
        + (
            f", CUDA step memory {_fmt(r['engine_cat_over_naive_cat_cuda_step_bytes'], digits=3)}"
            if r.get("engine_cat_over_naive_cat_cuda_step_bytes") is not None
            else ""
        )
    )
    lines.append(
        f"engine LoRA / peft LoRA: time {_fmt(r['engine_lora_over_peft_lora_time'], digits=3)}; "
        f"CAT step / LoRA step: engine {_fmt(r['engine_cat_over_engine_lora_time'], digits=2)}, "
        f"naive {_fmt(r['naive_cat_over_peft_lora_time'], digits=2)}"
    )
    lines.append(
        "CAT overhead = (CAT step(B) - LoRA step(2B rows)) / no-grad forward(B): "
        f"engine {_fmt(r.get('cat_overhead_engine_fwd'), digits=2)}, naive {_fmt(r.get('cat_overhead_naive_fwd'), digits=2)}"
        " (target <= 1.0)"
    )
    if record.get("matmul_bf16_flops_per_s"):
        lines.append(
            f"bf16 matmul rate (MFU reference): {record['matmul_bf16_flops_per_s'] / 1e12:.1f} TFLOP/s"
        )
    for w in record.get("warnings", []):
        lines.append(f"warning: {w}")
    return "\n".join(lines)


def chart_name(config: dict) -> str:
    preset = Path(config["preset"]).name  # a folder preset: its name
    knobs = [config["precision"], config["attention"]]
    if config["checkpointing"]:
        knobs.append("ckpt")
    if config["compile"]:
        knobs.append("compile" if config["compile"] in (True, "default") else f"compile-{config['compile']}")
    if config.get("cuda_graphs"):
        knobs.append("graphs")
    device = str(config["device"]).split(":")[0]
    return f"bench_{preset}_{config['resolution']}px_b{config['batch']}_r{config['rank']}_{'_'.join(knobs)}_{device}.png"


def write_chart(record: dict, path: Path) -> Path:
    """Step time (median, IQR bars) and memory per variant, side by side; written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    variants = [v for v in record["variants"] if not v.get("error")]
    labels = [v["label"] for v in variants]
    y = list(range(len(variants)))
    colors = [
        "tab:blue"
        if v["name"].startswith("peft") or v["name"] == "naive_cat"
        else "tab:orange"
        if v["name"].startswith("engine")
        else "tab:gray"
        for v in variants
    ]
    fig = Figure(figsize=(12, 0.45 * len(variants) + 2.2))
    ax_t, ax_m = fig.subplots(1, 2, sharey=True)
    med = [v["median_s"] * 1e3 for v in variants]
    err = [
        [(v["median_s"] - v["q1_s"]) * 1e3 for v in variants],
        [(v["q3_s"] - v["median_s"]) * 1e3 for v in variants],
    ]
    ax_t.barh(y, med, xerr=err, color=colors, capsize=3)
    ax_t.set_yticks(y, labels)
    ax_t.invert_yaxis()
    ax_t.set_xlabel("step time, ms (median, IQR)")
    series = [("saved_bytes", "saved for backward", None)]
    if any(
        v["cuda_step_bytes"] for v in variants
    ):  # a GPU run: also the allocator's peak above the step start
        series.append(("cuda_step_bytes", "CUDA peak above step start", "//"))
    height = 0.8 / len(series)
    for i, (key, what, hatch) in enumerate(series):
        offset = (i - (len(series) - 1) / 2) * height
        ax_m.barh(
            [k + offset for k in y],
            [(v[key] or 0) / MIB for v in variants],
            height=height,
            color=colors,
            hatch=hatch,
            edgecolor="black" if hatch else None,
            label=what,
        )
    if len(series) > 1:
        ax_m.legend(fontsize=8)
    ax_m.set_xlabel("memory, MiB" if len(series) > 1 else f"{series[0][1]}, MiB")
    cfg = record["config"]
    fig.suptitle(
        f"{cfg['preset']} {cfg['resolution']} px, batch {cfg['batch']}, rank {cfg['rank']}, {cfg['precision']}, "
        f"{cfg['attention']}{', ckpt' if cfg['checkpointing'] else ''}{', compile' if cfg['compile'] else ''} "
        f"on {record['device']['name']} ({record['time']})",
        fontsize=9,
    )
    fig.tight_layout()
    return write_atomically(path, lambda tmp: fig.savefig(tmp, dpi=100, format="png"))


def summary(records: list[dict]) -> str:
    """One line per run: the numbers the GPU suite prints last."""
    head = f"{'preset':<8}{'px':>6}{'B':>3} {'prec':<5}{'ckpt':<5}{'naive ms':>10}{'engine ms':>10}{'eng/naive':>10}{'ovh eng':>8}{'ovh naive':>10}{'peak GiB':>9}"
    lines = [head]
    for rec in records:
        c, r = rec["config"], rec["ratios"]
        v = {x["name"]: x for x in rec["variants"]}
        naive, engine = v.get("naive_cat", {}), v.get("engine_cat", {})  # absent: not selected
        peak = engine.get("cuda_peak_bytes")
        lines.append(
            f"{Path(c['preset']).name:<8}{c['resolution']:>6}{c['batch']:>3} {c['precision']:<5}"
            f"{('on' if c['checkpointing'] else 'off'):<5}{_fmt(naive.get('median_s'), 1e-3):>10}"
            f"{_fmt(engine.get('median_s'), 1e-3):>10}{_fmt(r['engine_cat_over_naive_cat_time'], digits=3):>10}"
            f"{_fmt(r.get('cat_overhead_engine_fwd'), digits=2):>8}{_fmt(r.get('cat_overhead_naive_fwd'), digits=2):>10}"
            f"{_fmt(peak, 2**30, 2):>9}"
        )
    return "\n".join(lines)


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


if __name__ == "__main__":
    if len(sys.argv) != 2:
        print("usage: python -m cat_engine.bench.report RESULTS.jsonl", file=sys.stderr)
        sys.exit(2)
    print(summary(read_jsonl(Path(sys.argv[1]))))
