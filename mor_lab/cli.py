"""The ``mor-lab`` command: ``generate`` text, run ``bench`` suites, open the ``lab``."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

SUITES = {"generate": "mor_lab.bench.generate", "early-exit": "mor_lab.bench.early_exit", "cdb": "mor_lab.bench.cdb",
          "kernels": "mor_lab.bench.kernels", "mor": "mor_lab.bench.mor"}


def _batch_sizes(text: str) -> tuple[int, ...]:
    try:
        sizes = tuple(int(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--batch-sizes takes comma-separated integers like 1,8,32, got {text!r}")
    if not sizes or min(sizes) < 1:
        raise argparse.ArgumentTypeError("--batch-sizes must all be >= 1")
    return sizes


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mor-lab", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="generate text for one or more prompts")
    gen.add_argument("prompts", nargs="+")
    gen.add_argument("--model", default=None, help="local checkpoint dir or HF id (default: offline SmolLM2)")
    gen.add_argument("--max-new-tokens", type=int, default=64)
    gen.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    gen.add_argument("--temperature", type=float, default=1.0)
    gen.add_argument("--top-k", type=int, default=None)
    gen.add_argument("--top-p", type=float, default=None)
    gen.add_argument("--seed", type=int, default=None)
    gen.add_argument("--no-chat", action="store_true", help="do not apply the chat template")

    bench = sub.add_parser("bench", help="side-by-side benchmark suites (JSON output)")
    bench.add_argument("suite", choices=sorted(SUITES))
    bench.add_argument("--quick", action="store_true", help="fewer tokens and repetitions (CPU smoke run)")
    bench.add_argument("--json", dest="json_path", default=None, help="write the report to this file")
    bench.add_argument("--model", default=None)
    bench.add_argument("--batch-sizes", type=_batch_sizes, default=None)
    bench.add_argument("--max-new-tokens", type=int, default=None)
    bench.add_argument("--device", default=None)
    bench.add_argument("--shallow-layer", type=int, default=None, help="early-exit: the exit's depth step count")
    bench.add_argument("--threshold", type=float, default=None, help="early-exit: the margin threshold")

    lab = sub.add_parser("lab", help="open the notebooks in JupyterLab (other options go to JupyterLab)")
    lab.add_argument("--dir", default=None, help="folder with the notebooks (default: ./notebooks)")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and args.command != "lab":
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if args.command == "generate":
        import mor_lab
        try:
            model, tok = mor_lab.load_pretrained(args.model)
            out = mor_lab.generate(model, tok, args.prompts, args.max_new_tokens, do_sample=args.sample,
                                   temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                                   seed=args.seed, chat=not args.no_chat)
        except ValueError as e:
            print(f"mor-lab: {e}", file=sys.stderr)
            return 2
        for prompt, text in zip(args.prompts, out.texts):
            print(f"> {prompt}\n{text}\n")
        return 0
    if args.command == "bench":
        import importlib

        from .bench.common import write_json
        suite = importlib.import_module(SUITES[args.suite])
        kwargs = {"model_name": args.model, "quick": args.quick, "device": args.device,
                  "max_new_tokens": args.max_new_tokens}
        for name in ("batch_sizes", "shallow_layer", "threshold"):
            if getattr(args, name, None) is not None:
                kwargs[name] = getattr(args, name)
        print(write_json(suite.run(**kwargs), args.json_path))
        return 0
    if args.command == "lab":
        import subprocess
        folder = Path(args.dir or "notebooks")
        if not folder.is_dir():
            print(f"mor-lab: no notebook folder at {folder.resolve()}; run from the repository root "
                  "or pass --dir", file=sys.stderr)
            return 2
        return subprocess.call([sys.executable, "-m", "jupyterlab", str(folder), *extra])
    return 1


if __name__ == "__main__":
    raise SystemExit(main())
