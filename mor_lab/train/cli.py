"""``mor-lab train RECIPE [--size quick|full] [--seed N] [--out DIR] [--resume] [--set KEY=VALUE ...]``.

Runs a named recipe (:mod:`mor_lab.train.recipes`) and prints its summary as JSON. Under
``accelerate launch --multi_gpu --num_processes N -m mor_lab.cli train ...`` it trains data-parallel
(on a CPU-only machine: N CPU processes over gloo).
"""
from __future__ import annotations

import argparse
import json
import sys


def add_parser(sub) -> argparse.ArgumentParser:
    from ..runtime import pick
    from .recipes import RECIPES, SIZES
    p = sub.add_parser("train", help="train a named recipe (progress bar, JSON log, resumable checkpoints)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                       epilog="recipes:\n" + "\n".join(f"  {r.name:20s} {r.summary}" for r in RECIPES.values()))
    p.add_argument("recipe", help="the recipe's name (see below)")
    p.add_argument("--size", choices=SIZES, default=pick(quick="quick", full="full"),
                   help="quick: a CPU smoke run of seconds; full: the recipe "
                        "(default: full, quick when MOR_LAB_QUICK=1)")
    p.add_argument("--seed", type=int, default=0, help="model init and data order (default 0)")
    p.add_argument("--out", default=None, help="output directory (default: runs/RECIPE-SIZE-seedN)")
    p.add_argument("--resume", action="store_true", help="continue the checkpoint in --out")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override one of the size's parameters (JSON value, e.g. --set lr=2e-3 --set rank=8)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def parse_overrides(items: list[str]) -> dict:
    overrides = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--set takes KEY=VALUE, got {item!r}")
        try:
            overrides[key] = json.loads(value)
        except json.JSONDecodeError:
            overrides[key] = value  # a bare string, e.g. --set corpus=pydoc
    return overrides


def run(args) -> int:
    from ..models.hf import ModelLoadError
    from ..train.data import CorpusError
    from .recipes import run_recipe
    try:
        summary = run_recipe(args.recipe, args.size, seed=args.seed, out=args.out, resume=args.resume,
                             overrides=parse_overrides(args.overrides), progress=not args.no_progress)
    except (ValueError, CorpusError, ModelLoadError, FileNotFoundError) as e:
        print(f"mor-lab train: {e}", file=sys.stderr)
        return 2
    from accelerate import PartialState
    if PartialState().is_main_process:  # under accelerate launch: one summary, not one per process
        print(json.dumps(summary, indent=1, default=str))
    return 0
