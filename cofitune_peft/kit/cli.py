"""The `cofitune` command: `cofitune importance`, `cofitune search`, `cofitune report`, `cofitune demo`.

Each sub-command lives in the module that implements it, which provides `add_<name>_arguments(parser)` and
`<name>_command(args) -> int`; this file only wires them up.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from cofitune_peft import CoFiTuneError

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
    try:
        return int(args.func(args) or 0)
    except CoFiTuneError as err:
        print(f"cofitune {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
