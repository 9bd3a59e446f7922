"""`model.map`: batch generation or scoring over a list, a dask Bag, or a dask/pandas Series.

The model's trunk runs in this process, so the prompts come here partition by partition; they
are grouped into batches of `batch_size` across partition boundaries (so each expert call
carries many tokens), results go back into a collection of the same kind and shape. A prompt
that cannot be run (not a string or id list, empty, too long for the model, refused by the
tokenizer, longer than neuro.security.max-prompt-tokens, or failing on its own after its batch
failed) becomes a `MapFailure` in its place; the rest are delivered. neuro.security.max-batch
bounds each batch (batch_size), not the whole input; max_new_tokens above max-new-tokens or a
batch_size above max-batch raise LimitExceededError before any work. A progress bar shows the
prompts done (tqdm's notebook bar in Jupyter).
`model.last_map_stats` keeps each batch's size and seconds.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from neuro_dask.errors import NeuroDaskError
from neuro_dask.security.limits import RequestLimits, check_batch, check_new_tokens, check_prompt_tokens


@dataclass(frozen=True)
class MapFailure:
    prompt: Any
    error: str

    def __bool__(self) -> bool:  # so that `if result:` skips failures
        return False

    def __str__(self) -> str:
        return f"<failed: {self.error}>"


class MapInputError(NeuroDaskError, TypeError):
    def __init__(self, kind: str):
        super().__init__(f"model.map takes a list, a dask Bag, or a pandas or dask Series of prompts, not {kind}")


def failures(results) -> list[MapFailure]:
    """The failures among a computed map result (list, pandas Series)."""
    values = results.tolist() if hasattr(results, "tolist") else list(results)
    return [r for r in values if isinstance(r, MapFailure)]


def request_limits(task: str, batch_size: int, max_new_tokens: int) -> RequestLimits:
    """neuro.security's limits now; a batch_size or max_new_tokens above them is refused here."""
    from neuro_dask.settings import SecuritySettings

    limits = RequestLimits.from_settings(SecuritySettings.load())
    check_batch(batch_size, limits.max_batch, "pass a smaller batch_size to model.map")
    if task == "generate":
        check_new_tokens(max_new_tokens, limits.max_new_tokens)
    return limits


def _prepare(model, prompt, max_new_tokens: int, index: int = 0, max_prompt_tokens: int | None = None) -> list[int]:
    """The prompt's token ids, or a ValueError (or LimitExceededError) saying why it cannot run."""
    if isinstance(prompt, str):
        if not prompt:
            raise ValueError("empty prompt")
        ids = model.require_tokenizer().encode(prompt)
    elif isinstance(prompt, Sequence) and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        ids = list(prompt)
    else:
        raise ValueError(f"a prompt must be a string or a list of token ids, not {type(prompt).__name__}")
    if not ids:
        raise ValueError("the prompt has no tokens")
    if max_prompt_tokens is not None:
        check_prompt_tokens([len(ids)], max_prompt_tokens, start=index)
    limit = model.config.max_position_embeddings
    if len(ids) + max_new_tokens > limit:
        raise ValueError(f"{len(ids)} prompt tokens + {max_new_tokens} new exceed the model's {limit} positions")
    return ids


def _run_batch(model, task: str, rows: list[list[int]], max_new_tokens: int, options: dict) -> list:
    if task == "score":
        return [r.total for r in model.score(rows)]
    out = model.generate(rows, max_new_tokens=max_new_tokens, **options)
    prompt_width = max(len(r) for r in rows)  # generate left-pads the prompts to this
    stops = set(model.generation.eos_token_ids) | set(options.get("stop_token_ids", ()))
    tok = model.tokenizer
    texts = []
    for row in out:
        new = row[prompt_width:].tolist()
        cut = next((i for i, t in enumerate(new) if t in stops), len(new))
        texts.append(tok.decode(new[:cut]) if tok is not None else new[:cut])
    return texts


def run_prompts(
    model,
    prompts: list,
    task: str,
    batch_size: int,
    max_new_tokens: int,
    progress: bool,
    options: dict,
    limits: RequestLimits | None = None,
) -> list:
    """Results in the prompts' order: text (generate), log-likelihood (score), or MapFailure."""
    if task not in ("generate", "score"):
        raise ValueError(f"task must be 'generate' or 'score', not {task!r}")
    if limits is None:
        limits = request_limits(task, batch_size, max_new_tokens)
    results: list = [None] * len(prompts)
    ready: list[tuple[int, list[int]]] = []
    for i, prompt in enumerate(prompts):
        try:
            ready.append(
                (i, _prepare(model, prompt, max_new_tokens if task == "generate" else 0, i, limits.max_prompt_tokens))
            )
        except (ValueError, NeuroDaskError) as exc:
            results[i] = MapFailure(prompt, str(exc))
    stats = model.last_map_stats = []
    bar = _progress(len(prompts), progress)
    bar.update(len(prompts) - len(ready))
    for start in range(0, len(ready), batch_size):
        chunk = ready[start : start + batch_size]
        began = time.perf_counter()
        try:
            out = _run_batch(model, task, [ids for _, ids in chunk], max_new_tokens, options)
            for (i, _), r in zip(chunk, out, strict=True):
                results[i] = r
        except Exception:  # isolate the prompt(s) that broke the batch: one at a time
            for i, ids in chunk:
                try:
                    results[i] = _run_batch(model, task, [ids], max_new_tokens, options)[0]
                except Exception as exc:
                    results[i] = MapFailure(prompts[i], f"{type(exc).__name__}: {exc}")
        stats.append({"batch": len(stats), "prompts": len(chunk), "seconds": time.perf_counter() - began})
        bar.update(len(chunk))
    bar.close()
    return results


def _progress(total: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, disable=not enabled, desc="neuro_dask map", unit="prompt")


def _partition_scheduler() -> str | None:
    """Where the input's partitions are computed: with Dask's default (your cluster, if one is
    active) normally; in this process when hardened mode is on, because a hardened network's
    volunteers run neuro_dask's expert tasks only, never a data pipeline (docs/security.md)."""
    from neuro_dask.security.mode import hardened

    return "threads" if hardened() else None


def map_collection(
    model,
    collection,
    task: str = "generate",
    batch_size: int = 32,
    max_new_tokens: int = 32,
    progress: bool = True,
    **options,
):
    if task not in ("generate", "score"):
        raise ValueError(f"task must be 'generate' or 'score', not {task!r}")
    limits = request_limits(task, batch_size, max_new_tokens)  # before any partition is computed

    def run(prompts):
        return run_prompts(model, prompts, task, batch_size, max_new_tokens, progress, options, limits)

    if isinstance(collection, (list, tuple)):
        return run(list(collection))
    kind = type(collection).__module__.split(".")[0] + "." + type(collection).__name__
    if kind == "pandas.Series":
        import pandas as pd

        return pd.Series(run(collection.tolist()), index=collection.index, name=collection.name, dtype=object)
    if kind.startswith("dask") and type(collection).__name__ == "Bag":
        import dask.bag as db

        parts = [list(p.compute(scheduler=_partition_scheduler())) for p in collection.to_delayed()]
        flat = run([x for p in parts for x in p])
        out, i = [], 0
        for p in parts:
            out.append(flat[i : i + len(p)])
            i += len(p)
        return db.from_delayed([_delayed(chunk) for chunk in out])
    if kind.startswith("dask") and type(collection).__name__ == "Series":
        import dask.dataframe as dd
        import pandas as pd

        parts = [p.compute(scheduler=_partition_scheduler()) for p in collection.to_delayed()]
        flat = run([x for p in parts for x in p.tolist()])
        out, i = [], 0
        for p in parts:
            out.append(pd.Series(flat[i : i + len(p)], index=p.index, name=p.name, dtype=object))
            i += len(p)
        import dask

        # Results are objects (str, float or MapFailure): Dask must not turn them into pyarrow strings.
        with dask.config.set({"dataframe.convert-string": False}):
            return dd.from_delayed(
                [_delayed(s) for s in out],
                meta=pd.Series([], name=collection.name, dtype=object),
                divisions=collection.divisions if collection.known_divisions else None,
            )
    raise MapInputError(kind)


def _delayed(value):
    import dask

    return dask.delayed(value, pure=False, traverse=False)
