"""Fine-grained experts on workers: a DeepSeek-V3-shaped MoE layer against a Mixtral-shaped one.

    .venv/bin/python benchmarks/bench_fine_grained.py [--quick] [--workers 2,4] [--rounds N]

Two random checkpoints written by transformers and sharded with `layout="transformers"`:
  deepseek_v3  DeepSeek-V3's MoE layer at 1/8 width: hidden 896 (7168/8), 256 routed experts of
               moe_intermediate 256 (2048/8), top-8, group-limited routing (n_group 8, topk_group 4,
               noaux_tc), one shared expert (runs on the client, in the trunk); 2 decoder layers, both MoE
               (first_k_dense_replace 0); MLA attention at 1/8 (16 heads, q_lora 192, kv_lora 64,
               qk_nope 16, v 16; qk_rope 16 = 64/4); vocabulary 4096
  mixtral      Mixtral-8x7B's MoE layer at 1/8 expert width with the same hidden: hidden 896, 8 experts
               of intermediate 1792 (14336/8), top-2; 2 decoder layers; 16/2 heads; vocabulary 4096
`--quick`: hidden 224, deepseek experts of 64, mixtral experts of 448, 1 layer, 1 round.

Each is served on an in-process cluster of N workers (N from --workers, default 2 and 4; neuro_worker
preload, processes=False, --neuro-no-benchmark, replicas 1 and hot-extra-replicas 0, so every expert
lives on exactly one worker and the placement never changes while measuring; no Dask memory limit;
direct transport; float32, CPU). The workers share this process and its 2 cores with the client, so
they do not compute in parallel: ms/layer shows what the extra messages cost, not what N machines
would gain. Both models are also loaded locally (nd.load without a client: the same expert
runners in this process) for a per-layer baseline.

Measured per MoE layer call, over 5 rounds of every phase (--rounds) (the executor's run_layer: the
routed experts of one layer for every token of one forward step; the router and DeepSeek's shared
expert run in the client's trunk and are not in it), instrumenting the model's DistributedExecutor:
`run_layer` is wrapped to time each call and to note the experts it needs, `transport.call_many`
(where the executor hands the transport one message per worker) is wrapped to note every message:
its worker, experts, rows and payload bytes.
  phases     decode b1: model.generate, 1 prompt of 16 tokens, --new-tokens new tokens; the layer calls
             after the prefill's (one per MoE layer) are decode steps, 1 token each
             decode b8: the same with 8 prompts of 16 tokens (8 tokens a step)
             prefill 128: model.forward on 1 x 128 tokens (128 tokens a call)
  messages   per layer call; checked against the routes: it must equal the number of distinct workers
             holding at least one needed expert, every needed expert must travel in exactly one message
             to the worker that holds it, and the call must take one round (no re-sends)
  experts/message, rows/message (sum of the rows of the message's experts = token x expert pairs),
             payload KiB/message (hidden states out; the answer is the same size)
  ms/layer   median run_layer wall time, distributed and local (same phase, same prompts)
  placement  experts per worker (all MoE layers together), from the client's route table
Results: benchmarks/results/fine-grained.json. Timings on a shared 2-core machine are noisy; the
message counts are exact.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent


@dataclasses.dataclass(frozen=True)
class Shapes:
    hidden: int
    ds_inter: int
    mx_inter: int
    layers: int
    heads: int
    vocab: int = 4096


FULL = Shapes(hidden=896, ds_inter=256, mx_inter=1792, layers=2, heads=16)
QUICK = Shapes(hidden=224, ds_inter=64, mx_inter=448, layers=1, heads=4)


def deepseek_config(s: Shapes):
    from transformers import AutoConfig

    return AutoConfig.for_model(
        "deepseek_v3",
        vocab_size=s.vocab,
        hidden_size=s.hidden,
        intermediate_size=s.hidden * 18432 // 7168,
        moe_intermediate_size=s.ds_inter,
        num_hidden_layers=s.layers,
        first_k_dense_replace=0,
        num_attention_heads=s.heads,
        num_key_value_heads=s.heads,
        n_routed_experts=256,
        n_shared_experts=1,
        num_experts_per_tok=8,
        n_group=8,
        topk_group=4,
        q_lora_rank=1536 * s.hidden // 7168,
        kv_lora_rank=512 * s.hidden // 7168,
        qk_nope_head_dim=16,
        qk_rope_head_dim=16,
        v_head_dim=16,
        max_position_embeddings=4096,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )


def mixtral_config(s: Shapes):
    from transformers import AutoConfig

    return AutoConfig.for_model(
        "mixtral",
        vocab_size=s.vocab,
        hidden_size=s.hidden,
        intermediate_size=s.mx_inter,
        num_hidden_layers=s.layers,
        num_attention_heads=s.heads,
        num_key_value_heads=2,
        num_local_experts=8,
        num_experts_per_tok=2,
        max_position_embeddings=4096,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )


def write_store(name: str, config, root: Path) -> Path:
    from transformers import AutoModelForCausalLM

    import neuro_dask as nd

    torch.manual_seed(0)
    hf = AutoModelForCausalLM.from_config(config).eval()
    hf.save_pretrained(root / f"{name}-hf")
    del hf
    gc.collect()
    nd.shard_checkpoint(root / f"{name}-hf", root / name, layout="transformers")
    return root / name


def no_eos(model):
    model.generation = dataclasses.replace(model.generation, eos_token_ids=())
    return model


class Recorder:
    """Wraps an executor's run_layer (and, distributed, its transport's call_many) on the instance."""

    def __init__(self, executor):
        self.calls: list[dict] = []
        self._current: dict | None = None
        run_layer = executor.run_layer

        def timed_run_layer(layer, groups):
            rec = {
                "layer": int(layer),
                "rows": {int(e): int(x.shape[0]) for e, x in groups.items()},
                "messages": [],
                "rounds": 0,
            }
            self._current = rec
            start = time.perf_counter()
            try:
                return run_layer(layer, groups)
            finally:
                rec["ms"] = 1000 * (time.perf_counter() - start)
                self.calls.append(rec)
                self._current = None

        executor.run_layer = timed_run_layer
        transport = getattr(executor, "transport", None)
        if transport is not None:
            call_many = transport.call_many

            def counted_call_many(calls, timeout):
                rec = self._current
                if rec is not None:
                    rec["rounds"] += 1
                    for worker, msg in calls.items():
                        rec["messages"].append(
                            {
                                "worker": worker,
                                "experts": [int(e) for e in msg["experts"]],
                                "rows": int(sum(msg["counts"])),
                                "bytes": len(msg["data"]),
                            }
                        )
                return call_many(calls, timeout)

            transport.call_many = counted_call_many

    def take(self) -> list[dict]:
        calls, self.calls = self.calls, []
        return calls


def run_phases(model, rec: Recorder, prompts: dict, new_tokens: int, layers: int, rounds: int) -> dict[str, list]:
    """phase -> the layer calls of that phase over all rounds."""
    out: dict[str, list] = {"decode_b1": [], "decode_b8": [], "prefill_128": []}
    for _ in range(rounds):
        for phase in ("decode_b1", "decode_b8"):
            rec.take()
            model.generate(prompts[phase], max_new_tokens=new_tokens)
            calls = rec.take()
            out[phase] += calls[layers:]  # the first `layers` calls are the prompt's prefill
        rec.take()
        model.forward(prompts["prefill_128"])
        out["prefill_128"] += rec.take()
    return out


def check_messages(calls: list[dict], routes: dict) -> list[str]:
    """One message per worker holding a needed expert; each expert once, to its holder; one round."""
    problems = []
    for i, c in enumerate(calls):
        holders = {}
        for e in c["rows"]:
            ws = routes.get((c["layer"], e), ())
            if len(ws) != 1:
                problems.append(f"call {i}: expert {e} of layer {c['layer']} has {len(ws)} routes")
            holders[e] = ws[0] if ws else None
        workers_needed = set(holders.values())
        sent = Counter(e for m in c["messages"] for e in m["experts"])
        msg_workers = [m["worker"] for m in c["messages"]]
        if c["rounds"] != 1:
            problems.append(f"call {i}: {c['rounds']} rounds")
        if len(msg_workers) != len(set(msg_workers)):
            problems.append(f"call {i}: a worker got two messages")
        if len(c["messages"]) != len(workers_needed):
            problems.append(f"call {i}: {len(c['messages'])} messages for {len(workers_needed)} holding workers")
        if set(sent) != set(c["rows"]) or any(n != 1 for n in sent.values()):
            problems.append(f"call {i}: experts sent {dict(sent)} vs needed {sorted(c['rows'])}")
        for m in c["messages"]:
            if any(holders.get(e) != m["worker"] for e in m["experts"]):
                problems.append(f"call {i}: a message went to a worker that does not hold its experts")
    return problems


def med(values) -> float:
    values = list(values)
    return statistics.median(values) if values else float("nan")


def summarize(calls: list[dict], local_calls: list[dict], routes: dict) -> dict:
    msgs = [m for c in calls for m in c["messages"]]
    return {
        "layer_calls": len(calls),
        "tokens_x_topk_rows_per_call": med(sum(c["rows"].values()) for c in calls),
        "experts_needed_per_call": {
            "median": med(len(c["rows"]) for c in calls),
            "max": max(len(c["rows"]) for c in calls),
        },
        "messages_per_call": {
            "median": med(len(c["messages"]) for c in calls),
            "min": min(len(c["messages"]) for c in calls),
            "max": max(len(c["messages"]) for c in calls),
        },
        "holding_workers_per_call": med(len({routes[(c["layer"], e)][0] for e in c["rows"]}) for c in calls),
        "experts_per_message": {
            "median": med(len(m["experts"]) for m in msgs),
            "max": max(len(m["experts"]) for m in msgs),
        },
        "rows_per_message": {"median": med(m["rows"] for m in msgs), "max": max(m["rows"] for m in msgs)},
        "kib_per_message": med(m["bytes"] / 1024 for m in msgs),
        "ms_per_layer": {"distributed": med(c["ms"] for c in calls), "local": med(c["ms"] for c in local_calls)},
        "message_check": check_messages(calls, routes) or "ok",
    }


@contextlib.contextmanager
def cluster(tmp: Path, workers: int):
    import dask
    from distributed import Client

    from neuro_dask.client.cluster import local_cluster

    # hot-extra-replicas 0: a fixed placement, so that every message count is the placement's own.
    with dask.config.set(
        {
            "neuro.worker.cache-dir": str(tmp / f"cache-{workers}"),
            "neuro.client.transport": "direct",
            "neuro.scheduler.hot-extra-replicas": 0,
        }
    ):
        with (
            local_cluster(
                n_workers=workers,
                processes=False,
                replicas=1,
                worker_args=["--neuro-no-benchmark"],
                dashboard_address=None,
                memory_limit=0,
            ) as c,
            Client(c) as client,
        ):
            client.wait_for_workers(workers, timeout=60)
            yield client


def placement(routes: dict) -> dict:
    per_worker = Counter(ws[0] for ws in routes.values() if ws)
    per_layer: dict[int, Counter] = {}
    for (layer, _), ws in routes.items():
        if ws:
            per_layer.setdefault(layer, Counter())[ws[0]] += 1
    names = {w: f"worker-{i}" for i, w in enumerate(sorted(per_worker))}
    return {
        "experts_per_worker": {names[w]: n for w, n in sorted(per_worker.items())},
        "per_layer": {str(l): {names[w]: n for w, n in sorted(c.items())} for l, c in sorted(per_layer.items())},
        "replicas_per_expert": sorted({len(ws) for ws in routes.values()}),
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="narrow models, 1 layer, 1 round (a smoke run)")
    p.add_argument("--workers", default="2,4", help="cluster sizes, comma-separated")
    p.add_argument("--rounds", type=int, default=None, help="repeats of every phase (default 5; quick 1)")
    p.add_argument("--new-tokens", type=int, default=8)
    args = p.parse_args(argv)
    import neuro_dask as nd

    shapes = QUICK if args.quick else FULL
    rounds = args.rounds or (1 if args.quick else 5)
    sizes = [int(n) for n in args.workers.split(",") if n]
    began = time.perf_counter()

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - began:6.1f} s] {msg}", flush=True)

    g = torch.Generator().manual_seed(1)
    prompts = {
        "decode_b1": torch.randint(3, shapes.vocab, (1, 16), generator=g),
        "decode_b8": torch.randint(3, shapes.vocab, (8, 16), generator=g),
        "prefill_128": torch.randint(3, shapes.vocab, (1, 128), generator=g),
    }
    results: dict = {"models": {}, "runs": []}
    with tempfile.TemporaryDirectory(prefix="bench-fine-grained-") as tmp:
        tmp = Path(tmp)
        stores = {
            "deepseek_v3": write_store("deepseek_v3", deepseek_config(shapes), tmp),
            "mixtral": write_store("mixtral", mixtral_config(shapes), tmp),
        }
        log("checkpoints written and sharded")
        local_calls, reference = {}, {}
        for name, path in stores.items():
            model = no_eos(nd.load(path))
            cfg = model.config
            results["models"][name] = {
                "experts_per_layer": cfg.num_experts,
                "top_k": cfg.num_experts_per_tok,
                "moe_layers": len(cfg.moe_layers),
                "hidden": cfg.hidden_size,
                "expert_parameters": cfg.expert_parameters,
                "expert_file_bytes": model_expert_bytes(path),
            }
            rec = Recorder(model.executor)
            model.generate(prompts["decode_b1"], max_new_tokens=2)  # warm-up
            reference[name] = model.generate(prompts["decode_b8"], max_new_tokens=args.new_tokens)
            local_calls[name] = run_phases(model, rec, prompts, args.new_tokens, len(cfg.moe_layers), rounds)
            del model, rec
            gc.collect()
            log(f"{name}: local baseline measured")
        for n in sizes:
            with cluster(tmp, n) as client:
                for name, path in stores.items():
                    start = time.perf_counter()
                    model = no_eos(nd.load(path, client=client))
                    load_s = time.perf_counter() - start
                    routes = dict(model.executor.routes.routes)
                    rec = Recorder(model.executor)
                    model.generate(prompts["decode_b1"], max_new_tokens=2)  # warm-up: connections
                    identical = torch.equal(
                        model.generate(prompts["decode_b8"], max_new_tokens=args.new_tokens), reference[name]
                    )
                    calls = run_phases(
                        model, rec, prompts, args.new_tokens, results["models"][name]["moe_layers"], rounds
                    )
                    run = {
                        "model": name,
                        "workers": n,
                        "load_s": load_s,
                        "tokens_identical_to_local": identical,
                        "placement": placement(routes),
                        "phases": {ph: summarize(calls[ph], local_calls[name][ph], routes) for ph in calls},
                    }
                    results["runs"].append(run)
                    model.close()
                    del model, rec
                    gc.collect()
                    log(f"{name} on {n} workers measured (load {load_s:.1f} s)")
    total = time.perf_counter() - began
    import transformers

    results["total_seconds"] = total
    results["setup"] = {
        "quick": args.quick,
        "shapes": dataclasses.asdict(shapes),
        "rounds": rounds,
        "new_tokens": args.new_tokens,
        "workers": sizes,
        "dtype": "float32",
        "cluster": "in-process, replicas 1, hot-extra-replicas 0, direct transport",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "threads": torch.get_num_threads(),
        "cpus": os.cpu_count(),
        "load_average_at_end": os.getloadavg(),
        "machine": platform.machine(),
    }
    print(f"command: {' '.join([Path(sys.executable).name, *sys.argv])}")
    print(report(results))
    print(f"total run time {total:.0f} s")
    (HERE / "results").mkdir(exist_ok=True)
    (HERE / "results" / "fine-grained.json").write_text(json.dumps(results, indent=2))
    return 0


def model_expert_bytes(path: Path) -> int:
    from neuro_dask.store.manifest import Manifest

    return Manifest.read(path).experts[0].bytes


def report(results: dict) -> str:
    lines = [
        "| model | experts, top-k | workers | phase | experts needed / call | messages / call (min-max) | "
        "holding workers / call | experts / msg | rows / msg | KiB / msg | ms / layer distributed | "
        "ms / layer local | one msg per holding worker |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for run in results["runs"]:
        m = results["models"][run["model"]]
        for phase, s in run["phases"].items():
            mc = s["messages_per_call"]
            lines.append(
                f"| {run['model']} | {m['experts_per_layer']}, {m['top_k']} | {run['workers']} | {phase} | "
                f"{s['experts_needed_per_call']['median']:g} | {mc['median']:g} ({mc['min']}-{mc['max']}) | "
                f"{s['holding_workers_per_call']:g} | {s['experts_per_message']['median']:g} | "
                f"{s['rows_per_message']['median']:g} | {s['kib_per_message']:.1f} | "
                f"{s['ms_per_layer']['distributed']:.2f} | {s['ms_per_layer']['local']:.2f} | "
                f"{'yes' if s['message_check'] == 'ok' else 'NO: ' + '; '.join(s['message_check'][:3])} |"
            )
    lines += [
        "",
        "| model | workers | experts per worker (all MoE layers) | per layer | tokens identical to local | "
        "nd.load on the cluster, s |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for run in results["runs"]:
        pl = run["placement"]
        per_layer = "; ".join(f"L{l}: {'/'.join(str(v) for v in c.values())}" for l, c in pl["per_layer"].items())
        per_worker = "/".join(str(v) for v in pl["experts_per_worker"].values())
        lines.append(
            f"| {run['model']} | {run['workers']} | {per_worker} "
            f"| {per_layer} | {run['tokens_identical_to_local']} | {run['load_s']:.1f} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
