"""The record of a toy-world experiment: statistics per arm, paired differences, the decision, a plot.

Every interval is a 95% bootstrap interval that resamples concepts and, within each, seeds
(:func:`cat_engine.cat.stats.hierarchical`); per concept, seeds only. For each arm of the record:

- ``metrics``: the mean of each metric over concepts (of the means over seeds), its interval, and
  each concept's;
- ``vs_lora`` (CAT arms): CAT - LoRA at the same number of steps, paired by concept and training seed;
- ``vs_reference`` (an arm with another plain mode or ``cat_every``): the arm minus the same weight
  and steps with plain mode ``class`` and the CAT term on every step, paired likewise;
- ``gain_vs_steps_N`` (an arm with more steps than the fewest): its CAT - LoRA gain minus the gain of
  the same arm at N steps, paired likewise.

:func:`decide` applies the rule the README states (the default weight) and the follow-ups' rules.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import numpy as np

from cat_engine.cat import stats
from cat_engine.cat.experiment import Arm

FIVE = ("kps", "identity", "preservation", "leakage", "diversity_adapter")
SHORT = {
    "kps": "KPS",
    "identity": "identity",
    "preservation": "preservation",
    "leakage": "leakage",
    "diversity_adapter": "diversity",
}
IDENTITY_DROP_BOUND = 0.02  # the most identity the default weight may lose (CI upper bound)
NON_INFERIORITY = 0.01  # how much KPS a cheaper cat-every may lose (CI lower bound), the eval's own noise


def by_concept(rows: list[dict], value) -> dict[str, list[float]]:
    out = defaultdict(list)
    for r in sorted(rows, key=lambda r: (r["concept"], r["seed"])):
        out[r["concept"]].append(value(r))
    return dict(out)


def describe(groups: dict[str, list[float]]) -> dict:
    """The pooled mean and interval, each concept's (seeds only), and the spread between seeds.

    ``seed_sd``: the standard deviation between training seeds within a concept, pooled over the
    concepts (root mean of their sample variances): training's spread plus the evaluation's own.
    """
    variances = [stats.sample_std(v) ** 2 for v in groups.values() if len(v) > 1]
    seed_sd = float(np.sqrt(np.mean(variances))) if variances else None
    return stats.hierarchical(groups) | {
        "seed_sd": seed_sd,
        "per_concept": {c: stats.seeds_only(v) for c, v in groups.items()},
    }


def paired(rows: dict[tuple, dict], *arms_and_signs: tuple[Arm, int]) -> dict | None:
    """The signed sum over ``arms_and_signs`` of each metric, for every (concept, seed) that has all arms."""
    keys = sorted({(c, s) for (c, s, _) in rows})
    complete = [k for k in keys if all((*k, arm) in rows for arm, _ in arms_and_signs)]
    if not complete:
        return None
    out = {}
    for m in FIVE:
        groups = defaultdict(list)
        for c, s in complete:
            groups[c].append(sum(sign * rows[(c, s, arm)][m] for arm, sign in arms_and_signs))
        out[m] = describe(dict(groups))
    return out | {"pairs": len(complete)}


def summarise(rows: list[dict]) -> list[dict]:
    """One entry per arm in the rows (see the module's docstring), LoRA and the weight sweep first."""
    index = {(r["concept"], r["seed"], Arm.of(r)): r for r in rows}
    arms = sorted({arm for (_, _, arm) in index}, key=Arm.sort_key)
    fewest = {}
    for arm in arms:
        key = (arm.cat_weight, arm.plain_mode, arm.cat_every)
        fewest[key] = min(fewest.get(key, arm.steps), arm.steps)
    out = []
    for arm in arms:
        mine = [r for (_, _, a), r in index.items() if a == arm]
        entry = {
            "arm": arm.to_dict(),
            "label": arm.label(),
            "runs": len(mine),
            "metrics": {m: describe(by_concept(mine, lambda r, m=m: r[m])) for m in FIVE},
        }
        if not arm.lora:
            entry["vs_lora"] = paired(index, (arm, 1), (arm.baseline(), -1))
            if arm.reference() != arm:
                entry["vs_reference"] = paired(index, (arm, 1), (arm.reference(), -1))
                entry["reference"] = arm.reference().label()
            low = fewest[(arm.cat_weight, arm.plain_mode, arm.cat_every)]
            if low < arm.steps:
                short = dataclass_replace(arm, steps=low)
                entry[f"gain_vs_steps_{low}"] = paired(
                    index, (arm, 1), (arm.baseline(), -1), (short, -1), (short.baseline(), 1)
                )
        out.append(entry)
    return out


def dataclass_replace(arm: Arm, **changes) -> Arm:
    values = arm.to_dict() | changes
    return Arm.make(values["cat_weight"], values["plain_mode"], values["steps"], values["cat_every"])


def find(summary: list[dict], arm: Arm) -> dict | None:
    return next((e for e in summary if Arm(**e["arm"]) == arm), None)


def identity_drop(entry: dict) -> dict:
    """LoRA identity - CAT identity (paired): the negated CAT - LoRA difference and interval."""
    diff = entry["vs_lora"]["identity"]
    return {"mean": -diff["mean"], "ci": [-diff["ci"][1], -diff["ci"][0]]}


def decide(summary: list[dict]) -> dict:
    """The README's rules applied to the record: the default weight, then the follow-ups at that weight."""
    sweep = [
        e
        for e in summary
        if not Arm(**e["arm"]).lora and Arm(**e["arm"]).reference() == Arm(**e["arm"]) and e.get("vs_lora")
    ]
    if not sweep:
        return {"verdict": "no CAT arm with a paired LoRA arm in the record"}
    budget = min(e["arm"]["steps"] for e in sweep)
    candidates = []
    for e in (e for e in sweep if e["arm"]["steps"] == budget):
        drop = identity_drop(e)
        candidates.append(
            {
                "cat_weight": e["arm"]["cat_weight"],
                "kps": e["metrics"]["kps"]["mean"],
                "kps_vs_lora": e["vs_lora"]["kps"],
                "identity_drop": drop,
                "qualifies": drop["ci"][1] <= IDENTITY_DROP_BOUND,
            }
        )
    qualifying = [c for c in candidates if c["qualifies"]]
    result = {
        "rule": f"the CAT weight with the highest pooled KPS among those whose identity drop (LoRA - CAT, "
        f"paired) has a 95% CI upper bound <= {IDENTITY_DROP_BOUND}; if none qualifies, keep 1.0",
        "steps": budget,
        "candidates": candidates,
    }
    if qualifying:
        best = max(qualifying, key=lambda c: c["kps"])
        weight = best["cat_weight"]
        result["verdict"] = f"weight {weight:g} (pooled KPS {best['kps']:.4f})"
    else:
        weight = 1.0
        result["verdict"] = "no weight qualifies: the default stays 1.0"
    result["chosen_weight"] = weight
    result["follow_ups"] = follow_ups(summary, weight, budget)
    return result


def follow_ups(summary: list[dict], weight: float, budget: int) -> dict:
    """Plain mode ``empty``, twice the steps and cat-every at the chosen weight, each by its rule."""
    out = {}
    empty = find(summary, Arm.make(weight, "empty", budget, 1))
    if empty and empty.get("vs_reference"):
        diff, drop = empty["vs_reference"]["kps"], identity_drop(empty)
        out["plain_mode_empty"] = {
            "rule": f"adopt if empty - class pooled KPS has CI lower bound > 0 and identity drop CI upper bound <= {IDENTITY_DROP_BOUND}",
            "kps_vs_class": diff,
            "identity_drop": drop,
            "adopt": diff["ci"][0] > 0 and drop["ci"][1] <= IDENTITY_DROP_BOUND,
        }
    longer = find(summary, Arm.make(weight, "class", 2 * budget, 1))
    gain = longer.get(f"gain_vs_steps_{budget}") if longer else None
    if gain:
        out["twice_the_steps"] = {
            "rule": "adopt for the demo if (CAT - LoRA at 2x steps) - (CAT - LoRA at 1x) pooled KPS has CI lower bound > 0",
            "kps_gain_difference": gain["kps"],
            "kps_vs_lora": longer["vs_lora"]["kps"],
            "identity_drop": identity_drop(longer),
            "adopt": gain["kps"]["ci"][0] > 0,
        }
    for e in summary:
        arm = Arm(**e["arm"])
        if (
            arm.cat_weight == weight
            and arm.steps == budget
            and arm.plain_mode == "class"
            and arm.cat_every > 1
        ):
            if not e.get("vs_reference"):
                continue
            diff, drop = e["vs_reference"]["kps"], identity_drop(e)
            out[f"cat_every_{arm.cat_every}"] = {
                "rule": f"acceptable if k - (k=1) pooled KPS has CI lower bound >= -{NON_INFERIORITY} and "
                f"identity drop CI upper bound <= {IDENTITY_DROP_BOUND}",
                "kps_vs_every_step": diff,
                "identity_drop": drop,
                "acceptable": diff["ci"][0] >= -NON_INFERIORITY and drop["ci"][1] <= IDENTITY_DROP_BOUND,
            }
    return out


# ------------------------------------------------------------------------------------ the record
def _cell(d: dict, signed: bool = False) -> str:
    fmt = "{:+.3f}" if signed else "{:.3f}"
    return f"{fmt.format(d['mean'])} [{fmt.format(d['ci'][0])}, {fmt.format(d['ci'][1])}]"


def markdown(summary: list[dict]) -> str:
    head = "| arm | runs | " + " | ".join(SHORT[m] for m in FIVE) + " |"
    rule = "|" + "---|" * (2 + len(FIVE))
    lines = ["Mean over concepts (95% CI, concepts and seeds resampled):", "", head, rule]
    for e in summary:
        lines.append(
            f"| {e['label']} | {e['runs']} | " + " | ".join(_cell(e["metrics"][m]) for m in FIVE) + " |"
        )
    lines += [
        "",
        "Paired by concept and training seed (95% CI):",
        "",
        "| comparison | pairs | " + " | ".join(SHORT[m] for m in FIVE) + " |",
        rule,
    ]
    for e in summary:
        for key, what in (("vs_lora", "LoRA"), ("vs_reference", e.get("reference"))):
            if e.get(key):
                lines.append(
                    f"| {e['label']} − {what} | {e[key]['pairs']} | "
                    + " | ".join(_cell(e[key][m], True) for m in FIVE)
                    + " |"
                )
        for key in (k for k in e if k.startswith("gain_vs_steps_") and e[k]):
            lines.append(
                f"| gain at {e['arm']['steps']} − gain at {key.rsplit('_', 1)[1]} steps ({e['label']}) | {e[key]['pairs']} | "
                + " | ".join(_cell(e[key][m], True) for m in FIVE)
                + " |"
            )
    return "\n".join(lines)


def record(rows: list[dict], concepts: list[str], seeds: int) -> dict:
    """Every run, the summary, the decision and the Markdown tables of ``rows``."""
    rows = sorted(rows, key=lambda r: (Arm.of(r).sort_key(), r["concept"], r["seed"]))
    summary = summarise(rows)
    return {
        "concepts": concepts,
        "seeds": list(range(seeds)),
        "bootstrap": {
            "level": stats.LEVEL,
            "replicates": stats.REPLICATES,
            "seed": stats.SEED,
            "resampled": "concepts, then seeds within each",
        },
        "runs": rows,
        "summary": summary,
        "decision": decide(summary),
        "table_markdown": markdown(summary),
    }


def plot(result: dict, path: Path) -> Path:
    """The five metrics against the CAT weight (LoRA at 0) with their intervals; other arms beside.

    Top row: each arm's pooled mean; bottom row: CAT - LoRA, paired. The sweep (plain mode class,
    CAT every step, the fewest steps) is the line; other arms are single marked points just right of
    their weight.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from cat_engine.engine.files import write_atomically

    summary = result["summary"]
    budget = min(e["arm"]["steps"] for e in summary)
    line = [
        e for e in summary if Arm(**e["arm"]).reference() == Arm(**e["arm"]) and e["arm"]["steps"] == budget
    ]
    others = [e for e in summary if e not in line]
    fig, axes = plt.subplots(2, len(FIVE), figsize=(4 * len(FIVE), 7), squeeze=False)
    markers = iter("sD^v<>ph*")
    styles = {}
    for col, m in enumerate(FIVE):
        for row, key in enumerate(("metrics", "vs_lora")):
            ax = axes[row][col]
            pts = [
                (e["arm"]["cat_weight"], e[key][m] if key == "metrics" else (e.get(key) or {}).get(m))
                for e in line
            ]
            if key == "vs_lora":
                pts = [(0.0, {"mean": 0.0, "ci": [0.0, 0.0]})] + [p for p in pts if p[0] > 0 and p[1]]
            pts = [p for p in pts if p[1]]
            xs = [p[0] for p in pts]
            ax.errorbar(
                xs,
                [p[1]["mean"] for p in pts],
                yerr=_yerr(p[1] for p in pts),
                marker="o",
                capsize=3,
                label=f"plain class, every step, {budget} steps",
            )
            for i, e in enumerate(others, 1):
                value = e[key][m] if key == "metrics" else (e.get(key) or {}).get(m)
                if not value:
                    continue
                label = e["label"]
                if label not in styles:
                    styles[label] = next(markers, "x")
                ax.errorbar(
                    [e["arm"]["cat_weight"] + 0.05 * i],  # beside the sweep's point, each arm its own place
                    [value["mean"]],
                    yerr=_yerr([value]),
                    marker=styles[label],
                    linestyle="none",
                    capsize=3,
                    label=label,
                )
            if key == "vs_lora":
                ax.axhline(0.0, color="gray", linewidth=0.8)
            ax.set_title(f"{SHORT[m]}" + (" (CAT − LoRA, paired)" if key == "vs_lora" else ""))
            ax.set_xlabel("CAT weight λ (0 = LoRA)")
    seen = {}  # label -> handle, over every panel (an arm may be missing from some)
    for ax in axes.flat:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            seen.setdefault(label, handle)
    fig.legend(list(seen.values()), list(seen.keys()), loc="lower center", ncol=min(4, len(seen)))
    n_concepts, n_seeds = len(result["concepts"]), len(result["seeds"])
    fig.suptitle(
        f"Toy world: {n_concepts} concepts × {n_seeds} training seeds{_partial(result)}; mean over concepts, "
        "95% bootstrap CI (concepts, then seeds)"
    )
    fig.tight_layout(rect=(0, 0.06, 1, 0.96))
    out = write_atomically(Path(path), lambda p: fig.savefig(p, format="png", dpi=90))
    plt.close(fig)
    return out


def _yerr(values) -> list[list[float]]:
    values = list(values)
    return [[v["mean"] - v["ci"][0] for v in values], [v["ci"][1] - v["mean"] for v in values]]


def _partial(result: dict) -> str:
    """`` (partial: N of M runs)`` when the record lacks runs, so a picture never claims the full design."""
    missing, done = len(result.get("missing_runs") or ()), len(result.get("runs") or ())
    return f" (partial: {done} of {done + missing} runs)" if missing else ""
