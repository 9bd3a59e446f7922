"""`neuro-dask`: demo, shard, inspect, generate, train-demo."""

from __future__ import annotations

import argparse
import json
import logging
import random
import sys
import time
from pathlib import Path
from typing import Sequence

from neuro_dask.errors import NeuroDaskError

log = logging.getLogger("neuro_dask.cli")


def _cmd_demo(args: argparse.Namespace) -> int:
    from neuro_dask.demo.addition import ASSET_DIR, evaluate, sample_problems
    from neuro_dask.loading import load

    path = Path(args.model or ASSET_DIR)
    started = time.perf_counter()
    model = load(path)
    print(f"loaded {path} ({model.config.model_type}, {model.config.num_experts} experts x "
          f"{len(model.config.moe_layers)} layers, top-{model.config.num_experts_per_tok}) "
          f"in {time.perf_counter() - started:.2f} s; experts run in this process")
    if args.prompt:
        for prompt, answer in zip(args.prompt, model.generate_text(args.prompt, max_new_tokens=args.max_new_tokens)):
            print(f"{prompt}{answer}")
        return 0
    problems = sample_problems(args.n, random.Random(args.seed), held_out=True)
    started = time.perf_counter()
    accuracy, answers = evaluate(model, problems)
    elapsed = time.perf_counter() - started
    for problem, answer in list(zip(problems, answers))[: args.show]:
        mark = "ok" if answer.strip() == problem.answer else f"WRONG (expected {problem.answer})"
        print(f"  {problem.prompt + answer:<13} {mark}")
    print(f"exact match on {len(problems)} held-out problems: {accuracy:.1%} "
          f"({elapsed:.2f} s, {len(problems) / elapsed:.0f} problems/s)")
    return 0 if accuracy >= args.min_accuracy else 1


def _cmd_shard(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from neuro_dask.store.sharder import count_artifacts, shard_checkpoint

    with tqdm(total=count_artifacts(args.src), unit="file", desc="sharding", disable=args.quiet) as bar:
        manifest = shard_checkpoint(args.src, args.dst, progress=lambda _name: bar.update(1))
    print(f"wrote {len(manifest.artifacts)} artifacts and manifest.json to {args.dst}")
    return 0


def _cmd_inspect(args: argparse.Namespace) -> int:
    from neuro_dask.store.manifest import Manifest
    from neuro_dask.store.summary import format_summary, summarize

    summary = summarize(Manifest.read(args.path))
    print(json.dumps(summary, indent=2) if args.json else format_summary(summary))
    return 0


def _cmd_generate(args: argparse.Namespace) -> int:
    from neuro_dask.loading import load

    model = load(args.path)
    texts = model.generate_text(args.prompt, max_new_tokens=args.max_new_tokens, do_sample=args.sample,
                                temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed)
    for prompt, text in zip(args.prompt, texts):
        print(f"{prompt}{text}")
    return 0


def _cmd_train_demo(args: argparse.Namespace) -> int:
    from neuro_dask.demo.addition import ASSET_DIR
    from neuro_dask.demo.train import TrainSettings, train_and_ship

    settings = TrainSettings(minutes=args.minutes, seed=args.seed)
    started = time.perf_counter()
    train_and_ship(settings, Path(args.out or ASSET_DIR),
                   progress=lambda msg: print(f"[{time.perf_counter() - started:6.0f} s] {msg}", flush=True))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="neuro-dask", description=__doc__)
    p.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = p.add_subparsers(dest="command", required=True)

    d = sub.add_parser("demo", help="answer held-out addition problems with the bundled MoE")
    d.add_argument("--model", help="a sharded model folder (default: the bundled adder)")
    d.add_argument("-n", type=int, default=200, help="how many held-out problems (default 200)")
    d.add_argument("--show", type=int, default=10, help="how many answers to print")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--prompt", nargs="+", help="ask these prompts instead, e.g. 123+456=")
    d.add_argument("--max-new-tokens", type=int, default=5)
    d.add_argument("--min-accuracy", type=float, default=0.95, help="exit 1 below this accuracy")
    d.set_defaults(func=_cmd_demo)

    s = sub.add_parser("shard", help="split an HF checkpoint into a trunk and one file per expert")
    s.add_argument("src", help="HF checkpoint folder (config.json + *.safetensors)")
    s.add_argument("dst", help="output folder")
    s.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    s.set_defaults(func=_cmd_shard)

    i = sub.add_parser("inspect", help="architecture, parameters, experts and bytes of a sharded model")
    i.add_argument("path")
    i.add_argument("--json", action="store_true")
    i.set_defaults(func=_cmd_inspect)

    g = sub.add_parser("generate", help="generate text from prompts with a sharded model")
    g.add_argument("path")
    g.add_argument("prompt", nargs="+")
    g.add_argument("--max-new-tokens", type=int, default=32)
    g.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    g.add_argument("--temperature", type=float, default=1.0)
    g.add_argument("--top-k", type=int)
    g.add_argument("--top-p", type=float)
    g.add_argument("--seed", type=int)
    g.set_defaults(func=_cmd_generate)

    t = sub.add_parser("train-demo", help="retrain the bundled demo model (about 5 minutes on 2 cores, capped at --minutes)")
    t.add_argument("--minutes", type=float, default=14.0, help="time budget")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--out", help="output folder (default: the bundled asset folder)")
    t.set_defaults(func=_cmd_train_demo)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except NeuroDaskError as exc:
        print(f"neuro-dask: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
