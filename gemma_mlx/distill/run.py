"""Steps 4-5 and the run: acceptance with the real runtime, training epochs, checkpoints, the Hugging Face output."""

from __future__ import annotations

import json
import math
import shutil
import time
from dataclasses import asdict
from pathlib import Path
from typing import Optional

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten, tree_unflatten

from .. import corpus as corpus_text
from ..models.gemma4_assistant import Drafter, DrafterConfig
from .data import Batch, collect_data, held_out_prompts
from .drafter_init import default_centroids, drafter_config, existing_drafter, new_drafter
from .loss import Head, loss_fn
from .options import (DistillError, Options, Prepared, Reporter, _save_arrays, _write_json, check_options,
                      read_prompts, resolve_options, work_dir)


def acceptance(engine, drafter: Drafter, prompt_ids: list[list[int]], k: int, max_tokens: int) -> dict:
    """Greedy speculative rounds (batch mode, K fixed) over held-out prompts: acceptance per draft position
    (P(draft j accepted | drafts before it accepted)), the share of rounds reaching j accepted drafts, tokens per
    round; and whether the output equals plain greedy decoding (it must)."""
    from ..decode import Decoder
    from ..draft_length import DraftLength

    t0 = time.perf_counter()
    decoder = Decoder(engine.target, drafter, draft=DraftLength(fixed=k), eos_ids=engine.eos_ids)
    spec = [decoder.add(p, max_tokens) for p in prompt_ids]
    while decoder.rows:
        decoder.step()
    seconds = time.perf_counter() - t0
    tried = np.sum([r.stats.attempted_by_position[:k] for r in spec], axis=0)
    hit = np.sum([r.stats.accepted_by_position[:k] for r in spec], axis=0)
    rounds = sum(r.stats.rounds for r in spec)
    emitted = sum(r.stats.accepted_tokens + r.stats.rounds for r in spec)
    return dict(draft_tokens=k, prompts=len(prompt_ids), rounds=rounds,
                acceptance_by_position=[round(float(a / n), 4) if n else None for a, n in zip(hit, tried)],
                reached_by_position=[round(float(a / rounds), 4) if rounds else None for a in hit],
                tokens_per_round=round(emitted / rounds, 4) if rounds else None, seconds=round(seconds, 2),
                tokens=[r.tokens for r in spec])


def save_checkpoint(work: Path, drafter: Drafter, optimizer, state: dict):
    _save_arrays(work / "drafter.safetensors", dict(tree_flatten(drafter.parameters())))
    if optimizer is not None and optimizer.state:
        _save_arrays(work / "optimizer.safetensors", dict(tree_flatten(optimizer.state)))
    _write_json(work / "state.json", state)


def load_drafter_weights(drafter: Drafter, path: Path):
    drafter.load_weights(list(mx.load(str(path)).items()), strict=True)
    drafter.masked_embedding.token_ordering = drafter.masked_embedding.token_ordering.astype(mx.int32)
    mx.eval(drafter.parameters())


def save_hf(drafter: Drafter, raw: dict, out: Path, result: dict, force: bool, report: Reporter = Reporter()):
    """The drafter in Hugging Face layout (Google's names; token_ordering int64 as HF stores it), with
    acceptance.json and acceptance.png (the training history), written into a temp dir renamed at the end. No
    tokenizer: a drafter uses its target's."""
    from ..convert.writer import atomic_dir

    weights = {k: v.astype(mx.int64) if k.endswith("token_ordering") else v
               for k, v in tree_flatten(drafter.parameters())}
    text = raw["text_config"]
    gen = dict(num_assistant_tokens=result["draft_tokens"], num_assistant_tokens_schedule="constant",
               bos_token_id=text["bos_token_id"], eos_token_id=text["eos_token_id"],
               pad_token_id=text["pad_token_id"])
    with atomic_dir(out, force) as tmp:
        mx.save_safetensors(str(tmp / "model.safetensors"), weights, metadata={"format": "pt"})
        _write_json(tmp / "generation_config.json", gen)
        _write_json(tmp / "acceptance.json", result)
        if not plot_history(result["history"], tmp / "acceptance.png"):
            report.note('matplotlib is not installed: no acceptance.png (pip install "gemma-mlx[distill]")')
        _write_json(tmp / "config.json", raw)


def prepare(opts: Options) -> Prepared:
    """Everything that can reject the request, before any work: DistillError / LoadError with one line."""
    import gemma_mlx

    started = time.perf_counter()
    check_options(opts)
    out = Path(opts.out).expanduser()
    if out.exists() and not (opts.force or opts.resume):
        raise DistillError(f"{out} already exists (use --force to replace it)")
    train_prompts, eval_prompts = read_prompts(opts)
    opts = resolve_options(opts, work_dir(out))
    engine = gemma_mlx.load(opts.target, dtype="fp32", progress=False)
    if opts.init:
        start, raw = existing_drafter(opts.init, engine.target)
    else:
        start, vocab = None, engine.target.config.vocab_size
        num_centroids = opts.num_centroids or default_centroids(vocab)
        if vocab % num_centroids:
            raise DistillError(f"--num-centroids {num_centroids} does not divide the vocabulary size {vocab}")
        raw = drafter_config(engine.target.config, opts, num_centroids)
    opts.layers, opts.hidden_size = raw["text_config"]["num_hidden_layers"], raw["text_config"]["hidden_size"]
    try:
        documents = corpus_text.documents(opts.corpus) if opts.corpus else []
    except corpus_text.CorpusError as e:
        raise DistillError(str(e)) from None
    return Prepared(opts, out, engine, raw, train_prompts, eval_prompts, documents, started, start)


def distill(opts: Options, report: Reporter = Reporter()) -> dict:
    """Run (or resume) a distillation; returns the acceptance report also written to `<out>/acceptance.json`."""
    return train(prepare(opts), report)


def train(run: Prepared, report: Reporter = Reporter()) -> dict:
    """The phases of the module docstring, checkpointed into `<out>.work`."""
    work = work_dir(run.out)
    deadline = run.started + 60 * run.opts.time_budget if run.opts.time_budget else None
    drafter, state = init_or_resume(run, work, report)
    eval_ids = held_out_prompts(run.engine, run.eval_prompts)
    if state["baseline"] is None:  # the untrained drafter's acceptance, and how long a measurement takes
        report.phase("acceptance before training (held-out prompts)")
        state["baseline"] = acceptance(run.engine, drafter, eval_ids, run.opts.draft_steps, run.opts.eval_tokens)
        _write_json(work / "state.json", state)
    shards = collect_data(run, work, state, deadline, report)
    reserve = 1.5 * state["baseline"]["seconds"] + 2  # for the final acceptance run, and saving
    fit(run, drafter, shards, work, state, None if deadline is None else deadline - reserve, report, eval_ids)

    report.phase("acceptance after training (held-out prompts)")
    after = acceptance(run.engine, drafter, eval_ids, run.opts.draft_steps, run.opts.eval_tokens)
    before = state["baseline"]
    result = dict(target=str(run.opts.target), corpus=run.opts.corpus, draft_tokens=run.opts.draft_steps,
                  steps=state["step"],
                  training_seconds=round(state["train_seconds"], 1),
                  training_tokens=state["data_positions"], data=data_summary(state),
                  held_out_prompts=len(eval_ids), new_tokens_per_prompt=run.opts.eval_tokens,
                  same_output_before_after=after["tokens"] == before["tokens"],
                  before={x: y for x, y in before.items() if x != "tokens"},
                  after={x: y for x, y in after.items() if x != "tokens"},
                  history=final_history(state, after, len(shards)))
    save_hf(drafter, run.raw, run.out, result, force=True, report=report)
    return result


def data_summary(state: dict) -> dict:
    """Positions and seconds of each data phase (generation includes its teacher-forcing pass)."""
    out = {}
    for name in ("gen", "corpus"):
        n, t = state.get(f"{name}_positions", 0), state.get(f"{name}_seconds", 0.0)
        out[name] = dict(positions=n, seconds=round(t, 1), tokens_per_second=round(n / t, 1) if t else None)
    return out


def init_or_resume(run: Prepared, work: Path, report: Reporter) -> tuple[Drafter, dict]:
    """A new drafter and a fresh work dir, or the checkpoint's drafter and state."""
    if run.opts.resume:
        drafter = Drafter(DrafterConfig.from_dict(run.raw))
        load_drafter_weights(drafter, work / "drafter.safetensors")
        return drafter, json.loads((work / "state.json").read_text())
    if work.exists():
        shutil.rmtree(work)
    (work / "data").mkdir(parents=True)
    mx.random.seed(run.opts.seed)
    drafter = run.start if run.start is not None else new_drafter(run.engine.target, run.raw, run.opts.seed, report)
    state = dict(step=0, data_batches=0, data_positions=0, gen_batches=0, data_done=False, train_seconds=0.0,
                 baseline=None)
    _write_json(work / "options.json", {**asdict(run.opts), "num_centroids": run.raw["num_centroids"]})
    save_checkpoint(work, drafter, None, state)
    return drafter, state


def fit(run: Prepared, drafter: Drafter, shards: list[Path], work: Path, state: dict, deadline, report: Reporter,
        eval_ids: list[list[int]]):
    """AdamW over the shards, epoch by epoch (each a seeded permutation), until --steps or the deadline; held-out
    acceptance after every epoch (`state["history"]`); checkpoints every `checkpoint_every` seconds, after every
    epoch and at the end."""
    opts, target, k = run.opts, run.engine.target, run.opts.draft_steps
    drafter.freeze(keys=["token_ordering"], recurse=True)
    head = Head.of(drafter)
    optimizer = optim.AdamW(learning_rate=opts.learning_rate, weight_decay=0.0)
    if opts.resume and (work / "optimizer.safetensors").is_file():
        optimizer.init(drafter.trainable_parameters())
        optimizer.state = tree_unflatten(list(mx.load(str(work / "optimizer.safetensors")).items()))
    step_fn = nn.value_and_grad(drafter, lambda batch: loss_fn(drafter, target, head, batch, k))
    for key, value in (("epoch", 0), ("epoch_index", 0), ("positions_seen", 0), ("history", [])):
        state.setdefault(key, value)
    if not state["history"]:
        state["history"].append(dict(epoch=0, positions=0, **_brief(state["baseline"])))
    report.phase("training", total=opts.steps)
    report.note(f"training on {len(shards)} shards ({state['data_positions']} positions) an epoch")
    report.advance(state["step"])
    start = last_save = time.perf_counter()
    before, loss_avg, acc_avg = state["train_seconds"], None, None
    while opts.steps is None or state["step"] < opts.steps:
        now = time.perf_counter()
        if deadline is not None and now > deadline:
            report.note(f"time budget reached after {state['step']} steps")
            break
        optimizer.learning_rate = opts.learning_rate * schedule(state["step"], opts.steps, now, start, deadline)
        order = np.random.default_rng(opts.seed + state["epoch"]).permutation(len(shards))
        (loss, (correct, counts)), grads = step_fn(Batch.load(shards[order[state["epoch_index"]]]))
        optimizer.update(drafter, optim.clip_grad_norm(grads, 1.0)[0])
        mx.eval(drafter.parameters(), optimizer.state, loss, correct)
        state["step"] += 1
        state["epoch_index"] += 1
        state["positions_seen"] += int(np.array(counts)[0])
        state["train_seconds"] = before + time.perf_counter() - start
        rate = np.array(correct) / np.maximum(np.array(counts), 1)  # per draft step, as the runtime would judge
        loss_avg = float(loss) if loss_avg is None else 0.95 * loss_avg + 0.05 * float(loss)
        acc_avg = rate if acc_avg is None else 0.95 * acc_avg + 0.05 * rate
        report.advance(1, loss=loss_avg, accuracy=" ".join(f"{a:.2f}" for a in acc_avg))
        if state["epoch_index"] >= len(shards):
            measure = deadline is None or deadline - time.perf_counter() > state["baseline"]["seconds"]
            end_epoch(run, drafter, work, state, eval_ids if measure else None, report)
            save_checkpoint(work, drafter, optimizer, state)
            last_save = time.perf_counter()
        elif time.perf_counter() - last_save > opts.checkpoint_every:
            save_checkpoint(work, drafter, optimizer, state)
            report.note(f"step {state['step']}: loss {loss_avg:.3f}, accuracy by draft step "
                        f"{' '.join(f'{a:.2f}' for a in acc_avg)} (checkpoint saved)")
            last_save = time.perf_counter()
    save_checkpoint(work, drafter, optimizer, state)


def end_epoch(run: Prepared, drafter: Drafter, work: Path, state: dict, eval_ids: list, report: Reporter):
    """Held-out acceptance after an epoch, kept in the history (what the plot draws); eval_ids None: no time left
    to measure before the deadline (the final measurement comes anyway)."""
    state["epoch"] += 1
    state["epoch_index"] = 0
    if eval_ids is None:
        return
    measured = acceptance(run.engine, drafter, eval_ids, run.opts.draft_steps, run.opts.eval_tokens)
    state["history"].append(dict(epoch=state["epoch"], positions=state["positions_seen"], **_brief(measured)))
    report.note(f"epoch {state['epoch']} ({state['positions_seen']} positions trained): held-out acceptance by "
                f"position {_fmt(measured['acceptance_by_position'])}, {measured['tokens_per_round']} tokens/round")


def final_history(state: dict, after: dict, shards: int) -> list:
    """The epochs' measurements plus the final one (unless the run ended on an epoch, just measured)."""
    history = list(state["history"])
    if history[-1]["positions"] != state["positions_seen"]:
        history.append(dict(epoch=round(state["epoch"] + state["epoch_index"] / shards, 3),
                            positions=state["positions_seen"], **_brief(after)))
    return history


def _brief(measured: dict) -> dict:
    return dict(acceptance_by_position=measured["acceptance_by_position"],
                tokens_per_round=measured["tokens_per_round"])


def _fmt(values: list) -> str:
    return " ".join("-" if v is None else f"{v:.2f}" for v in values)


def plot_history(history: list, path: Path) -> bool:
    """acceptance.png: held-out acceptance per draft position (and tokens per round) against training positions.
    False when matplotlib is not installed (pip install "gemma-mlx[distill]")."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    x = [h["positions"] for h in history]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for j in range(len(history[-1]["acceptance_by_position"])):
        left.plot(x, [h["acceptance_by_position"][j] for h in history], marker="o", label=f"position {j + 1}")
    left.set(xlabel="training positions", ylabel="held-out acceptance", ylim=(0, 1),
             title="acceptance per draft position")
    left.legend()
    right.plot(x, [h["tokens_per_round"] for h in history], marker="o", color="black")
    right.set(xlabel="training positions", ylabel="tokens per round", title="tokens per round (K fixed)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def schedule(step: int, total: Optional[int], now: float, start: float, deadline: Optional[float]) -> float:
    """Learning-rate factor: linear warmup over 50 steps, then cosine to 0.1 over the run (its steps or its time,
    whichever ends first)."""
    warm = min(1.0, (step + 1) / 50)
    progress = 0.0
    if total:
        progress = step / total
    if deadline is not None:
        progress = max(progress, (now - start) / max(deadline - start, 1e-9))
    return warm * (0.1 + 0.45 * (1 + math.cos(math.pi * min(progress, 1.0))))
