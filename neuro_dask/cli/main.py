"""neuro-dask: Mixture-of-Experts inference on volunteer Dask workers.

The data scientist's process runs the trunk and the router; each MoE layer's experts run on
volunteers' workers; a scheduler with the neuro_scheduler plugin places experts, keeps reputation
and the NEURO ledger, and shows the network on its dashboard.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import random
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from neuro_dask.cli.certs import add_parser as register_certs
from neuro_dask.cli.ledger import register as register_ledger
from neuro_dask.errors import NeuroDaskError

log = logging.getLogger("neuro_dask.cli.main")


def _cmd_demo(args: argparse.Namespace) -> int:
    from neuro_dask.demo.addition import ASSET_DIR

    path = Path(args.model or ASSET_DIR)
    _require_tokenizer(path)  # the demo speaks text: say so before starting a cluster
    if args.local:
        from neuro_dask.client.loading import load

        started = time.perf_counter()
        model = load(path)
        print(f"loaded {path} in {time.perf_counter() - started:.2f} s; experts run in this process")
        _speculate(model, args, path)
        return _ask(model, args)
    from neuro_dask.client.cluster import connect
    from neuro_dask.client.loading import load

    if args.scheduler:
        print(f"connecting to the network at {args.scheduler} ...", flush=True)
    else:
        print(
            f"starting a local cluster of {args.workers} worker processes with the neuro_scheduler and "
            "neuro_worker plugins ...",
            flush=True,
        )
    client, cluster = connect(args.scheduler, tls=args.tls, n_workers=args.workers)
    model = None
    try:
        print(f"dashboard: {client.dashboard_link.rsplit('/', 1)[0]}/neuro/overview" + _token_hint())
        started = time.perf_counter()
        model = load(path, client=client, transport=args.transport)
        routes = model.executor.routes.routes
        workers = sorted({w for ws in routes.values() for w in ws})
        print(
            f"published {path.name}: {len(routes)} experts on {len(workers)} workers, "
            f"{args.transport or 'direct'} transport, ready in {time.perf_counter() - started:.1f} s"
        )
        _speculate(model, args, path)
        return _ask(model, args)
    finally:
        if model is not None:
            model.close()
        client.close()
        if cluster is not None:
            cluster.close()


def _speculate(model, args: argparse.Namespace, path: Path) -> None:
    """--speculative KIND [--draft-model DIR]: the model's default decoding (docs/performance.md)."""
    kind = getattr(args, "speculative", None)
    if kind in (None, "off"):
        return
    draft = None
    if kind == "draft-model":
        from neuro_dask.client.loading import load
        from neuro_dask.demo.addition import ASSET_DIR
        from neuro_dask.demo.train import DRAFT_ASSET_DIR

        folder = args.draft_model or (DRAFT_ASSET_DIR if Path(path).resolve() == ASSET_DIR.resolve() else None)
        if folder is None:
            raise NeuroDaskError("--speculative draft-model needs --draft-model DIR (a local model, same tokenizer)")
        draft = load(folder)
        print(f"speculative decoding: drafts from {folder}, in this process")
    else:
        print(f"speculative decoding: {kind} drafts")
    model.speculate(kind, draft)


def _speculation_line(model) -> str | None:
    s = model.stats().get("speculation")
    if not s:
        return None
    if not s["drafted"]:
        return (
            "speculative decoding drafted nothing: here a drafted token costs about what a pass over the "
            "layers costs (it pays where the experts are across a network)"
        )
    return (
        f"speculative decoding: {s['tokens_per_pass']:.2f} tokens per pass over the layers "
        f"({s['kept']} of {s['drafted']} drafted tokens kept, {s['passes']} passes)"
    )


def _require_tokenizer(path: Path) -> None:
    from neuro_dask.errors import TokenizerMissingError
    from neuro_dask.store.manifest import Manifest

    if Manifest.read(path).tokenizer() is None:
        raise TokenizerMissingError(str(path))


def _token_hint() -> str:
    from neuro_dask.settings import SecuritySettings

    return "; add ?token=<neuro.security.dashboard-token> to open it" if SecuritySettings.load().dashboard_token else ""


def _ask(model, args: argparse.Namespace) -> int:
    from neuro_dask.demo.addition import evaluate, sample_problems

    cfg = model.config
    print(
        f"model: {cfg.model_type}, {cfg.num_experts} experts x {len(cfg.moe_layers)} layers, "
        f"top-{cfg.num_experts_per_tok}"
    )
    if args.prompt:
        for prompt, answer in zip(args.prompt, model.generate_text(args.prompt, max_new_tokens=args.max_new_tokens)):
            print(f"{prompt}{answer}")
        line = _speculation_line(model)
        if line:
            print(line)
        return 0
    problems = sample_problems(args.n, random.Random(args.seed), held_out=True)
    started = time.perf_counter()
    accuracy, answers = evaluate(model, problems)
    elapsed = time.perf_counter() - started
    tokens = sum(len(a) + 1 for a in answers)  # digits plus the EOS that ended each answer
    for problem, answer in list(zip(problems, answers))[: args.show]:
        mark = "ok" if answer.strip() == problem.answer else f"WRONG (expected {problem.answer})"
        print(f"  {problem.prompt + answer:<13} {mark}")
    print(
        f"exact match on {len(problems)} held-out problems: {accuracy:.1%} "
        f"({elapsed:.2f} s, {tokens / elapsed:.0f} tokens/s)"
    )
    line = _speculation_line(model)
    if line:
        print(line)
    return 0 if accuracy >= args.min_accuracy else 1


def _cmd_drill(args: argparse.Namespace) -> int:
    from neuro_dask.cli.drill import run_drill
    from neuro_dask.demo.addition import ASSET_DIR

    report = run_drill(
        args.model or ASSET_DIR,
        workers=args.workers,
        adversaries=args.adversaries,
        mode=args.mode,
        trusted=args.trusted,
        seed=args.seed,
        prompts=args.prompts,
        tokens=args.tokens,
        probability=args.probability,
        delay=args.delay,
        after=args.after,
        blocking=args.blocking,
        ledger=args.ledger,
    )
    print(report.to_json() if args.json else report.summary())
    return 0 if report.identical and report.wrong_accepted == 0 else 1


def _cmd_soak(args: argparse.Namespace) -> int:
    from neuro_dask.soak.plan import SoakPlan
    from neuro_dask.soak.run import soak

    faultless = args.fault_free
    plan = SoakPlan(
        minutes=args.minutes,
        workers=args.workers,
        adversarial=0.0 if faultless else args.adversarial,
        kill_every=0.0 if faultless else args.kill_every,
        hogs=args.hogs,
        scheduler_restart_at=None if args.no_scheduler_restart or faultless else 0.5,
        concurrency=args.concurrency,
        seed=args.seed,
        trust=not args.no_trust,
    )
    out = Path(args.out or f"soak-{time.strftime('%Y%m%d-%H%M%S')}")
    summary = soak(plan, out, say=lambda line: print(time.strftime("%H:%M:%S"), line, flush=True))
    figures = summary["network"]
    print(
        f"{summary['requests']} requests: {summary['correct']} correct ({100 * summary['completion_rate']:.2f}%), "
        f"{summary['wrong']} wrong, {summary['failed']} failed; per request p50 {summary['p50_s']:.2f} s, "
        f"p99 {summary['p99_s']:.2f} s; per layer p50 {_ms(figures.get('layer_p50_s'))}, "
        f"p99 {_ms(figures.get('layer_p99_s'))}"
    )
    for kind, n in summary["failures"].items():
        print(f"  failed: {n} x {kind}")
    if args.compare:
        base = json.loads(Path(args.compare).read_text())
        summary["p99_vs_fault_free"] = summary["p99_s"] / base["p99_s"]
        print(f"p99 per request {summary['p99_vs_fault_free']:.2f} x the fault-free run's ({base['p99_s']:.2f} s)")
        (out / "soak.json").write_text(json.dumps(summary, indent=2, default=str))
    print(f"written: {out / 'soak.json'} and {out / 'soak.svg'}")
    return 0 if summary["wrong"] == 0 and summary["completion_rate"] >= args.min_completion else 1


def _ms(seconds) -> str:
    return "-" if seconds is None else f"{1000 * seconds:.1f} ms"


def _has_flag(extra: list[str], flag: str) -> bool:
    return any(a == flag or a.startswith(flag + "=") for a in extra)


def _tls_folder(args: argparse.Namespace) -> str | None:
    """--tls, else neuro.security.tls-dir."""
    from neuro_dask.settings import SecuritySettings

    return args.tls or SecuritySettings.load().tls_dir


def _tls_args(role: str, folder: str | None, name: str | None = None) -> list[str]:
    """Dask's TLS flags for a `role` certificate in `folder` (made by `neuro-dask certs`)."""
    if not folder:
        return []
    from neuro_dask.security.tls import certificate_files

    ca, cert, key, name = certificate_files(role, folder, name)
    return ["--tls-ca-file", str(ca), "--tls-cert", str(cert), "--tls-key", str(key)]


def _hardened_flag(args: argparse.Namespace) -> list[str]:
    return ["--neuro-hardened" if args.hardened else "--neuro-no-hardened"]


def scheduler_argv(args: argparse.Namespace, extra: list[str]) -> list[str]:
    argv = [sys.executable, "-m", "dask", "scheduler", "--preload", "neuro_scheduler"]
    if args.replicas:
        argv += ["--neuro-replicas", str(args.replicas)]
    if args.relay:
        argv += ["--neuro-relay", args.relay]
    argv += _hardened_flag(args)
    if tls := _tls_folder(args):
        argv += _tls_args("scheduler", tls)
        if not _has_flag(extra, "--protocol"):
            argv += ["--protocol", "tls"]
    if not _has_flag(extra, "--dashboard-address"):
        # The dashboard shows every worker and call: on this machine only, unless asked otherwise.
        argv += ["--dashboard-address", "127.0.0.1:8787"]
    return argv + extra


def worker_argv(args: argparse.Namespace, extra: list[str]) -> list[str]:
    argv = [
        sys.executable,
        "-m",
        "dask",
        "worker",
        args.scheduler,
        "--preload",
        "neuro_worker",
        "--nthreads",
        str(args.nthreads),
    ]
    for flag, value in (
        ("--neuro-store", args.store),
        ("--neuro-cache-dir", args.cache_dir),
        ("--neuro-memory-budget", args.memory_budget),
        ("--neuro-device", args.device),
        ("--neuro-owner", args.owner),
        ("--neuro-backend", args.backend),
        ("--neuro-precision", args.precision),
    ):
        if value:
            argv += [flag, str(value)]
    argv += _hardened_flag(args)
    # A volunteer's machine is its owner's first: serve only while the owner leaves it idle.
    argv += ["--neuro-idle-only" if args.idle_only else "--neuro-no-idle-only"]
    if args.hardened:
        # The nanny (which starts and restarts the worker) answers peers too: harden it as well.
        argv += ["--preload-nanny", "neuro_worker"]
    if tls := _tls_folder(args):
        argv += _tls_args("worker", tls, args.name)
    if args.name and not _has_flag(extra, "--name"):
        argv += ["--name", args.name]
    if args.relay:
        argv += ["--worker-class", "neuro_dask.relay.worker.RelayedWorker"]
        if not _has_flag(extra, "--host"):
            argv += ["--host", "127.0.0.1"]  # the nanny: on this machine only
    if not _has_flag(extra, "--dashboard-address"):
        # A volunteer's worker page stays on its machine; with --no-dashboard its HTTP server
        # (/health, /metrics) still listens, so it gets the same address.
        argv += ["--dashboard-address", "127.0.0.1:0"]
    return argv + extra


def _cmd_relay(args: argparse.Namespace) -> int:
    import asyncio
    import signal

    from neuro_dask.relay.server import Relay
    from neuro_dask.settings import relay_listen_address

    host, port = relay_listen_address(args.listen)
    # the operator sees volunteers come and go
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", datefmt="%H:%M:%S"))
    relay_log = logging.getLogger("neuro_dask.relay")
    relay_log.addHandler(handler)
    relay_log.setLevel(logging.INFO)
    relay_log.propagate = False

    async def run() -> None:
        relay = await Relay(host, port, comeback_spread=args.comeback_spread).start()
        shown = relay.address if host not in ("0.0.0.0", "::") else f"THIS_HOST:{relay.port}"
        print(f"neuro-dask relay at {relay.address}", flush=True)
        print(f"volunteers behind a NAT join with:  neuro-dask worker SCHEDULER --relay {shown}", flush=True)
        print("it copies bytes between the endpoints; with TLS on the network it cannot read them", flush=True)
        stopping = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stopping.set)
        await stopping.wait()
        count = len(relay.book.volunteers)
        print(f"stopping: {count} volunteer(s) told when to come back (within {args.comeback_spread:g} s)", flush=True)
        await relay.stop()

    asyncio.run(run())
    return 0


def _cmd_scheduler(args: argparse.Namespace, extra: list[str]) -> int:
    os.execv(sys.executable, scheduler_argv(args, extra))
    return 0  # not reached


def _cmd_worker(args: argparse.Namespace, extra: list[str]) -> int:
    # The nanny's preload reads hardened mode from config (it gets no preload arguments).
    env = {**os.environ, "DASK_NEURO__SECURITY__HARDENED": "True" if args.hardened else "False"}
    if args.relay:  # the worker listens through the relay (neuro_dask/relay/worker.py)
        env["DASK_NEURO__WORKER__RELAY"] = args.relay
    os.execve(sys.executable, worker_argv(args, extra), env)
    return 0  # not reached


def _cmd_worker_status(args: argparse.Namespace) -> int:
    from neuro_dask.volunteer.status import format_status, status_for

    statuses = status_for(args)
    if args.json:  # one worker: its object; several (no --worker, several on this machine): a list
        print(json.dumps(statuses[0] if len(statuses) == 1 else statuses, indent=2, sort_keys=True))
    else:
        print("\n\n".join(format_status(s) for s in statuses))
    return 0


def _operator_client(args: argparse.Namespace):
    """A client of `--scheduler`, with the operator's certificate where `--tls` names one."""
    from neuro_dask.client.cluster import open_client

    security = None
    if tls := _tls_folder(args):
        from neuro_dask.security.tls import security_for

        security = security_for("operator", tls)
    return open_client(args.scheduler, security, timeout=args.timeout)


def _cmd_publish(args: argparse.Namespace) -> int:
    from neuro_dask.client.dispatch.session import wait_until_served
    from neuro_dask.client.following import publish

    with _operator_client(args) as client:
        reply = publish(args.model, client, channel=args.channel or "", wait=False)
        role = f" as the {reply['role']} version of channel {args.channel}" if args.channel else ""
        print(f"published {reply['model']} from {args.model}{role}")
        if args.wait:
            total = reply.get("summary", {}).get("expert_files", "its")
            print(f"waiting until the workers serve {total} experts (up to {args.wait_timeout:.0f} s) ...", flush=True)
            wait_until_served(client, reply["model"], args.wait_timeout, on_progress=_print_progress)
            print(f"{reply['model']}: every expert is served")
        if reply.get("role") == "candidate":
            print(
                f"make it current with `neuro-dask adopt {args.channel} {reply['model']} --scheduler "
                f"{args.scheduler}` (or a governance vote: `neuro-dask gov propose-version ...`)"
            )
    return 0


def _print_progress(served: int, total: int, note: str | None) -> None:
    print(f"  {served}/{total} experts served" + (f"; waiting: {note}" if note else ""), flush=True)


def _cmd_adopt(args: argparse.Namespace) -> int:
    from neuro_dask.client.following import adopt

    with _operator_client(args) as client:
        reply = adopt(args.channel, args.model, client)
    retiring = ", ".join(reply["retiring"]) or "none"
    print(f"channel {args.channel}: {args.model} is current; retiring once their requests end: {retiring}")
    return 0


def _cmd_channels(args: argparse.Namespace) -> int:
    from neuro_dask.client.following import channels

    with _operator_client(args) as client:
        reply = channels(client)
    if args.json:
        print(json.dumps(reply, indent=2, sort_keys=True, default=list))
        return 0
    print(f"adoption: {reply['adoption']}")
    for name, ch in reply["channels"].items():
        print(
            f"{name}: current {ch['current']}, candidate {ch['candidate'] or '-'}"
            f"{' (approved by vote)' if ch['approved'] else ''}, history {' -> '.join(ch['history'])}"
        )
    for model, r in reply["retiring"].items():
        print(f"retiring {model}: {r['leases']} request(s) still running")
    for model, channel in reply["retired"].items():
        print(f"retired {model} (channel {channel})")
    return 0


def _cmd_shard(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from neuro_dask.store.sharder import plan_shard

    total, shard = plan_shard(args.src, args.layout)
    with tqdm(total=total, unit="file", desc="sharding", disable=args.quiet) as bar:
        manifest = shard(args.dst, lambda _name: bar.update(1))
    print(
        f"wrote {len(manifest.artifacts)} artifacts and manifest.json to {args.dst} "
        f"({manifest.architecture}, {manifest.layout} layout)"
    )
    return 0


def _cmd_inspect(args: argparse.Namespace) -> int:
    from neuro_dask.store.manifest import Manifest
    from neuro_dask.store.summary import format_summary, summarize

    summary = summarize(Manifest.read(args.path))
    print(json.dumps(summary, indent=2) if args.json else format_summary(summary))
    return 0


@contextlib.contextmanager
def _model_for(args: argparse.Namespace):
    """The model of `args.path`: in this process, or with --scheduler its experts on that network
    (published there if it is not yet; the folder or URL must be one the workers can read)."""
    from neuro_dask.client.loading import load

    if not args.scheduler:
        with load(args.path) as model:
            yield model
        return
    from neuro_dask.client.cluster import connect

    print(f"connecting to {args.scheduler} ...", file=sys.stderr, flush=True)
    client, _ = connect(args.scheduler, tls=_tls_folder(args))
    try:
        with load(args.path, client=client, transport=args.transport) as model:
            yield model
    finally:
        client.close()


def _cmd_generate(args: argparse.Namespace) -> int:
    options = dict(
        do_sample=args.sample, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed
    )
    with _model_for(args) as model:
        _speculate(model, args, Path(args.path))
        if args.stream:
            for prompt in args.prompt:
                print(prompt, end="", flush=True)
                for step in model.stream(prompt, max_new_tokens=args.max_new_tokens, **options):
                    print(step.text, end="", flush=True)
                print()
            return 0
        texts = model.generate_text(args.prompt, max_new_tokens=args.max_new_tokens, **options)
        for prompt, text in zip(args.prompt, texts):
            print(f"{prompt}{text}")
        line = _speculation_line(model)
        if line:
            print(line)
    return 0


def _cmd_score(args: argparse.Namespace) -> int:
    with _model_for(args) as model:
        results = model.score(args.text)
    if args.json:
        print(
            json.dumps(
                [
                    {
                        "text": t,
                        "tokens": r.tokens,
                        "logprobs": r.logprobs,
                        "total": r.total,
                        "perplexity": r.perplexity,
                    }
                    for t, r in zip(args.text, results)
                ],
                indent=2,
            )
        )
        return 0
    for text, r in zip(args.text, results):
        print(f"{r.total:10.3f} log-likelihood, perplexity {r.perplexity:8.3f}, {len(r.tokens)} tokens: {text!r}")
    return 0


def _cmd_serve(args: argparse.Namespace) -> int:
    from neuro_dask.cli.serve import serve

    if args.channel and not args.scheduler:
        raise NeuroDaskError("--channel needs --scheduler: channels live on a network's scheduler")
    return serve(
        args.scheduler,
        args.model,
        host=args.host,
        port=args.port,
        api_keys=args.api_keys,
        workers=args.workers,
        model_id=args.model_id,
        transport=args.transport,
        tls=args.tls,
        channel=args.channel,
        privacy=args.privacy,
        speculate=lambda model: _speculate(model, args, Path(args.model) if args.model else _bundled()),
    )


def _bundled() -> Path:
    from neuro_dask.demo.addition import ASSET_DIR

    return ASSET_DIR


def _add_speculation_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--speculative",
        choices=["off", "prompt-lookup", "self", "mtp", "draft-model"],
        default=None,
        help="draft tokens and verify several per pass over the layers: the same output, fewer network "
        "round trips (default: neuro.client.speculative, off)",
    )
    parser.add_argument(
        "--draft-model",
        metavar="DIR",
        help="with --speculative draft-model: a sharded draft model with the same tokenizer "
        "(default for the bundled adder: the bundled adder-draft)",
    )


def _cmd_train_demo(args: argparse.Namespace) -> int:
    from neuro_dask.demo.addition import ASSET_DIR
    from neuro_dask.demo.train import (
        DRAFT_ASSET_DIR,
        DRAFT_HF_CONFIG,
        DRAFT_TRAIN_STEPS,
        HF_CONFIG,
        TrainSettings,
        train_and_ship,
    )

    out = Path(args.out or ("neuro-adder-draft" if args.draft else "neuro-adder"))
    bundled = {Path(ASSET_DIR).resolve(), Path(DRAFT_ASSET_DIR).resolve()}
    if out.resolve() in bundled and not args.replace_bundled:
        raise NeuroDaskError(
            f"{out} is a bundled demo model: pass --replace-bundled to overwrite it, or choose another --out"
        )
    settings = TrainSettings(minutes=args.minutes, seed=args.seed)
    if args.draft:
        settings = TrainSettings(minutes=args.minutes, seed=args.seed, steps=DRAFT_TRAIN_STEPS)
    started = time.perf_counter()
    what = "the demo model's draft" if args.draft else "the demo model"
    print(f"training {what} into {out} (up to {args.minutes:g} minutes) ...", flush=True)
    train_and_ship(
        settings,
        out,
        progress=lambda msg: print(f"[{time.perf_counter() - started:6.0f} s] {msg}", flush=True),
        hf_config=DRAFT_HF_CONFIG if args.draft else HF_CONFIG,
    )
    return 0


def _add_security_arguments(parser: argparse.ArgumentParser, role: str) -> None:
    parser.add_argument(
        "--tls",
        metavar="DIR",
        help=f"mutual TLS with the {role} certificate in DIR (made by `neuro-dask certs`; "
        "default: neuro.security.tls-dir; docs/security.md)",
    )
    parser.add_argument(
        "--hardened",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="hardened mode: allow-listed unpickling, no remote code, role checks (default: on)",
    )


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="neuro-dask",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="`neuro-dask COMMAND --help` describes each command; README.md and docs/ the rest.",
    )
    p.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = p.add_subparsers(dest="command", required=True)

    d = sub.add_parser("demo", help="start a local cluster and answer addition problems with the bundled MoE")
    d.add_argument("--model", help="a sharded model folder (default: the bundled adder)")
    d.add_argument("--workers", type=int, default=3, help="worker processes of the local cluster (default 3)")
    d.add_argument("--transport", choices=["direct", "futures"], help="how expert calls travel (default direct)")
    d.add_argument("--scheduler", help="run against an existing cluster at this address instead")
    d.add_argument("--tls", metavar="DIR", help="with --scheduler: a client certificate's folder (hardened network)")
    d.add_argument("--local", action="store_true", help="no cluster: run the experts in this process")
    d.add_argument("-n", type=int, default=100, help="how many held-out problems (default 100)")
    d.add_argument("--show", type=int, default=10, help="how many answers to print")
    d.add_argument("--seed", type=int, default=0, help="picks the held-out problems (default 0)")
    d.add_argument("--prompt", nargs="+", help="ask these prompts instead, e.g. 123+456=")
    d.add_argument("--max-new-tokens", type=int, default=5, help="with --prompt: tokens per answer (default 5)")
    d.add_argument("--min-accuracy", type=float, default=0.95, help="exit 1 below this accuracy")
    _add_speculation_arguments(d)
    d.set_defaults(func=_cmd_demo)

    s = sub.add_parser("shard", help="split an HF checkpoint into a trunk and one file per expert")
    s.add_argument("src", help="HF checkpoint folder (config.json + *.safetensors), or a .gguf file (needs `gguf`)")
    s.add_argument("dst", help="output folder")
    s.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    s.add_argument(
        "--layout",
        choices=("auto", "neuro", "transformers"),
        default="auto",
        help="trunk: `neuro` the hand-written one (mixtral, qwen2_moe, qwen3_moe, olmoe), `transformers` "
        "the checkpoint's own transformers model (every MoE architecture); auto picks neuro where it "
        "applies (docs/model-and-store.md)",
    )
    s.set_defaults(func=_cmd_shard)

    i = sub.add_parser("inspect", help="architecture, parameters, experts and bytes of a sharded model")
    i.add_argument("path", help="a sharded model folder (from `neuro-dask shard`) or its URL")
    i.add_argument("--json", action="store_true", help="the summary as JSON")
    i.set_defaults(func=_cmd_inspect)

    g = sub.add_parser("generate", help="generate text from prompts with a sharded model, here or on a network")
    g.add_argument("path", help="a sharded model folder or URL; with --scheduler, one the workers can read")
    g.add_argument("prompt", nargs="+", help="one or more prompts; each answer is printed after its prompt")
    g.add_argument("--max-new-tokens", type=int, default=32, help="tokens to generate per prompt (default 32)")
    g.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    g.add_argument("--temperature", type=float, default=1.0, help="with --sample (default 1.0)")
    g.add_argument("--top-k", type=int, help="with --sample: keep the k likeliest tokens")
    g.add_argument("--top-p", type=float, help="with --sample: keep the likeliest tokens up to this probability")
    g.add_argument("--seed", type=int, help="with --sample: the random seed (reproducible answers)")
    g.add_argument("--stream", action="store_true", help="print each token as it comes")
    _add_speculation_arguments(g)
    sco = sub.add_parser("score", help="log-likelihood and perplexity of texts under a sharded model")
    sco.add_argument("path", help="a sharded model folder or URL; with --scheduler, one the workers can read")
    sco.add_argument("text", nargs="+", help="one or more texts to score")
    sco.add_argument("--json", action="store_true", help="per-token log-probabilities as JSON")
    for parser, func in ((g, _cmd_generate), (sco, _cmd_score)):
        parser.add_argument(
            "--scheduler", help="run the experts on this network (e.g. tls://HOST:8786) instead of in this process"
        )
        parser.add_argument(
            "--tls",
            metavar="DIR",
            help="with --scheduler: a client certificate's folder (hardened network; default neuro.security.tls-dir)",
        )
        parser.add_argument(
            "--transport",
            choices=["direct", "futures"],
            help="with --scheduler: how expert calls travel (default direct)",
        )
        parser.set_defaults(func=func)

    dr = sub.add_parser("drill", help="run a local cluster with adversarial workers and report what trust did")
    dr.add_argument(
        "--workers", type=int, default=10, help="worker processes of the drill's local cluster (default 10)"
    )
    dr.add_argument("--adversaries", type=float, default=0.3, help="fraction of workers that misbehave")
    dr.add_argument(
        "--mode",
        default="perturb",
        choices=["perturb", "collude", "defect", "straggle", "crash"],
        help="how adversaries misbehave: perturb their results, collude on one wrong answer, defect "
        "after earning trust, straggle (answer late) or crash (default perturb)",
    )
    dr.add_argument(
        "--probability", type=float, help="chance per call of misbehaving (perturb, straggle; default 1, straggle 0.05)"
    )
    dr.add_argument("--delay", type=float, default=0.05, help="straggle: seconds late (default 0.05)")
    dr.add_argument("--blocking", action="store_true", help="straggle: hold the worker while late (a slow machine)")
    dr.add_argument("--after", type=int, help="crash, defect: honest calls first (default crash 3, defect 20)")
    dr.add_argument(
        "--ledger",
        metavar="URL",
        help="run the NEURO ledger in this database: fund the client, stake the workers, report the economics",
    )
    dr.add_argument("--trusted", type=int, default=1, help="operator-trusted honest workers")
    dr.add_argument("--seed", type=int, default=0, help="picks the adversaries and the prompts (default 0)")
    dr.add_argument(
        "--prompts", type=int, default=10, help="prompts generated, with and without adversaries (default 10)"
    )
    dr.add_argument("--tokens", type=int, default=32, help="new tokens per prompt (default 32)")
    dr.add_argument("--model", help="sharded model folder (default: the bundled adder)")
    dr.add_argument("--json", action="store_true", help="the report as JSON")
    dr.set_defaults(func=_cmd_drill)

    so = sub.add_parser("soak", help="a network of real processes under churn, adversaries and CPU hogs, measured")
    so.add_argument("--minutes", type=float, default=3.0, help="how long the load runs (default 3)")
    so.add_argument("--workers", type=int, default=6, help="volunteer processes (default 6)")
    so.add_argument("--adversarial", type=float, default=0.3, help="fraction of volunteers that misbehave (0.3)")
    so.add_argument("--kill-every", type=float, default=10.0, help="mean seconds between SIGKILLs (default 10; 0 none)")
    so.add_argument("--hogs", type=int, default=2, help="CPU-burning processes beside the network (default 2)")
    so.add_argument("--no-scheduler-restart", action="store_true", help="do not restart the scheduler halfway")
    so.add_argument("--concurrency", type=int, default=3, help="request threads (default 3)")
    so.add_argument(
        "--fault-free", action="store_true", help="no kills, no adversaries, no restart: the baseline (hogs still run)"
    )
    so.add_argument("--compare", metavar="SOAK_JSON", help="a fault-free run's soak.json: print the p99 ratio to it")
    so.add_argument("--no-trust", action="store_true", help="clients without quorums (a baseline: wrong answers pass)")
    so.add_argument("--seed", type=int, default=0, help="the chaos schedule, the roles and the problems (default 0)")
    so.add_argument("--out", help="folder for the logs, soak.json and soak.svg (default ./soak-TIME)")
    so.add_argument(
        "--min-completion", type=float, default=0.999, help="exit 1 below this completion rate (default 0.999)"
    )
    so.set_defaults(func=_cmd_soak)

    sc = sub.add_parser(
        "scheduler",
        help="start a network's scheduler: dask scheduler --preload neuro_scheduler",
        epilog="Every other flag goes to `dask scheduler`: --port 8786 (default), --host, "
        "--dashboard-address (default 127.0.0.1:8787 here: the dashboard stays on this "
        "machine), --neuro-ledger URL (the NEURO ledger), ... (`dask scheduler --help`). "
        "It prints its address, its dashboard and the command workers join with.",
    )
    sc.add_argument("--replicas", type=int, help="target replicas per expert")
    sc.add_argument(
        "--relay",
        metavar="HOST:PORT",
        help="also run a relay for volunteers behind a NAT on HOST:PORT (:PORT: every interface)",
    )
    _add_security_arguments(sc, "scheduler")
    sc.set_defaults(func=_cmd_scheduler, passthrough=True)

    w = sub.add_parser(
        "worker",
        help="volunteer this machine: dask worker ADDR --preload neuro_worker",
        epilog="Every other flag goes to `dask worker` (`dask worker --help`): --nworkers, "
        "--no-nanny, --dashboard-address, ... It prints its connection, the experts it "
        "loads, and why it pauses (docs/distributed.md).",
    )
    w.add_argument("scheduler", help="scheduler address, e.g. tcp://HOST:8786")
    w.add_argument("--memory-budget", help="bytes or e.g. 4GiB for expert weights (default: half the free RAM)")
    w.add_argument("--cache-dir", help="where verified expert files are cached")
    w.add_argument(
        "--device",
        choices=["auto", "cpu", "cuda", "mps"],
        help="where experts compute (default auto: CUDA, else MPS, else CPU)",
    )
    w.add_argument("--owner", help="owner id: replicas of one expert never share an owner")
    w.add_argument("--store", help="a mirror of the model store to fetch experts from")
    w.add_argument("--backend", choices=["torch", "onnx"], help="how experts run (default torch; docs/performance.md)")
    w.add_argument(
        "--precision",
        choices=["float32", "bfloat16", "int8", "int4", "auto"],
        help="expert weights in memory (default float32; auto: the highest that fits the budget)",
    )
    w.add_argument(
        "--nthreads", type=int, default=1, help="Dask threads (default 1: expert calls have their own thread)"
    )
    w.add_argument(
        "--idle-only",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="pause while the machine's owner is busy, at low priority (default: on; docs/distributed.md)",
    )
    w.add_argument(
        "--name",
        help="this worker's name; with --tls, the NAME of the worker-NAME.pem to use "
        "(its ledger identity; default: the folder's only worker certificate)",
    )
    w.add_argument(
        "--relay",
        metavar="HOST:PORT",
        help="behind a NAT: open no port and be reached through this relay (`neuro-dask relay`, "
        "or a scheduler started with --relay); docs/distributed.md",
    )
    _add_security_arguments(w, "worker")
    w.set_defaults(func=_cmd_worker, passthrough=True)

    rl = sub.add_parser(
        "relay",
        help="operator: a relay that volunteers behind a NAT keep a connection to (they open no port)",
    )
    rl.add_argument("--listen", default=":8788", metavar="HOST:PORT", help="where to listen (default :8788)")
    rl.add_argument(
        "--comeback-spread",
        type=float,
        default=30.0,
        metavar="SECONDS",
        help="on shutdown, volunteers are told to come back spread over this many seconds (default 30)",
    )
    rl.set_defaults(func=_cmd_relay)

    ws = sub.add_parser(
        "worker-status",
        help="a volunteer's worker: experts hosted, calls served, cache, "
        "reputation, NEURO earned, paused or running (also `worker status`)",
    )
    ws.add_argument("--scheduler", help="scheduler address (default: ask the worker given by --worker ADDRESS)")
    ws.add_argument("--worker", help="the worker's name or address (default: this machine's only worker)")
    ws.add_argument("--tls", metavar="DIR", help="a client certificate's folder (hardened network)")
    ws.add_argument("--json", action="store_true", help="JSON: an object, or a list when several workers are shown")
    ws.set_defaults(func=_cmd_worker_status)

    register_certs(sub)

    pb = sub.add_parser("publish", help="operator: have a scheduler place a sharded model's experts on its workers")
    pb.add_argument("model", help="sharded model folder or URL, as the workers will fetch it")
    pb.add_argument("--scheduler", required=True, help="scheduler address, e.g. tls://HOST:8786")
    pb.add_argument(
        "--tls",
        metavar="DIR",
        help="the operator certificate's folder (hardened networks: only the operator publishes)",
    )
    pb.add_argument(
        "--wait",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="wait until every expert is served (default: on)",
    )
    pb.add_argument("--timeout", type=float, default=30.0, help="seconds to connect")
    pb.add_argument(
        "--wait-timeout",
        type=float,
        default=None,
        help="seconds to wait until every expert is served (default neuro.client.load-timeout)",
    )
    pb.add_argument(
        "--channel",
        help="publish as a version of this channel: its current one if it has none, "
        "else its candidate (adopt it with `neuro-dask adopt`)",
    )
    pb.set_defaults(func=_cmd_publish)

    ad = sub.add_parser(
        "adopt",
        help="operator: make a channel's served candidate version current (the old one retires once its requests end)",
    )
    ad.add_argument("channel", help="the channel's name (as given to `neuro-dask publish --channel`)")
    ad.add_argument("model", help="the candidate's model id (printed by `neuro-dask publish --channel`)")
    ch = sub.add_parser("channels", help="model channels: current, candidate and retiring versions")
    ch.add_argument("--json", action="store_true", help="one JSON object")
    for parser, func in ((ad, _cmd_adopt), (ch, _cmd_channels)):
        parser.add_argument("--scheduler", required=True, help="scheduler address, e.g. tls://HOST:8786")
        parser.add_argument("--tls", metavar="DIR", help="the operator certificate's folder (hardened networks)")
        parser.add_argument("--timeout", type=float, default=30.0, help="seconds to connect")
        parser.set_defaults(func=func)

    sv = sub.add_parser("serve", help="an OpenAI-compatible HTTP API (/v1/completions, /v1/chat/completions)")
    sv.add_argument("--scheduler", help="serve through an existing cluster (default: start a local one)")
    sv.add_argument("--tls", metavar="DIR", help="with --scheduler: a client certificate's folder (hardened network)")
    sv.add_argument("--model", help="sharded model folder or URL (default: the bundled adder)")
    sv.add_argument("--model-id", help="the id clients ask for (default: the model folder's name, or the channel)")
    sv.add_argument(
        "--channel",
        help="with --scheduler: serve this channel's current model version and follow it "
        "to each new one between requests (docs/privacy.md)",
    )
    sv.add_argument(
        "--privacy",
        choices=["standard", "private"],
        default="standard",
        help="private: every expert call on secret shares, charged at the private price (docs/privacy.md)",
    )
    sv.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    sv.add_argument("--port", type=int, default=8000, help="port to listen on (default 8000; 0 = any free port)")
    sv.add_argument(
        "--api-keys",
        metavar="FILE",
        help='JSON {"key": "ledger account"}: require Authorization: Bearer KEY (default: open)',
    )
    sv.add_argument("--workers", type=int, default=3, help="worker processes of the local cluster (default 3)")
    sv.add_argument("--transport", choices=["direct", "futures"], help="how expert calls travel (default direct)")
    _add_speculation_arguments(sv)
    sv.set_defaults(func=_cmd_serve)

    t = sub.add_parser(
        "train-demo", help="train the demo model again from scratch (about 5 minutes on 2 cores, capped at --minutes)"
    )
    t.add_argument("--minutes", type=float, default=14.0, help="time budget")
    t.add_argument("--seed", type=int, default=0, help="initial weights and training data (default 0)")
    t.add_argument(
        "--out",
        default=None,
        help="output folder (default: ./neuro-adder, or ./neuro-adder-draft with --draft); "
        "use it with `neuro-dask demo --model DIR` (--draft-model DIR)",
    )
    t.add_argument(
        "--draft",
        action="store_true",
        help="train the small draft model for speculative decoding (same tokenizer and layers, width 32)",
    )
    t.add_argument(
        "--replace-bundled",
        action="store_true",
        help="allow --out to be the bundled model's folder (maintainers shipping a new demo model)",
    )
    t.set_defaults(func=_cmd_train_demo)

    register_ledger(sub)
    _describe_commands(sub)
    return p


# What `neuro-dask COMMAND --help` says first, where the one-line help is not enough.
DESCRIPTIONS = {
    "soak": "A soak of the whole system: a scheduler, volunteers (a fraction adversarial), the OpenAI-compatible "
    "gateway and CPU hogs as real processes, while request threads ask the bundled adder through the gateway "
    "and through generate/map, every answer checked against the local model; volunteers are SIGKILLed at "
    "random (and come back) and the scheduler restarts once. Prints the completion rate, wrong answers, "
    "latency per request and per layer, and every failure's kind; writes soak.json and a plot, soak.svg.",
    "drill": "A fire drill for the trust machinery: a local cluster where some workers misbehave (return perturbed "
    "results, collude, defect after earning trust, straggle or crash) while a client generates. The report "
    "says whether the answers were identical to an all-honest run, how many wrong results were accepted "
    "(should be 0) and how many were caught, and what reputation and, with --ledger, stakes did.",
}


def _describe_commands(sub: argparse._SubParsersAction) -> None:
    """Every subcommand's --help opens with a description: its own, else its one-line help."""
    helps = {a.dest: a.help for a in sub._choices_actions}
    for name, parser in sub.choices.items():
        if not parser.description:
            text = DESCRIPTIONS.get(name) or (helps.get(name) or "").rstrip(".") + "."
            parser.description = text[:1].upper() + text[1:]


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:2] == ["worker", "status"]:  # `worker ADDR` takes a positional: `worker status` is worker-status
        argv = ["worker-status", *argv[2:]]
    args, extra = build_parser().parse_known_args(argv)
    if not args.verbose:  # Dask logs cluster start and shutdown at INFO, tracebacks included
        os.environ.setdefault("DASK_LOGGING__DISTRIBUTED", "warning")  # for worker processes
        import dask.config  # already read (neuro_dask registers its defaults): set it here too

        if "distributed" not in sys.modules:  # distributed reads this when first imported
            dask.config.set({"logging.distributed": os.environ["DASK_LOGGING__DISTRIBUTED"]})
    if extra and not getattr(args, "passthrough", False):
        build_parser().error(f"unrecognized arguments: {' '.join(extra)}")
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    if getattr(args, "wait_timeout", False) is None:
        from neuro_dask.settings import ClientSettings

        args.wait_timeout = ClientSettings.load().load_timeout
    try:
        return args.func(args, extra) if getattr(args, "passthrough", False) else args.func(args)
    except NeuroDaskError as exc:
        print(f"neuro-dask: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
