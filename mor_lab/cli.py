"""The ``mor-lab`` command: ``generate`` text, run ``bench`` suites, open the ``lab``, ``explore`` depth."""
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
    bench.add_argument("--threshold", type=float, default=None, help="early-exit: the confidence threshold")
    bench.add_argument("--measure", choices=("softmax_diff", "softmax_max", "margin", "softmax", "meta"), default=None,
                       help="early-exit: the confidence measure (meta: the trained classifier; no LM head to test)")
    bench.add_argument("--heads", choices=("corpus", "linear", "block"), default=None,
                       help="early-exit: the exit heads (linear/block: committed, trained on SmolLM2's own chat "
                            "continuations, the default for SmolLM2; corpus: trained here on corpus blocks)")
    bench.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None,
                       help="the engine's dtype (default float32; measure bfloat16: some CPUs run it ~2x faster, "
                            "others slower)")
    bench.add_argument("--random-weights", action="store_true",
                       help="cdb/early-exit/generate: SmolLM2's shape with random weights (no model package needed)")
    bench.add_argument("--head-rule", choices=("every-step", "cost", "both"), default=None,
                       help="cdb/mor: the continuous engine's head rule(s) to measure (default both)")
    bench.add_argument("--shapes", default=None, help="cdb/mor: comma-separated shapes for the sweep "
                       "(smollm2,smollm2_vocab_div4,wide_small_head), or 'none'")
    bench.add_argument("--repeats", type=int, default=None, help="interleaved repeats per method (median reported)")
    bench.add_argument("--kernels", choices=("on", "off", "auto"), default=None,
                       help="Triton kernels on the hot paths: on (a GPU; the interpreter on a CPU), off, auto")

    lab = sub.add_parser("lab", help="copy the notebooks into a folder and open JupyterLab there "
                         "(other options go to JupyterLab)")
    lab.add_argument("--dir", default=None, help="working folder for the notebooks (default: ./notebooks in a "
                     "checkout's root, else ./mor-lab-notebooks)")
    lab.add_argument("--force", action="store_true", help="overwrite notebooks you changed with the packaged ones")
    lab.add_argument("--check", action="store_true", help="check the environment, print what to fix, and exit")
    lab.add_argument("--no-open", action="store_true", help="copy the notebooks but do not start JupyterLab")

    explore = sub.add_parser("explore", help="the depth explorer: a Voila app (prompt, plan, threshold -> depth "
                             "per token, batch timeline, tokens/s); other options go to Voila")
    explore.add_argument("--port", type=int, default=None)
    explore.add_argument("--no-browser", action="store_true")
    explore.add_argument("--notebook", default=None, help="serve this notebook instead of the packaged explorer")

    from .train.cli import add_parser as add_train_parser
    add_train_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and args.command not in ("lab", "explore"):
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
        for name in ("batch_sizes", "shallow_layer", "threshold", "measure", "dtype", "head_rule", "repeats",
                     "kernels", "heads"):
            if getattr(args, name, None) is not None:
                kwargs[name] = getattr(args, name)
        if args.random_weights:
            kwargs["random_weights"] = True
        if args.shapes is not None:
            kwargs["shapes"] = () if args.shapes == "none" else tuple(args.shapes.split(","))
        import inspect
        accepted = inspect.signature(suite.run).parameters
        unknown = [k for k, v in kwargs.items() if k not in accepted and v is not None]
        if unknown:
            parser.error(f"bench {args.suite} does not take {', '.join('--' + k.replace('_', '-') for k in unknown)}")
        try:
            report = suite.run(**kwargs)
        except ValueError as e:
            print(f"mor-lab: {e}", file=sys.stderr)
            return 2
        print(write_json(report, args.json_path))
        if report.get("all_ok") is False:  # a checked output was wrong (bench kernels)
            print("mor-lab: a checked output differs from its reference (see all_ok / the failed rows)", file=sys.stderr)
            return 1
        return 0
    if args.command == "train":
        from .train.cli import run as run_train
        return run_train(args)
    if args.command == "lab":
        return _lab(args, extra)
    if args.command == "explore":
        return _explore(args, extra)
    return 1


def _lab(args, extra) -> int:
    import subprocess

    from . import lab
    if args.check:
        return lab.run_check()
    try:
        source = lab.packaged_notebooks()
    except FileNotFoundError as e:
        print(f"mor-lab: {e}", file=sys.stderr)
        return 2
    folder = Path(args.dir) if args.dir else lab.default_lab_dir(source)
    report = lab.copy_notebooks(source, folder, force=args.force)
    for line in report.lines():
        print(f"mor-lab: {line}")
    if args.no_open:
        return 0
    return subprocess.call([sys.executable, "-m", "jupyterlab", str(folder), *extra])


def _explore(args, extra) -> int:
    import importlib.util
    import os
    import subprocess

    from . import lab
    if importlib.util.find_spec("voila") is None:
        print("mor-lab: the explorer needs Voila: pip install voila  (or pip install 'mor-lab[lab]')", file=sys.stderr)
        return 2
    try:
        notebook = Path(args.notebook) if args.notebook else lab.explorer_notebook()
    except FileNotFoundError as e:
        print(f"mor-lab: {e}", file=sys.stderr)
        return 2
    env = dict(os.environ)
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    return subprocess.call(lab.voila_command(notebook, args.port, args.no_browser, extra), env=env)


if __name__ == "__main__":
    raise SystemExit(main())
