"""Writes quickstart.ipynb, batch_inference.ipynb, operator.ipynb and privacy.ipynb from the cells below.

The notebooks are generated so that they are reviewed as code and committed without outputs:
edit this file, then run `python notebooks/build_notebooks.py` (`--check` exits 1 when a
committed notebook differs from what this script writes). tests/e2e/test_notebooks.py runs
each notebook top to bottom against the bundled addition model, and checks that their code
cells use only the public API (no `_private` names, no scheduler handlers called by name, no
imports of modules outside `PUBLIC_MODULES` there).
"""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path

import nbformat

HERE = Path(__file__).resolve().parent

KERNELSPEC = {"name": "python3", "display_name": "Python 3 (ipykernel)", "language": "python"}


def md(text: str) -> tuple[str, str]:
    return "markdown", textwrap.dedent(text).strip()


def code(text: str) -> tuple[str, str]:
    return "code", textwrap.dedent(text).strip()


# ---- quickstart ---------------------------------------------------------------------------------

QUICKSTART = [
    md("""
    # neuro_dask quick start

    neuro_dask runs a Mixture-of-Experts model with the **trunk** (embeddings, attention, router)
    in this process and the **experts** on Dask workers. This notebook starts a small local
    cluster, loads the bundled demo model (a tiny Mixtral that adds numbers: `"123+456="` ->
    `"579"`), generates text, streams tokens as they come and scores texts.

    It runs in well under a minute on a laptop.
    """),
    code("""
    import random

    import pandas as pd
    from distributed import Client

    import neuro_dask as nd
    from neuro_dask.client.cluster import local_cluster
    from neuro_dask.demo.addition import ASSET_DIR, sample_problems
    """),
    md("""
    ## 1. A cluster

    `local_cluster` is a Dask `LocalCluster` whose scheduler and workers run neuro_dask's plugins
    (`--preload neuro_scheduler` / `--preload neuro_worker`).

    * `processes=False` (used here) runs the workers as threads inside this kernel: quick to start
      and enough to try the API.
    * `processes=True` (the default) is the real thing: every worker is its own process, as a
      volunteer on another machine would be, and expert calls cross a real network connection.

    On a real network you would instead connect to a running scheduler:
    `client = Client("tcp://scheduler-host:8786")` (workers joined with `neuro-dask worker ADDR`).
    """),
    code("""
    cluster = local_cluster(n_workers=2, processes=False)
    client = Client(cluster)
    client.wait_for_workers(2, timeout=60)  # placement spreads experts over the workers it sees
    client
    """),
    md("""
    The scheduler's Dask dashboard gains neuro_dask's own pages (network, experts, calls, trust,
    economy). Open them in a browser while the cells below run:
    """),
    code("""
    print("Dask dashboard: ", client.dashboard_link)
    for page in ["network", "experts", "calls", "trust", "economy"]:
        print(f"neuro {page + ':':9}", client.dashboard_link.replace("/status", f"/neuro/{page}"))
    """),
    md("""
    ## 2. Load the model

    `nd.load(path, client=client)` publishes the sharded model to the scheduler, which places its
    experts on the workers; the trunk and the tokenizer are loaded here. Without `client=` every
    expert would be loaded into this process instead (same API).
    """),
    code("""
    model = nd.load(ASSET_DIR, client=client)
    cfg = model.config
    print(f"{cfg.model_type}: {cfg.num_hidden_layers} layers, {cfg.num_experts} experts per layer, "
          f"{cfg.num_experts_per_tok} per token, context {cfg.max_position_embeddings} positions")
    """),
    md("""
    ## 3. Generate text

    `generate_text` takes a list of prompts (they are batched together) and returns only the new
    text of each, cut at the end-of-sequence token. Greedy decoding by default; pass
    `do_sample=True, temperature=..., top_p=..., seed=...` to sample.
    """),
    code("""
    prompts = ["123+456=", "7+5=", "999+1=", "250+250="]
    answers = model.generate_text(prompts, max_new_tokens=8)
    for prompt, answer in zip(prompts, answers):
        print(f"{prompt:>10} {answer}")
    assert answers == ["579", "12", "1000", "500"]
    """),
    md("""
    A few held-out problems (pairs the model never saw in training), checked against the true sums:
    """),
    code("""
    problems = sample_problems(20, random.Random(0), held_out=True)
    answers = model.generate_text([p.prompt for p in problems], max_new_tokens=8)
    correct = sum(a == p.answer for a, p in zip(answers, problems))
    print(f"{correct}/{len(problems)} correct, e.g. {problems[0].prompt}{answers[0]}")
    """),
    md("""
    ## 4. Stream tokens as they come

    `model.stream(input_ids, ...)` is a generator: each step yields a tensor with the next token
    of every row (finished rows get the pad id, which decodes to `""`). Decode each step with the
    model's tokenizer to show text as it is produced.
    """),
    code("""
    tok = model.tokenizer
    prompt = "123+456="
    streamed = ""
    print(prompt, end="", flush=True)
    for step in model.stream(tok.encode_batch([prompt]), max_new_tokens=8):
        piece = tok.decode(step.tolist())
        streamed += piece
        print(piece, end="", flush=True)
    print()
    assert streamed == "579"
    """),
    md("""
    With several prompts, each step carries one token per row:
    """),
    code("""
    batch = ["12+30=", "500+500=", "1+1="]
    texts = [""] * len(batch)
    for i, step in enumerate(model.stream(tok.encode_batch(batch), max_new_tokens=8)):
        texts = [t + tok.decode([token]) for t, token in zip(texts, step.tolist())]
        print(f"step {i}: {texts}")
    assert texts == ["42", "1000", "2"]
    """),
    md("""
    ## 5. Score texts

    `model.score(texts)` runs one forward pass and returns, per text, the log-probability the model
    gives each of its tokens (`.logprobs`), their sum (`.total`) and the perplexity. Useful to rank
    candidate answers or to spot inputs unlike the training data. Here the true sum is far more
    likely than a wrong one (the prompt's digits are random, so they cost every candidate the same):
    """),
    code("""
    candidates = ["123+456=579", "123+456=580", "123+456=5790"]
    scores = model.score(candidates)
    for text, s in zip(candidates, scores):
        print(f"{text:>14}  total log-prob {s.total:8.3f}  perplexity {s.perplexity:7.3f}")
    best = max(zip(candidates, scores), key=lambda pair: pair[1].total)[0]
    assert best == "123+456=579", best
    """),
    md("""
    Per-token log-probabilities show *where* a wrong answer becomes unlikely. `.tokens` holds the
    token ids; the first token (the `<s>` the tokenizer prepends) has no context and no score, so
    `logprobs[i]` belongs to `tokens[i + 1]`:
    """),
    code("""
    per_token = pd.concat(
        {text: pd.DataFrame({"token": [tok.decode([t]) for t in s.tokens[1:]], "logprob": s.logprobs})
         for text, s in zip(candidates, scores)},
        axis=1,
    )
    per_token.round(3)
    """),
    md("""
    ## 6. Clean up

    `model.close()` releases the model's connections (or use `with nd.load(...) as model:`).
    """),
    code("""
    model.close()
    client.close()
    cluster.close()
    """),
]

# ---- batch inference ----------------------------------------------------------------------------

BATCH = [
    md("""
    # Batch inference over a Dask DataFrame

    `model.map(series, ...)` generates text for every row of a `dask.dataframe` Series (also a
    pandas Series, a dask Bag or a list) and returns a Series with the same index and partitions.
    A prompt that cannot be run does not fail the whole job: its row holds a
    `neuro_dask.MapFailure` (with `.error`, a message) and every other row its answer.

    This notebook answers 200 held-out addition problems plus two malformed prompts, checks the
    answers against the true sums, and plots the latency of each batch.
    """),
    code("""
    import random

    import dask.dataframe as dd
    import pandas as pd
    from distributed import Client

    import neuro_dask as nd
    from neuro_dask.client.cluster import local_cluster
    from neuro_dask.demo.addition import ASSET_DIR, sample_problems
    """),
    md("""
    A local cluster with the workers as threads (`processes=False`: quick to start; `processes=True`,
    the default, runs each worker as its own process as on a real network), and the bundled model:
    """),
    code("""
    cluster = local_cluster(n_workers=2, processes=False)
    client = Client(cluster)
    client.wait_for_workers(2, timeout=60)
    model = nd.load(ASSET_DIR, client=client)
    print("dashboard:", client.dashboard_link.replace("/status", "/neuro/calls"))
    """),
    md("""
    ## 1. The data

    200 problems from the held-out set (the model never saw them in training) and two malformed
    prompts: an empty one and one longer than the model's context window. Four partitions.
    """),
    code("""
    problems = sample_problems(200, random.Random(42), held_out=True)
    too_long = "+".join(["1"] * model.config.max_position_embeddings) + "="  # cannot fit the context
    pdf = pd.DataFrame({
        "a": [p.a for p in problems] + [None, None],
        "b": [p.b for p in problems] + [None, None],
        "prompt": [p.prompt for p in problems] + ["", too_long],
    }).astype({"a": "Int64", "b": "Int64"})
    pdf["expected"] = (pdf["a"] + pdf["b"]).astype("string")
    df = dd.from_pandas(pdf, npartitions=4)
    df
    """),
    md("""
    ## 2. Generate

    The trunk runs in this process, so `model.map` brings the prompts here partition by partition
    and runs them in batches of `batch_size` (across partition boundaries, so that every expert
    call carries many tokens) while the experts work on the cluster. Unlike most Dask operations
    it does the work when called, with a progress bar (`progress=False` turns it off; in Jupyter
    the bar is a widget, from `ipywidgets`, which `pip install 'neuro-dask[notebook]'` brings); the
    Series it returns holds the results.
    """),
    code("""
    answers = model.map(df["prompt"], max_new_tokens=8, batch_size=32)
    print(f"{answers.npartitions} partitions, same divisions as the input: {answers.divisions == df.divisions}")
    result = answers.compute()
    result.head()
    """),
    md("""
    ## 3. Failures

    Rows that could not be run hold a `MapFailure` rather than a string; its `.error` says why
    (`nd.failures(result)` lists them without their rows).
    """),
    code("""
    failed = result.map(lambda value: isinstance(value, nd.MapFailure)).astype(bool)
    print(f"{int(failed.sum())} failed of {len(result)}")
    for index, failure in result[failed].items():
        print(f"row {index} ({len(failure.prompt)} characters): {failure.error}")
    assert list(result.index[failed]) == [len(problems), len(problems) + 1], "only the malformed prompts fail"
    """),
    md("""
    ## 4. Accuracy

    Join the answers back to the data and compare with the true sums:
    """),
    code("""
    scored = pdf.assign(answer=result.where(~failed, None)).loc[~failed]
    scored["correct"] = scored["answer"].str.strip() == scored["expected"]
    accuracy = scored["correct"].mean()
    print(f"exact match on {len(scored)} held-out problems: {accuracy:.1%}")
    assert accuracy >= 0.95, scored.loc[~scored["correct"]]
    print("wrong answers:", scored.loc[~scored["correct"], ["prompt", "answer"]].to_dict("records") or "none")
    scored.sample(5, random_state=0)
    """),
    md("""
    ## 5. Latency per batch

    `model.map` records one entry per batch it ran in `model.last_map_stats`
    (`batch`, `prompts`, `seconds`):
    """),
    code("""
    stats = pd.DataFrame(model.last_map_stats)
    stats["prompts_per_second"] = stats["prompts"] / stats["seconds"]
    print(f"{len(stats)} batches, {stats['prompts'].sum()} prompts, "
          f"median {stats['seconds'].median() * 1000:.0f} ms per batch")
    stats
    """),
    code("""
    from bokeh.io import output_notebook, show
    from bokeh.models import ColumnDataSource
    from bokeh.plotting import figure

    output_notebook(hide_banner=True)
    source = ColumnDataSource(stats.assign(milliseconds=stats["seconds"] * 1000))
    p = figure(title="model.map: latency per batch", x_axis_label="batch", y_axis_label="ms",
               height=300, width=600, tooltips=[("batch", "@batch"), ("prompts", "@prompts"),
                                                ("ms", "@milliseconds{0.0}")])
    p.vbar(x="batch", top="milliseconds", width=0.8, source=source)
    p.y_range.start = 0
    show(p)
    """),
    md("""
    ## Clean up
    """),
    code("""
    model.close()
    client.close()
    cluster.close()
    """),
]

# ---- operator -----------------------------------------------------------------------------------

OPERATOR = [
    md("""
    # The network from an operator's seat

    What the scheduler knows about its workers (owners, reputation, the experts each one
    serves), where the experts are placed, and what happens when some workers lie: a drill with
    adversarial workers and the NEURO ledger's report of who paid, who earned and who was slashed.
    The same figures are on the dashboard's `/neuro/*` pages; here they are data you can analyse.
    """),
    code("""
    import random
    import tempfile
    from pathlib import Path

    import dask
    import pandas as pd
    from bokeh.io import output_notebook, show
    from bokeh.models import ColumnDataSource
    from bokeh.plotting import figure
    from distributed import Client

    import neuro_dask as nd
    from neuro_dask.client.cluster import local_cluster
    from neuro_dask.demo.addition import ASSET_DIR, sample_problems

    output_notebook(hide_banner=True)
    """),
    md("""
    ## 1. A network

    Three workers (threads in this kernel: `processes=False`; a real network has one process per
    volunteer machine) with the trust layer on (`neuro.client.trust`: every expert call is judged
    and the scheduler keeps a reputation per worker) and worker `0` trusted by the operator
    (`neuro.scheduler.trusted`; on a real scheduler, the same key in its Dask config). Then some
    traffic, so that reputations move: leaving the `with` block closes the model, which sends its
    last trust reports to the scheduler.
    """),
    code("""
    dask.config.set({"neuro.client.trust": True, "neuro.scheduler.trusted": ["0"]})
    cluster = local_cluster(n_workers=3, processes=False)
    client = Client(cluster)
    client.wait_for_workers(3, timeout=60)
    print("network page:", client.dashboard_link.replace("/status", "/neuro/network"))

    with nd.load(ASSET_DIR, client=client) as model:
        problems = sample_problems(100, random.Random(1), held_out=True)
        answers = model.generate_text([p.prompt for p in problems], max_new_tokens=8)
    print(f"{sum(a == p.answer for a, p in zip(answers, problems))}/{len(problems)} answered correctly")
    """),
    md("""
    ## 2. The scheduler's view

    `nd.network_status(client)` asks the scheduler (its `neuro_scheduler` plugin) what it knows,
    as plain data: `.workers`, every worker with its owner, speed, memory budget, the experts it
    serves and its reputation (`trust_*` fields: `trust_score`, whether it is `established`, its
    run of `consecutive_valid` results, whether it is still `routable`); `.models`, the models
    published; `.placement()`, one `(worker, model, layer, expert)` per expert replica.
    """),
    code("""
    status = nd.network_status(client)
    workers = pd.DataFrame.from_dict(status.workers, orient="index")
    workers["experts"] = workers["serving"].map(len)
    workers["memory_GiB"] = (workers["memory_budget"] / 2**30).round(1)
    trust = [c for c in workers.columns if c.startswith("trust_")]
    workers = workers[["name", "owner", "speed", "memory_GiB", "experts", *trust]].sort_values("name")
    assert workers["trust_consecutive_valid"].sum() > 0, "no trust report reached the scheduler"
    workers
    """),
    code("""
    pd.DataFrame({model_id: info["summary"] for model_id, info in status.models.items()})
    """),
    md("""
    ## 3. Placement

    Which worker hosts which expert: one row per (worker, layer, expert). The default target is
    two replicas per expert; the trusted worker is an anchor that serves every expert, so that
    each newcomer's results can be checked against it.
    """),
    code("""
    placement = pd.DataFrame(status.placement(), columns=["worker", "model", "layer", "expert"])
    placement["expert_id"] = "L" + placement["layer"].astype(str) + "/E" + placement["expert"].astype(str)
    replicas = placement.groupby("expert_id").size()
    print(f"{len(replicas)} experts, replicas per expert: {sorted(set(replicas))}")
    assert len(replicas) == model.config.num_experts * len(model.config.moe_layers)  # every expert is served
    pd.crosstab(placement["worker"], [placement["layer"], placement["expert"]])
    """),
    code("""
    experts = sorted(placement["expert_id"].unique(), key=lambda e: tuple(int(x[1:]) for x in e.split("/")))
    names = sorted(placement["worker"].unique())
    p = figure(title="expert placement (filled: the worker serves that expert)", x_range=experts,
               y_range=names, height=220, width=760, tools="hover", tooltips=[("", "@worker hosts @expert_id")],
               x_axis_label="layer / expert", y_axis_label="worker")
    p.rect(x="expert_id", y="worker", width=0.9, height=0.9, source=ColumnDataSource(placement),
           color="#2b7bba")
    p.xaxis.major_label_orientation = 1.0
    p.grid.grid_line_color = None
    show(p)
    """),
    code("""
    client.close()
    cluster.close()
    """),
    md("""
    ## 4. A drill: what if a third of the workers lie?

    `run_drill` starts its own local cluster of six workers, two of which are adversaries that
    perturb every result they return, runs a few prompts with the trust layer on, and compares
    the tokens with an honest in-process reference. With `ledger=` the scheduler also keeps the
    NEURO books (a SQLite file here): the drill funds its client and stakes every worker first.
    """),
    code("""
    from neuro_dask.cli.drill import run_drill

    workdir = Path(tempfile.mkdtemp(prefix="neuro-drill-"))
    ledger_url = f"sqlite:///{workdir / 'ledger.db'}"
    report = run_drill(ASSET_DIR, workers=6, adversaries=0.34, mode="perturb", prompts=6, tokens=8,
                       ledger=ledger_url)
    print(report.summary())
    assert report.identical, "the adversaries changed the output"
    assert report.caught, "no adversary was caught"
    """),
    md("""
    The report is a dataclass: its fields are plain data. `identical` says the client got exactly
    the honest tokens; `caught` lists the adversaries taken out of routing.
    """),
    code("""
    pd.Series({k: v for k, v in vars(report).items() if k != "ledger"}, dtype=object).to_frame("drill")
    """),
    md("""
    ## 5. The economy

    `report.ledger` is what this drill moved (amounts in the smallest unit, 10^9 per NEURO): what
    the client was charged, what each honest provider earned, which adversaries were slashed.
    """),
    code("""
    from neuro_dask.ledger import UNIT

    effect = report.ledger
    print(f"client charged {effect['charged'] / UNIT:.4f} NEURO; slashed: {', '.join(effect['slashed'])}; "
          f"books balance: {not effect['problems']}")
    earned = pd.Series(effect["earned"], name="earned (NEURO)") / UNIT
    earned.index.name = "honest provider"
    earned.to_frame()
    """),
    md("""
    The ledger's public transparency report, read straight from the database (anyone with read
    access to it can audit these figures):
    """),
    code("""
    from neuro_dask.ledger import Ledger

    ledger = Ledger(ledger_url)
    try:
        books = ledger.report()
    finally:
        ledger.close()
    in_neuro = {k: v / UNIT for k, v in books.items() if k not in ("accounts", "entries")}
    pd.Series(in_neuro, name="NEURO").to_frame().style.format("{:,.4f}")
    """),
    code("""
    flows = pd.DataFrame({
        "figure": ["fees paid", "rewards to providers", "burned", "slashed"],
        "NEURO": [books["fees"] / UNIT, books["rewards"] / UNIT, books["burned"] / UNIT, books["slashed"] / UNIT],
    })
    p = figure(title="the drill's economy (log scale)", x_range=list(flows["figure"]), y_axis_type="log",
               y_axis_label="NEURO", height=300, width=600, tooltips=[("", "@figure: @NEURO{0,0.0000} NEURO")])
    p.vbar(x="figure", top="NEURO", bottom=1e-3, width=0.7, source=ColumnDataSource(flows), color="#e08214")
    show(p)
    """),
]

PRIVACY = [
    md("""
    # Privacy: the private tier, federated fine-tuning and new model versions

    Three things a volunteer network can do without showing anyone your data
    (`docs/privacy.md` has the threat model and the measured costs):

    1. **The private tier**: every expert call on additive secret shares, so that no single
       volunteer ever sees a hidden state; with trust on, every call is also checked.
    2. **Federated fine-tuning**: workers train on data that never leaves them; the coordinator
       only ever sees the *sum* of their updates (secure aggregation).
    3. **New versions**: the result is published as a new version of a channel, and clients
       following the channel switch to it between requests, without one request failing.

    Runs in about a minute on a laptop, on the bundled adder.
    """),
    code("""
    import random
    import tempfile
    from pathlib import Path

    import dask
    import pandas as pd
    from bokeh.io import output_notebook, show
    from bokeh.layouts import row
    from bokeh.plotting import figure
    from distributed import Client

    import neuro_dask as nd
    from neuro_dask.client.cluster import local_cluster
    from neuro_dask.demo.addition import ASSET_DIR, exact_match, sample_problems

    output_notebook(hide_banner=True)
    """),
    md("""
    ## 1. A cluster of four owners

    Shares of one call go to workers of **different owners** (a volunteer's `--owner`; here each
    worker is its own owner). A verified private call needs two pairs of them, so every expert
    is placed on all four workers (`replicas=4`).
    """),
    code("""
    cluster = local_cluster(n_workers=4, processes=False, replicas=4)
    client = Client(cluster)
    client.wait_for_workers(4, timeout=60)
    problems = sample_problems(24, random.Random(0), held_out=True)
    prompts = [p.prompt for p in problems]
    """),
    md("""
    ## 2. The private tier

    `privacy="private"`: the hidden states are encoded in fixed point over Z_2^64 and split into
    two random shares; each worker applies the expert's linear maps to its share, and this
    process adds the answers and applies the non-linearity itself. Two round trips per layer
    instead of one, about 16x the bytes, the same answers. `model.stats()` counts what the
    expert calls cost so far (layers, round trips, bytes each way, ...), on every tier.
    """),
    code("""
    with nd.load(ASSET_DIR, client=client) as standard:
        expected = standard.generate_text(prompts, max_new_tokens=5)
    with nd.load(ASSET_DIR, client=client, privacy="private") as private:
        answers = private.generate_text(prompts, max_new_tokens=5)
        stats = private.stats()
    print("identical to the standard tier:", answers == expected, "| exact match:", exact_match(answers, problems))
    print(f"{stats['tier']} tier: {stats['round_trips'] / stats['layers']:.0f} round trips per layer, "
          f"{(stats['bytes_sent'] + stats['bytes_received']) / 1e3:.0f} kB of shares")
    """),
    md("""
    With `neuro.client.trust` on, each step is computed on **two independent splits** by
    worker-disjoint pairs: the expert's maps are exact on the ring, so honest splits agree bit
    for bit, and a wrong share shows up as a disagreement (settled by a third split, the liar
    reported).
    """),
    code("""
    with dask.config.set({"neuro.client.trust": True}), \\
            nd.load(ASSET_DIR, client=client, privacy="private") as verified:
        print(verified.generate_text(prompts[:4], max_new_tokens=5), [p.answer for p in problems[:4]])
        s = verified.stats()
        print(f"verified steps: {s['verified']}, unverified: {s['unverified']}, disputes: {s['disputes']}")
    """),
    md("""
    ## 3. Federated fine-tuning

    `neuro_dask.federated.run_federated` makes each participant a Dask actor on one worker; its
    data is made (or read from a path in that worker's config) *there*. Each round it trains the
    routers and experts for a few steps and returns its update masked with pairwise masks that
    cancel in the sum: the coordinator in this process only ever holds the aggregate.

    So that there is something to learn, the federation starts from the adder with every router
    and expert **re-initialised at random** (it answers nothing right), and 4 participants, each
    seeing only some digit patterns (non-IID), train it back. `evaluate=` measures the global
    model after every round on the coordinator's own held-out problems (none of the participants'
    data): the loss on the answer tokens and the exact-match accuracy.
    """),
    code("""
    from neuro_dask.federated import (
        LocalSteps, evaluator, get_flat, non_iid_split, reinitialise_moe, run_federated, set_flat, write_version,
    )

    ROUNDS = 8
    base = nd.load(ASSET_DIR)  # the coordinator's copy, in this process
    reinitialise_moe(base, seed=0)  # routers and experts redrawn at random: the untrained start
    held_out = sample_problems(200, random.Random(7), held_out=True)  # the coordinator's test set
    workers = sorted(client.scheduler_info()["workers"])
    ids = [f"p{k}" for k in range(4)]
    data = {pid: (lambda k=k: non_iid_split(200, seed=0)[k]) for k, pid in enumerate(ids)}  # runs on the worker


    def report(r):
        print(f"round {r.round_id}: {len(r.survivors)} survivors, dropped {r.dropped or 'none'}, "
              f"held-out loss {r.metrics['loss']:.3f}, accuracy {r.metrics['accuracy']:.1%}")


    coordinator = run_federated(client, dict(zip(ids, workers)), str(ASSET_DIR), get_flat(base), rounds=ROUNDS,
                                data=data, local=LocalSteps(steps=10, batch_size=32, lr=1e-2),
                                evaluate=evaluator(base, held_out), on_round=report)
    """),
    md("""
    Round by round (`coordinator.table()`; round 0 is the start, before any training):
    """),
    code("""
    rounds = pd.DataFrame(coordinator.table()).set_index("rounds")
    assert rounds["loss"].iloc[-1] < rounds["loss"].iloc[1] < rounds["loss"].iloc[0], "the loss did not fall"
    assert rounds["accuracy"].iloc[-1] > rounds["accuracy"].iloc[0], "the accuracy did not rise"
    rounds[["survivors", "dropped", "update_norm", "loss", "accuracy"]].style.format(
        {"update_norm": "{:.3f}", "loss": "{:.3f}", "accuracy": "{:.1%}"}, na_rep="")
    """),
    code("""
    plots = []
    for metric, color in [("loss", "#d6604d"), ("accuracy", "#2b7bba")]:
        p = figure(title=f"held-out {metric} after each round", x_axis_label="rounds", y_axis_label=metric,
                   height=250, width=360, tooltips=[("rounds", "@x"), (metric, "@y{0.000}")])
        p.line(rounds.index, rounds[metric], line_width=2, color=color)
        p.scatter(rounds.index, rounds[metric], size=6, color=color)
        plots.append(p)
    show(row(plots))
    """),
    md("""
    The result becomes a **new version**: new expert files with new hashes, a new manifest, and
    `federation.json` naming its parent. (A few rounds on a laptop train it only part of the way
    back: `benchmarks/bench_federated.py` runs 40 rounds. An operator would publish a version
    once its held-out figures beat the current one's; here it is published to show the switch.)
    """),
    code("""
    set_flat(base, coordinator.global_flat)
    v2 = Path(tempfile.mkdtemp()) / "adder-v2"
    manifest = write_version(base, ASSET_DIR, v2, {"rounds": ROUNDS, "held_out": coordinator.history[-1].metrics})
    print("new version:", manifest.model_id, "| lineage:", (v2 / "federation.json").read_text()[:120], "...")
    """),
    md("""
    ## 4. Switching the network to the new version

    The operator publishes versions on a **channel** (`neuro-dask publish --channel`): the first
    is current, a later one a candidate whose experts load beside the current ones. Adoption
    (the operator's `neuro-dask adopt`, or a governance vote) makes it current; clients that
    `nd.follow` the channel finish each request on the version it started on and move to the new
    one before the next; the old version retires once its requests have ended.
    """),
    code("""
    v1 = nd.publish(ASSET_DIR, client, channel="adder")["model"]
    model = nd.follow("adder", client)
    print("following", model.model_id, "->", model.generate_text(["123+456="], max_new_tokens=5))
    candidate = nd.publish(v2, client, channel="adder")
    print("published", candidate["model"], "as the", candidate["role"])
    print(nd.adopt("adder", candidate["model"], client))
    """),
    code("""
    for _ in range(2):  # the first request learns of the new version, the next runs on it
        answer = model.generate_text(["123+456="], max_new_tokens=5)
        print("ran on", model.model_id, answer)
    print("switches:", model.switches)
    print(nd.channels(client)["channels"]["adder"])
    """),
    code("""
    model.close()
    client.close()
    cluster.close()
    """),
]

NOTEBOOKS = {
    "quickstart.ipynb": QUICKSTART,
    "batch_inference.ipynb": BATCH,
    "operator.ipynb": OPERATOR,
    "privacy.ipynb": PRIVACY,
}


def build(name: str) -> nbformat.NotebookNode:
    """The notebook `name`, with stable cell ids (so that a rebuild changes nothing) and no outputs."""
    stem = name.removesuffix(".ipynb").replace("_", "-")
    cells = []
    for i, (kind, source) in enumerate(NOTEBOOKS[name]):
        cell = nbformat.v4.new_markdown_cell(source) if kind == "markdown" else nbformat.v4.new_code_cell(source)
        cell["id"] = f"{stem}-{i:02d}"
        cells.append(cell)
    nb = nbformat.v4.new_notebook(cells=cells)
    nb.metadata["kernelspec"] = dict(KERNELSPEC)
    nb.metadata["language_info"] = {"name": "python"}
    nbformat.validate(nb)
    return nb


def render(name: str) -> str:
    return nbformat.writes(build(name)) + "\n"


def main(argv: list[str]) -> int:
    check = "--check" in argv
    stale = []
    for name in NOTEBOOKS:
        path = HERE / name
        text = render(name)
        if check:
            if not path.exists() or path.read_text() != text:
                stale.append(name)
        else:
            path.write_text(text)
            print(f"wrote {path}")
    if stale:
        print(f"out of date (run python {Path(__file__).name}): {', '.join(stale)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
