"""``cat-engine`` command line: one sub-command per module, each exposing ``add_arguments`` and ``run``.

Sub-command modules are imported only when chosen, so ``cat-engine --help`` stays fast and one
broken optional feature cannot take the others down.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# name -> (module, one-line help)
COMMANDS = {
    "train": ("cat_engine.cat.train", "train a LoRA adapter with the CAT objective"),
    "eval": ("cat_engine.cat.eval", "Knowledge Preservation Score (KPS) of a trained adapter"),
    "bench": ("cat_engine.bench.cli", "profile CAT against diffusers + peft, side by side"),
    "plan": ("cat_engine.cat.plan", "predict peak VRAM and pick the fastest plan that fits a budget"),
    "demo": ("cat_engine.cat.demo", "train plain LoRA and CAT on a built-in concept and compare them"),
}


class UserError(Exception):
    """An error the user can fix; printed as one line, without a traceback."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cat-engine",
        description="Contrastive Adapter Training (CAT) of LoRA adapters on Stable-Diffusion-class UNets. "
        "Run `cat-engine COMMAND --help` for a command's options.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_module_name, help_text) in COMMANDS.items():
        sub.add_parser(name, help=help_text, add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        parser = build_parser()
        if argv and argv[0] not in ("-h", "--help"):
            parser.print_usage(sys.stderr)
            print(
                f"cat-engine: unknown command {argv[0]!r}; choose from {', '.join(COMMANDS)}", file=sys.stderr
            )
            return 2
        parser.print_help()
        return 0
    name, rest = argv[0], argv[1:]
    module_name, help_text = COMMANDS[name]
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name and exc.name.startswith("cat_engine"):
            print(
                f"cat-engine {name}: not available in this version ({exc.name} is missing)", file=sys.stderr
            )
            return 2
        raise
    parser = argparse.ArgumentParser(prog=f"cat-engine {name}", description=help_text)
    module.add_arguments(parser)
    args = parser.parse_args(rest)
    try:
        return int(module.run(args) or 0)
    except UserError as exc:
        print(f"cat-engine {name}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"cat-engine {name}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    # Run the imported module's main, so `UserError` raised by sub-commands is this very class
    # (as __main__, this file would define a second, different UserError).
    from cat_engine.cat.cli import main as _main

    sys.exit(_main())
