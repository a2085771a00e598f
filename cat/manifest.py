"""``cat-engine train --manifest concepts.yaml``: a LoRA farm, one adapter per concept listed.

The manifest (YAML)::

    output: runs/farm             # the farm's folder; each concept trains into output/NAME
    defaults: {steps: 400}        # options for every concept (any cat-engine train option)
    kps: {seeds: 2, steps: 20}    # the KPS run after each adapter (eval options), or false
    concepts:
      - name: bug                 # default: TOKEN-CLASS_WORD
        data: photos/bug          # relative folders are read from the manifest's own folder
        token: zwx
        class_word: bug
        rank: 8                   # any option, for this concept only

Precedence, lowest first: built-in defaults, ``--config``, the manifest's ``defaults``, the concept's
entry, then the flags on the command line (``--steps 10`` shortens every concept's run). Under
torchrun concept ``i`` trains on rank ``i % world`` (each rank on its own device, one process per
adapter, no DDP); rank 0 prints a summary table at the end and writes it to ``output/summary.json``.
A concept that fails (a bad data folder...) is reported in the table and the others still run.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time
from pathlib import Path

from cat_engine.cat.config import (
    OPTIONS,
    ConfigError,
    TrainConfig,
    build_config,
    load_yaml,
    options_of,
    read_yaml,
)
from cat_engine.cat.data import concept_list
from cat_engine.cat.eval import EvalConfig, evaluate, read_templates
from cat_engine.cat.report import write_report
from cat_engine.cat.train import LOG_FILE, train
from cat_engine.engine import distributed as dist
from cat_engine.engine.errors import CatEngineError
from cat_engine.engine.files import write_text_atomically

log = logging.getLogger("cat_engine")
SUMMARY_FILE = "summary.json"
KPS_FOLDER = "kps"
MANIFEST_KEYS = ("output", "defaults", "kps", "concepts")
# The KPS run of a farm is a quick look, not a benchmark: few seeds and sampling steps by default.
KPS_DEFAULTS = {"seeds": 2, "steps": 20}
KPS_OPTIONS = ("seeds", "steps", "guidance", "clip", "resolution", "prompts", "batch_size", "dtype")
# Flags that name one concept's data: meaningless for a farm of many.
PER_CONCEPT_FLAGS = ("data", "token", "class_word", "concepts", "resume")


def _options(raw: dict, where: str) -> dict:
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a mapping of options, got {raw!r}")
    for key in raw:
        if str(key).replace("-", "_") not in OPTIONS:
            raise ConfigError(f"{where}: unknown option {key!r}")
    return options_of(raw, where)


def check_concept_name(name, root_hint: str) -> str:
    """``name`` when it is one plain folder name inside the farm's folder: not empty, ``.`` or
    ``..``, no path separator, and not the farm's own summary file. The message names the manifest."""
    if isinstance(name, bool) or not isinstance(name, (str, int)):
        raise ConfigError(f"{root_hint}: concept name {name!r} must be a string")
    name = str(name)
    separators = {"/", "\\", os.sep, os.altsep or "/", "\0"}
    plain = name not in ("", ".", "..") and not any(sep in name for sep in separators)
    if not plain or Path(name).is_absolute() or Path(name).name != name:
        raise ConfigError(
            f"{root_hint}: concept name {name!r} is not a folder name inside the farm's folder "
            "(one path component: no '/', not '.' or '..')"
        )
    if name == SUMMARY_FILE:
        raise ConfigError(f"{root_hint}: concept name {name!r} is the farm's summary file; choose another")
    return name


def read_manifest(path: str | Path) -> dict:
    """The manifest as ``{output, defaults, kps, concepts: [(name, options)]}``; data folders made absolute."""
    path = Path(path).expanduser()
    raw = read_yaml(path, "--manifest")
    if isinstance(raw, list):  # a bare list of concepts
        raw = {"concepts": raw}
    if not isinstance(raw, dict) or not raw.get("concepts"):
        raise ConfigError(f"--manifest {path}: expected 'concepts:' with a list of concepts")
    unknown = sorted(set(raw) - set(MANIFEST_KEYS))
    if unknown:
        raise ConfigError(
            f"--manifest {path}: unknown key {unknown[0]!r} (known: {', '.join(MANIFEST_KEYS)})"
        )
    kps = raw.get("kps", {})
    if kps is not False:
        if not isinstance(kps or {}, dict):
            raise ConfigError(
                f"--manifest {path}: kps: expected a mapping of eval options or false, got {kps!r}"
            )
        kps = {str(k).replace("-", "_"): v for k, v in (kps or {}).items()}
        bad = sorted(set(kps) - set(KPS_OPTIONS))
        if bad:
            raise ConfigError(
                f"--manifest {path}: kps: unknown option {bad[0]!r} (known: {', '.join(KPS_OPTIONS)})"
            )
        kps = {**KPS_DEFAULTS, **kps}
    defaults = _options(raw.get("defaults") or {}, f"--manifest {path}: defaults")
    if not isinstance(raw["concepts"], list):
        raise ConfigError(
            f"--manifest {path}: concepts: expected a list of concepts, got {raw['concepts']!r}"
        )
    concepts, names = [], set()
    for i, entry in enumerate(raw["concepts"]):
        if not isinstance(entry, dict):
            raise ConfigError(f"--manifest {path}: concepts[{i}] must be a mapping of options")
        entry = dict(entry)
        name = entry.pop("name", "") or f"{entry.get('token', 'sks')}-{entry.get('class_word', 'star')}"
        name = check_concept_name(name, f"--manifest {path}: concepts[{i}]")
        if name in names:
            raise ConfigError(f"--manifest {path}: concept name {name!r} repeated; give each concept its own")
        names.add(name)
        options = _options(entry, f"--manifest {path}: concepts[{i}] ({name})")
        if options.get("data"):
            data = Path(str(options["data"])).expanduser()
            options["data"] = str(data if data.is_absolute() else path.parent / data)
        for concept in options.get("concepts") or []:  # a multi-concept adapter in the farm
            if isinstance(concept, dict) and concept.get("data") and not Path(concept["data"]).is_absolute():
                concept["data"] = str(path.parent / concept["data"])
        concepts.append((name, options))
    return {"output": raw.get("output"), "defaults": defaults, "kps": kps, "concepts": concepts}


def farm_configs(args: argparse.Namespace, manifest: dict) -> tuple[Path, list[tuple[str, TrainConfig]]]:
    """The farm folder and every concept's validated config (all checked before any training)."""
    given = {k: getattr(args, k) for k in OPTIONS if getattr(args, k, None) is not None}
    clash = [k for k in PER_CONCEPT_FLAGS if k in given]
    if clash:
        flag = "--" + clash[0].replace("_", "-")
        raise ConfigError(f"{flag} cannot be combined with --manifest: set it per concept in the manifest")
    root = Path(given.pop("output", None) or manifest["output"] or TrainConfig.output)
    base = load_yaml(args.config) if args.config else {}
    configs = []
    for name, options in manifest["concepts"]:
        try:
            config = build_config({**base, **manifest["defaults"], **options}, given)
        except ConfigError as exc:
            raise ConfigError(f"--manifest concept {name}: {exc}") from None
        config.output = str(root / name)
        configs.append((name, config))
    return root, configs


def kps_config(config: TrainConfig, kps: dict, lora: Path) -> EvalConfig:
    """The KPS run of one concept's adapter: its base, concept and references, and the manifest's ``kps``."""
    concept = concept_list(config)[0]
    options = dict(kps)
    prompts = options.pop("prompts", None)
    if isinstance(prompts, str):  # a file of templates; else the templates listed inline
        prompts = read_templates(prompts)
    return EvalConfig(
        base=config.base,
        lora=str(lora),
        refs=concept["data"],
        token=concept["token"],
        class_word=concept["class_word"],
        **({} if prompts is None else {"templates": prompts}),
        **options,
    )


def _final_losses(output: Path) -> dict:
    lines = (output / LOG_FILE).read_text().splitlines() if (output / LOG_FILE).is_file() else []
    last = json.loads(lines[-1]) if lines else {}
    return {"steps": last.get("step"), "ldm": last.get("ldm"), "cat": last.get("cat")}


def train_concept(
    name: str, config: TrainConfig, kps, farm: Path, ranks: dist.DistContext, progress: bool
) -> dict:
    """Train one adapter (this process alone) and score it; a row of the summary table."""
    row = {"concept": name, "rank": ranks.rank, "output": config.output}
    device = dist.device_for(config.device, ranks)
    if device.type == "cuda":  # this rank's own GPU: the farm runs one adapter per device
        config.device = str(device)
    start = time.perf_counter()
    try:
        lora = train(config, progress=progress)
        row.update(_final_losses(Path(config.output)), train_seconds=round(time.perf_counter() - start, 1))
        if kps is not False and config.concepts is None:
            report = evaluate(kps_config(config, kps, lora), device=device, progress=False)
            write_report(report, Path(config.output) / KPS_FOLDER)
            row.update(kps=report.kps, identity=report.identity, preservation=report.preservation)
    except (CatEngineError, ValueError, RuntimeError) as exc:  # the engine's errors are ValueErrors
        log.error("concept %s failed: %s", name, exc)
        row["error"] = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return row


def format_table(rows: list[dict]) -> str:
    columns = ("concept", "rank", "steps", "ldm", "cat", "kps", "identity", "preservation", "output")

    def cell(row, key):
        value = row.get(key)
        if key == "output" and "error" in row:
            return "FAILED: " + row["error"]
        if isinstance(value, float):
            return f"{value:.4g}"
        return "-" if value is None else str(value)

    table = [columns] + [tuple(cell(r, k) for k in columns) for r in rows]
    widths = [max(len(line[i]) for line in table) for i in range(len(columns))]
    return "\n".join("  ".join(v.ljust(w) for v, w in zip(line, widths)).rstrip() for line in table)


def run_manifest(args: argparse.Namespace) -> int:
    """Train every concept of ``--manifest`` (sharded over the ranks); rank 0 writes the summary."""
    manifest = read_manifest(args.manifest)
    farm, configs = farm_configs(args, manifest)
    ranks = dist.init_distributed(configs[0][1].device)
    try:
        farm.mkdir(parents=True, exist_ok=True)
        rows = []
        for i, (name, config) in enumerate(configs):
            if i % ranks.world == ranks.rank:
                rows.append(train_concept(name, config, manifest["kps"], farm, ranks, progress=ranks.main))
        rows = [r for part in dist.gather_objects(ranks, rows) for r in part]
    finally:
        dist.shutdown(ranks)
    if not ranks.main:
        return 0
    order = {str(config.output): i for i, (_, config) in enumerate(configs)}
    rows.sort(key=lambda r: order[r["output"]])
    write_text_atomically(
        farm / SUMMARY_FILE, json.dumps({"concepts": rows, "ranks": ranks.world}, indent=1) + "\n"
    )
    print(format_table(rows))
    print(f"wrote {farm / SUMMARY_FILE}")
    return 1 if any("error" in r for r in rows) else 0
