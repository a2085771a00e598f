"""``cat-engine`` command line: one sub-command per module, each exposing ``add_arguments`` and ``run``.

This module sits above every layer (``bench → cat → engine → kernels``), so it is the one place that
may name them all. Sub-command modules are imported only when chosen, so ``cat-engine --help``
stays fast and one broken optional feature cannot take the others down.

Library code raises :class:`~cat_engine.engine.errors.CatEngineError` for anything the user can fix;
here, and only here, it becomes one line on stderr and exit code 2. A run stopped by SIGINT or
SIGTERM ends with one line saying what was kept, and exit code 128 + the signal's number.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from cat_engine import __version__
from cat_engine.engine.errors import CatEngineError

# name -> (module, one-line help)
COMMANDS = {
    "train": ("cat_engine.cat.train", "train a LoRA adapter with the CAT objective"),
    "eval": ("cat_engine.cat.eval", "Knowledge Preservation Score (KPS) of a trained adapter"),
    "bench": ("cat_engine.bench.cli", "profile CAT against diffusers + peft, side by side"),
    "plan": ("cat_engine.cat.plan", "predict peak VRAM and pick the fastest plan that fits a budget"),
    "demo": ("cat_engine.cat.demo", "train plain LoRA and CAT on a built-in concept and compare them"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cat-engine",
        description="Contrastive Adapter Training (CAT) of LoRA adapters on Stable-Diffusion-class UNets. "
        "Run `cat-engine COMMAND --help` for a command's options.",
    )
    parser.add_argument("--version", action="version", version=f"cat-engine {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_module_name, help_text) in COMMANDS.items():
        sub.add_parser(name, help=help_text, add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in COMMANDS:
        parser = build_parser()
        if argv and not argv[0].startswith("-"):
            parser.print_usage(sys.stderr)
            print(
                f"cat-engine: unknown command {argv[0]!r}; choose from {', '.join(COMMANDS)}", file=sys.stderr
            )
            return 2
        parser.parse_args(argv)  # --help and --version exit here; anything else is a usage error
        parser.print_help()
        return 0
    name, rest = argv[0], argv[1:]
    module_name, help_text = COMMANDS[name]
    from cat_engine.engine.quantize import quiet_torchao_import_logs

    quiet_torchao_import_logs()  # before the command's imports: peft imports torchao when installed
    module = importlib.import_module(module_name)
    parser = argparse.ArgumentParser(prog=f"cat-engine {name}", description=help_text)
    module.add_arguments(parser)
    args = parser.parse_args(rest)
    try:
        return int(module.run(args) or 0)
    except CatEngineError as exc:
        print(f"cat-engine {name}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:  # SIGINT/SIGTERM: the message says what was kept (engine/signals.py)
        print(f"cat-engine {name}: {exc or 'interrupted'}", file=sys.stderr)
        return getattr(exc, "exit_code", 130)
