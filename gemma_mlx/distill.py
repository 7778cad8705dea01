"""Distillation: train a `gemma4_assistant` MTP drafter for a target that has none (`gemma-mlx distill`).

The result is a Hugging Face checkpoint (config.json with a `text_config`, model.safetensors with the names Google's
drafters have, generation_config.json with `num_assistant_tokens`), so it goes through `gemma-mlx convert` and
`gemma_mlx.load` exactly like Google's drafters, and transformers' Gemma4AssistantForCausalLM reads it.

What happens, top to bottom (each phase is resumable from the work dir `<out>.work`):
1. **Drafter init.** The tied table E_a [V, d] (the drafter's LM head) is the target's embedding projected to d on
   its top-d principal directions (uncentred, so E_a·E_aᵀ is the best rank-d approximation of the target's own
   E·Eᵀ: tokens the target tells apart stay apart), rescaled to unit mean row norm. Its rows are clustered by a
   balanced k-means (Lloyd iterations whose assignment step fills C clusters of exactly V/C tokens, greedily, most
   confident tokens first) into `token_ordering`, and the centroid head starts at the cluster means, so the
   untrained centroid head already picks the clusters whose tokens score highest. Layers start from MLX's defaults.
2. **Data.** Sequences the target runs teacher-forced over once, recording at every position what the drafter needs:
   the final-norm hidden, the K/V of its producer layers (what the drafter reads at run time) and its argmax next
   token (the label). Two sources: the target's own continuations of varied prompts (the prompts raw and
   chat-wrapped, plus openings of corpus windows), mostly greedy, some sampled (what it sees at inference; generated
   in batch mode, no drafter), and windows of real documents
   (`--corpus`, `corpus.py`: one prefill per batch of windows, far cheaper per position than decoding). Each batch is
   a shard on disk (hidden and K/V in float16), read back one at a time while training.
3. **Training, the way the drafter runs**. For every start position p of a sequence at once, K chained
   steps: the query sits at position p (= L−1) for all K steps, full layers see target K/V at positions ≤ p−1,
   sliding layers the W+1 newest of those; step 1's input is [E_target[t_p]·√H, target hidden at p−1], step j+1's
   is the drafter's own post_projection output and the token the target emitted at p+j (what an accepted draft
   is). Step j is scored against the target's argmax at position p+j−1. One attention per layer over the
   sequence's K/V with a per-query mask serves all start positions; the layers are the runtime Drafter's own
   modules (`drafter_steps`), so training and drafting compute the same function.
4. **Head loss.** A full-vocabulary softmax through the tied table costs V·d per query step (8x the whole drafter
   body for V = 262144, d = 128), which CPU training cannot afford, and per-query gathers of a cluster's rows are
   as slow. So the token loss is a sampled softmax: the label's logit against one shared set of hard negatives per
   batch: every token of the clusters the batch's queries rank highest (and of the labels' clusters), plus every
   label of the batch (for V ≤ the candidate budget that is the full softmax, exactly). Those are the tokens the
   runtime compares the label with: its argmax runs over the top-k_c clusters. The centroid head gets its own
   cross-entropy over the C clusters, so the label's cluster ranks first (it must be in the top k_c).
5. **Acceptance.** Speculative rounds of the real runtime (batch mode, greedy, K fixed) with the untrained and the
   trained drafter on held-out prompts: acceptance per draft position, written to `acceptance.json` in the output.

MLX only (mlx.nn, mlx.optimizers). Nothing here prints: progress goes to a `Reporter` (the CLI draws bars).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten, tree_unflatten

from . import corpus as corpus_text
from .cache import KV, attention_mask
from .models.base import FULL, SLIDING
from .models.gemma4_assistant import Drafter, DrafterConfig, PairError

# Prompts the target continues to make training data (varied registers; none on the demo's or the held-out prompts'
# topics), and held-out ones for acceptance.
_PROMPTS = json.loads((Path(__file__).parent / "distill_prompts.json").read_text())
TRAIN_PROMPTS, EVAL_PROMPTS = _PROMPTS["train"], _PROMPTS["held_out"]
WORK_SUFFIX = ".work"
DATA_SHARE = 0.45  # of a time budget, at most, for the data (generation + corpus)
GENERATION_SHARE = 0.35  # of a time budget, at most, for generating the target's own text when there is a corpus
WINDOW = 256  # tokens per corpus window
GENERATION_BATCH = 64  # sequences the target continues together
PREFIX = 32  # tokens of a corpus window the target continues as a generation prompt


class DistillError(ValueError):
    """A distillation that cannot run as asked; the message is one line for the user."""


@dataclass
class Options:
    """What `gemma-mlx distill` takes. None = choose from the target (or, on --resume, keep the checkpoint's)."""

    target: str
    out: str
    layers: Optional[int] = None  # default 4: [sliding, sliding, sliding, full] as the real drafters
    hidden_size: Optional[int] = None  # d, default 256
    num_centroids: Optional[int] = None  # C, default V/128 (2048 for Gemma's 262144)
    draft_steps: Optional[int] = None  # K chained in the loss (and the acceptance figure), default 4
    steps: Optional[int] = None  # default 2000 when there is no time budget
    time_budget: Optional[float] = None  # wall-clock minutes for this run (data + training + acceptance)
    prompts: Optional[str] = None  # a file, one prompt per line
    corpus: Optional[list] = None  # text files or directories (corpus.py)
    corpus_tokens: Optional[int] = None  # teacher-forced corpus positions, default 300000 with a corpus
    data_share: float = DATA_SHARE
    samples: Optional[int] = None  # generated sequences, default 256
    max_new_tokens: Optional[int] = None  # per generated sequence, default 128
    seed: Optional[int] = None
    batch_size: int = 8  # sequences per training step
    learning_rate: float = 1e-3
    eval_tokens: int = 48  # new tokens per held-out prompt for the acceptance figure
    checkpoint_every: float = 120.0  # seconds between checkpoints
    resume: bool = False
    force: bool = False

    ARCH = ("layers", "hidden_size", "num_centroids", "draft_steps", "max_new_tokens", "seed")
    DEFAULTS = dict(layers=4, hidden_size=256, draft_steps=4, samples=256, max_new_tokens=128, seed=0,
                    corpus_tokens=300_000)


class Reporter:
    """Progress sink (no-op); the CLI subclasses it to draw bars."""

    def phase(self, name: str, total: Optional[float] = None):
        pass

    def advance(self, n: float = 1, **info):
        pass

    def note(self, message: str):
        pass


# --- drafter architecture and init --------------------------------------------------------------------------


def drafter_config(tcfg, opts: Options, num_centroids: int) -> dict:
    """The HF config.json of a drafter for a target config (Gemma 4 TextConfig or Gemma3Config): its layers read
    the target's KV geometry and RoPE, its sliding window is the target's."""
    n, d = opts.layers, opts.hidden_size
    kinds = set(tcfg.layer_types[: tcfg.first_shared_layer])
    types = [SLIDING] * (n - 1) + [FULL] if kinds == {SLIDING, FULL} else [FULL] * n
    kv = {tcfg.layer_kv_heads(tcfg.producer_for(t)) for t in set(types)}
    heads = math.lcm(*kv) * max(1, math.ceil(4 / math.lcm(*kv)))
    text = dict(
        model_type="gemma4_text", vocab_size=tcfg.vocab_size, hidden_size=d, intermediate_size=4 * d,
        num_hidden_layers=n, num_attention_heads=heads, num_key_value_heads=tcfg.num_key_value_heads,
        head_dim=tcfg.head_dim, global_head_dim=tcfg.global_head_dim,
        num_global_key_value_heads=getattr(tcfg, "num_global_key_value_heads", None),
        attention_k_eq_v=bool(tcfg.attention_k_eq_v), layer_types=types, sliding_window=tcfg.sliding_window,
        rope_parameters=_rope_for_drafter(tcfg), rms_norm_eps=1e-6, hidden_activation="gelu_pytorch_tanh",
        max_position_embeddings=tcfg.max_position_embeddings, tie_word_embeddings=True,
        hidden_size_per_layer_input=0, vocab_size_per_layer_input=0, num_kv_shared_layers=n,
        enable_moe_block=False, use_double_wide_mlp=False, final_logit_softcapping=None, attention_bias=False,
        bos_token_id=tcfg.bos_token_id, eos_token_id=tcfg.eos_token_id, pad_token_id=tcfg.pad_token_id)
    return dict(model_type="gemma4_assistant", architectures=["Gemma4AssistantForCausalLM"],
                backbone_hidden_size=tcfg.hidden_size, use_ordered_embeddings=True, num_centroids=num_centroids,
                centroid_intermediate_top_k=max(1, min(32, num_centroids // 4)), tie_word_embeddings=True,
                dtype="float32", text_config=text)


def _rope_for_drafter(tcfg) -> dict:
    """The drafter's queries must rotate like the target's keys. Gemma 4 targets: their own parameters. Gemma 3:
    `default` as is; `linear` scaling (periods × factor) is Gemma 4's `proportional` with no unrotated pairs."""
    if tcfg.model_type != "gemma3_text":
        return {t: dict(p) for t, p in tcfg.rope_parameters.items()}
    out = {}
    for t, p in tcfg.rope_parameters.items():
        if p["rope_type"] == "linear":
            out[t] = {"rope_type": "proportional", "partial_rotary_factor": 1.0, "factor": p.get("factor", 1.0),
                      "rope_theta": p["rope_theta"]}
        else:
            out[t] = {"rope_type": "default", "rope_theta": p["rope_theta"]}
    return out


def default_centroids(vocab: int) -> int:
    if vocab % 128 or vocab // 128 < 2:
        raise DistillError(f"vocabulary of {vocab} is not a multiple of 128: pass --num-centroids C (C divides it)")
    return vocab // 128


def new_drafter(target, raw: dict, seed: int, report: Reporter) -> Drafter:
    """A drafter for `target` with the table projected from the target's embedding and a balanced centroid head."""
    drafter = Drafter(DrafterConfig.from_dict(raw))
    try:
        drafter.bind(target)
    except PairError as e:
        raise DistillError(f"cannot build a drafter for this target: {e}") from None
    cfg = drafter.config
    report.phase("projecting the target's embedding")
    table = project_embeddings(target, cfg.text.hidden_size, seed)
    report.phase(f"clustering {cfg.text.vocab_size} tokens into {cfg.num_centroids} groups", total=None)
    assign, centers = balanced_kmeans(table, cfg.num_centroids, iters=6, seed=seed, report=report)
    drafter.model.embed_tokens.weight = mx.array(table)
    drafter.masked_embedding.centroids.weight = mx.array(centers)
    drafter.masked_embedding.token_ordering = mx.array(np.argsort(assign, kind="stable").astype(np.int32))
    mx.eval(drafter.parameters())
    return drafter


def project_embeddings(target, d: int, seed: int) -> np.ndarray:
    """E_target [V, H] on its top-d principal directions (uncentred SVD), rows rescaled to mean norm 1. Read
    through the embedding module, so a quantized target works too."""
    V = target.config.vocab_size
    emb = target.model.embed_tokens
    gram, rows = 0.0, 16384
    for s in range(0, V, rows):
        e = np.array(emb(mx.arange(s, min(V, s + rows))).astype(mx.float32), dtype=np.float64)
        gram = gram + e.T @ e
    vals, vecs = np.linalg.eigh(gram)
    P = vecs[:, ::-1][:, :d]
    if P.shape[1] < d:  # d > H: the extra columns get small random directions
        extra = np.random.default_rng(seed).normal(size=(P.shape[0], d - P.shape[1])) * 1e-2
        P = np.concatenate([P, extra], axis=1)
    out = np.empty((V, d), dtype=np.float32)
    for s in range(0, V, rows):
        out[s : s + rows] = np.array(emb(mx.arange(s, min(V, s + rows))).astype(mx.float32)) @ P
    return out / np.linalg.norm(out, axis=1).mean()


def balanced_kmeans(x: np.ndarray, C: int, iters: int, seed: int, report: Reporter = Reporter()):
    """Lloyd's k-means with equal cluster sizes: (assignment [V] in 0…C−1, each used exactly V/C times; centres)."""
    V = len(x)
    if V % C:
        raise DistillError(f"--num-centroids {C} does not divide the vocabulary size {V}")
    centers = x[np.random.default_rng(seed).choice(V, C, replace=False)]
    for _ in range(iters):
        assign = _balanced_assign(x, centers, V // C)
        centers = np.zeros_like(centers)
        np.add.at(centers, assign, x)
        centers /= V // C
        report.advance(1)
    return assign, centers.astype(np.float32)


def _balanced_assign(x: np.ndarray, centers: np.ndarray, cap: int, m: int = 8) -> np.ndarray:
    """Each point to its nearest centre that still has room, points taken nearest-first; the few points whose m
    nearest centres all filled up are placed among the centres with room left, the same way."""
    assign = np.full(len(x), -1, dtype=np.int64)
    count = np.zeros(len(centers), dtype=np.int64)
    todo = np.arange(len(x))
    while len(todo):
        open_ = np.nonzero(count < cap)[0]
        near, dist = _nearest(x[todo], centers[open_], min(m, len(open_)))
        near = open_[near].tolist()
        for i in np.argsort(dist[:, 0], kind="stable").tolist():
            for c in near[i]:
                if count[c] < cap:
                    assign[todo[i]] = c
                    count[c] += 1
                    break
        todo = todo[assign[todo] < 0]
    return assign


def _nearest(x: np.ndarray, centers: np.ndarray, m: int, rows: int = 8192):
    """The m nearest centres of each point, nearest first: (indices [n, m], squared distances up to ‖x‖²)."""
    c = mx.array(centers)
    c2 = (c * c).sum(-1)
    idx, dist = [], []
    for s in range(0, len(x), rows):
        d = c2[None, :] - 2 * (mx.array(x[s : s + rows]) @ c.T)
        top = mx.argpartition(d, kth=m - 1, axis=-1)[:, :m] if m < d.shape[1] else mx.broadcast_to(
            mx.arange(d.shape[1]), d.shape)
        td = mx.take_along_axis(d, top, axis=-1)
        order = mx.argsort(td, axis=-1)
        idx.append(np.array(mx.take_along_axis(top, order, axis=-1)))
        dist.append(np.array(mx.take_along_axis(td, order, axis=-1)))
    return np.concatenate(idx), np.concatenate(dist)


# --- data: the target's own text, teacher-forced -------------------------------------------------------------


@dataclass
class Batch:
    """Teacher-forced target passes over B sequences padded to N (padding is never attended: masks are causal)."""

    tokens: mx.array  # [B, N] int32
    lengths: mx.array  # [B] int32
    labels: mx.array  # [B, N] int32, the target's argmax at each position (its next token)
    hidden: mx.array  # [B, N, H] final-norm hiddens
    kv: dict  # layer type -> (K, V), each [B, kv_heads, N, head_dim]: the producer layers' cache

    def arrays(self) -> dict:
        """What a shard holds: hidden and K/V in float16 (half the disk; training computes in float32)."""
        out = dict(tokens=self.tokens, lengths=self.lengths, labels=self.labels, hidden=self.hidden)
        for t, (k, v) in self.kv.items():
            out[f"k.{t}"], out[f"v.{t}"] = k, v
        return {n: a.astype(mx.float16) if mx.issubdtype(a.dtype, mx.floating) else a for n, a in out.items()}

    @classmethod
    def from_arrays(cls, a: dict) -> "Batch":
        a = {n: x.astype(mx.float32) if mx.issubdtype(x.dtype, mx.floating) else x for n, x in a.items()}
        kv = {name[2:]: (a[name], a["v." + name[2:]]) for name in a if name.startswith("k.")}
        return cls(a["tokens"], a["lengths"], a["labels"], a["hidden"], kv)

    @classmethod
    def load(cls, path: Path) -> "Batch":
        return cls.from_arrays(mx.load(str(path)))

    @property
    def positions(self) -> int:
        return int(self.lengths.sum())


def teacher_force(target, seqs: list[list[int]]) -> Batch:
    """One target forward over the sequences (padded with 0 at the end)."""
    N = max(map(len, seqs))
    tokens = mx.array([s + [0] * (N - len(s)) for s in seqs], dtype=mx.int32)
    cache = target.make_cache(len(seqs), chunk=N)  # rings of W + N slots: positions 0…N−1 sit in slots 0…N−1
    hidden = target.model(tokens, cache)
    labels = mx.concatenate([mx.argmax(target.logits(hidden[b : b + 1]), axis=-1) for b in range(len(seqs))])
    kv = {}
    for t in sorted(set(target.config.layer_types)):
        k, v = cache.producer(t).view()
        kv[t] = (k[..., :N, :], v[..., :N, :])
    batch = Batch(tokens, mx.array([len(s) for s in seqs], dtype=mx.int32), labels.astype(mx.int32), hidden, kv)
    mx.eval(batch.arrays())
    return batch


def encode_prompts(engine, prompts: list[str], chat: bool = True) -> list[list[int]]:
    """Chat-wrapped when asked and the tokenizer has a chat template, raw otherwise."""
    chat = chat and getattr(engine.tokenizer, "chat_template", None)
    return [engine.encode([{"role": "user", "content": p}] if chat else p) for p in prompts]


def corpus_prompts(run: "Prepared") -> list[list[int]]:
    """Openings of corpus windows (their first PREFIX tokens) for the target to continue: as many varied prompts as
    generated sequences, in the corpus's registers (none without a corpus)."""
    if not run.documents:
        return []
    wins = corpus_text.windows(run.engine.encode, run.documents, WINDOW, run.opts.seed + 1)
    return [w[:PREFIX] for w in wins[: run.opts.samples]]


def training_prompts(engine, prompts: list[str]) -> list[list[int]]:
    """Every prompt raw (text to continue) and, when the tokenizer has a chat template, chat-wrapped too: the drafter
    serves both `generate --raw` and chat turns."""
    raw = encode_prompts(engine, prompts, chat=False)
    chat = encode_prompts(engine, prompts) if getattr(engine.tokenizer, "chat_template", None) else []
    return raw + chat


def held_out_prompts(engine, prompts: list[str]) -> list[list[int]]:
    """The held-out prompts, every other one chat-wrapped (when there is a chat template): both uses measured, at
    the cost of one run per prompt."""
    raw, chat = encode_prompts(engine, prompts, chat=False), encode_prompts(engine, prompts)
    return [chat[i] if i % 2 else raw[i] for i in range(len(prompts))]


TEMPERATURES = (0.0, 0.0, 0.0, 0.8)  # generation batch b at TEMPERATURES[b % 4]: mostly greedy, as decoding is by default


def generation_picks(n_prompts: int, b: int, size: int, seed: int) -> tuple[list[int], float]:
    """(prompt indices, temperature) of generation batch b. The batches of one temperature walk the shuffled prompts
    together, so greedy batches repeat a prompt (and its identical greedy text) only after every prompt had its turn."""
    order = np.random.default_rng(seed).permutation(n_prompts)
    cycle, slot = divmod(b, len(TEMPERATURES))
    same = [i for i, t in enumerate(TEMPERATURES) if t == TEMPERATURES[slot]]
    turn = cycle * len(same) + same.index(slot)
    return [int(order[(turn * size + i) % n_prompts]) for i in range(size)], TEMPERATURES[slot]


def generate_batch_sequences(engine, prompt_ids: list[list[int]], b: int, size: int, max_new: int,
                             seed: int) -> list[list[int]]:
    """Generation batch b: `size` prompts continued by the target (`generation_picks`)."""
    from .batch import generate_batch

    idx, temp = generation_picks(len(prompt_ids), b, size, seed)
    picks = [prompt_ids[i] for i in idx]
    results = generate_batch(engine, picks, max_tokens=max_new, temperature=temp, top_p=0.95, draft_tokens=0,
                             seed=seed * 100_003 + b)
    return [p + r.tokens for p, r in zip(picks, results)]


# --- the training forward: K chained drafter steps from every position at once -------------------------------


def training_masks(drafter: Drafter, N: int) -> dict:
    """Query p (for p = 1…N−1) sees keys ≤ p−1, sliding layers the W+1 newest of them: Drafter.masks's rule
    (`attention_mask` with last position p−1 and window W+1), for every start position at once: [1, 1, N−1, N]."""
    keys = np.arange(N)[None, :]
    masks = {}
    for t in {layer.layer_type for layer in drafter.model.layers}:
        window = drafter.config.text.sliding_window + 1 if t == SLIDING else None
        masks[t] = attention_mask(np.array([0]), N - 1, keys, window)
    return masks


def drafter_steps(drafter: Drafter, target, batch: Batch, k: int) -> list[mx.array]:
    """The drafter's final-norm hidden h_n [B, N−1, d] after chained steps 1…k from every start position p = 1…N−1
    (index p−1). Step 1 reads [E_t[t_p]·√H, target hidden at p−1]; step j+1 the drafter's own projected output
    and the token at p+j. The query sits at position p for all steps (RoPE offset p), as in Drafter.draft."""
    B, N = batch.tokens.shape
    T = N - 1
    tokens = mx.concatenate([batch.tokens, mx.zeros((B, k), mx.int32)], axis=1)
    masks = training_masks(drafter, N)
    kv = {t: KV(*batch.kv[t]) for t in masks}  # the teacher-forced K/V
    offset = mx.ones((B,), dtype=mx.int32)  # row b's queries are positions 1…N−1
    g = batch.hidden[:, :T]
    out = []
    for j in range(k):
        h = drafter.pre_projection(mx.concatenate([target.model.embed(tokens[:, 1 + j : 1 + j + T]), g], axis=-1))
        for layer in drafter.model.layers:
            h = layer(h, offset, kv[layer.layer_type], masks[layer.layer_type])
        h = drafter.model.norm(h)
        g = drafter.post_projection(h)
        out.append(h)
    return out


# --- the loss ---------------------------------------------------------------------------------------------------


@dataclass
class Head:
    """Cluster bookkeeping for the loss: cluster of each token, and the tokens of each cluster."""

    cluster_of: mx.array  # [V]
    members: np.ndarray  # [C, V/C]
    top_k: int
    budget: int  # candidate tokens per batch (whole clusters); the full vocabulary when it fits

    @classmethod
    def of(cls, drafter: Drafter, budget: int = 4096) -> "Head":
        me = drafter.masked_embedding
        members = np.array(me.token_ordering).reshape(me.num_centroids, -1)
        cluster_of = np.empty(members.size, dtype=np.int32)
        cluster_of[members.reshape(-1)] = np.repeat(np.arange(len(members)), members.shape[1])
        return cls(mx.array(cluster_of), members, me.top_k, budget)

    def negatives(self, scores: mx.array, labels: mx.array) -> mx.array:
        """The batch's shared candidates: whole clusters, those most often in the queries' top k_c or holding a
        label first, up to the budget; plus every label. All tokens when the vocabulary fits the budget."""
        C, Vc = self.members.shape
        if C * Vc <= self.budget:
            return mx.arange(C * Vc)
        kc = min(self.top_k, C)
        top = np.array(mx.argpartition(-scores, kth=kc - 1, axis=-1)[:, :kc]).reshape(-1)
        votes = np.bincount(top, minlength=C) + np.bincount(np.array(self.cluster_of[labels]), minlength=C)
        chosen = np.argsort(-votes, kind="stable")[: max(1, self.budget // Vc)]
        tokens = np.union1d(self.members[chosen].reshape(-1), np.array(labels))
        return mx.array(tokens.astype(np.int32))


def head_loss(drafter: Drafter, head: Head, h: mx.array, y: mx.array):
    """Per query step (h [Q, d], label y [Q]): (token CE over {y} ∪ shared negatives + centroid CE [Q], correct
    [Q]: the label's cluster is in the top k_c and the label outscores every candidate)."""
    table = drafter.model.embed_tokens.weight
    scores = drafter.masked_embedding.centroids(h)
    cl = head.cluster_of[y]
    score_cl = mx.take_along_axis(scores, cl[:, None], axis=-1)[:, 0]
    centroid_ce = mx.logsumexp(scores, axis=-1) - score_cl
    negatives = head.negatives(mx.stop_gradient(scores), y)
    label_logit = (table[y] * h).sum(-1)
    logits = h @ table[negatives].T
    logits = mx.where(negatives[None, :] == y[:, None], -mx.inf, logits)  # the label is scored once
    token_ce = mx.logaddexp(mx.logsumexp(logits, axis=-1), label_logit) - label_logit
    in_top = (mx.stop_gradient(scores) > mx.stop_gradient(score_cl)[:, None]).sum(-1) < head.top_k
    correct = in_top & (mx.stop_gradient(label_logit) > mx.stop_gradient(logits).max(-1))
    return token_ce + centroid_ce, correct


def loss_fn(drafter: Drafter, target, head: Head, batch: Batch, k: int):
    """Mean over every (start position, step) whose label exists; also correct counts per step."""
    B, N = batch.tokens.shape
    T = N - 1
    labels = mx.concatenate([batch.labels, mx.zeros((B, k), mx.int32)], axis=1)
    total, counts, correct = 0.0, [], []
    lengths = np.array(batch.lengths)
    for j, h in enumerate(drafter_steps(drafter, target, batch, k)):
        valid = (np.arange(1, N)[None, :] + j < lengths[:, None]).reshape(-1)
        idx = mx.array(np.nonzero(valid)[0].astype(np.int32))
        loss, ok = head_loss(drafter, head, h.reshape(B * T, -1)[idx], labels[:, 1 + j : 1 + j + T].reshape(-1)[idx])
        total = total + loss.sum()
        counts.append(idx.size)
        correct.append(ok.sum())
    return total / max(sum(counts), 1), (mx.stack(correct), mx.array(counts))


# --- acceptance with the real runtime ---------------------------------------------------------------------------


def acceptance(engine, drafter: Drafter, prompt_ids: list[list[int]], k: int, max_tokens: int) -> dict:
    """Greedy speculative rounds (batch mode, K fixed) over held-out prompts: acceptance per draft position
    (P(draft j accepted | drafts before it accepted)), the share of rounds reaching j accepted drafts, tokens per
    round; and whether the output equals plain greedy decoding (it must)."""
    from .batch import generate_batch

    engine.drafter = drafter
    t0 = time.perf_counter()
    spec = generate_batch(engine, prompt_ids, max_tokens=max_tokens, draft_tokens=k)
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


# --- checkpoints and output -------------------------------------------------------------------------------------


def work_dir(out: Path) -> Path:
    return out.with_name(out.name + WORK_SUFFIX)


def _write_json(path: Path, obj):
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, path)


def _save_arrays(path: Path, arrays: dict):
    tmp = path.with_name(path.name + ".tmp.safetensors")
    mx.save_safetensors(str(tmp), arrays)
    os.replace(tmp, path)


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
    from .convert.writer import atomic_dir

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


# --- the run ----------------------------------------------------------------------------------------------------


def read_prompts(opts: Options) -> tuple[list[str], list[str]]:
    """(training prompts, held-out prompts): the built-in lists, or a file's lines with its last tenth held out."""
    if opts.prompts is None:
        return TRAIN_PROMPTS, EVAL_PROMPTS
    path = Path(opts.prompts)
    if not path.is_file():
        raise DistillError(f"{path}: no such prompts file")
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    if len(lines) < 2:
        raise DistillError(f"{path}: needs at least 2 prompts (one line each; a tenth are held out)")
    held = max(1, len(lines) // 10)
    return lines[:-held], lines[-held:]


def check_options(opts: Options):
    for name, low in (("layers", 1), ("hidden_size", 8), ("num_centroids", 2), ("steps", 1), ("samples", 0),
                      ("max_new_tokens", 1), ("corpus_tokens", 1)):
        value = getattr(opts, name)
        if value is not None and value < low:
            raise DistillError(f"--{name.replace('_', '-')} must be >= {low}, got {value}")
    if opts.draft_steps is not None and not 1 <= opts.draft_steps <= 8:
        raise DistillError(f"--draft-steps must be between 1 and 8, got {opts.draft_steps}")
    if opts.time_budget is not None and opts.time_budget <= 0:
        raise DistillError(f"--time-budget must be > 0 minutes, got {opts.time_budget}")
    if opts.hidden_size is not None and opts.hidden_size % 2:
        raise DistillError(f"--hidden-size must be even, got {opts.hidden_size}")


def resolve_options(opts: Options, work: Path) -> Options:
    """Fill in defaults, or on --resume the checkpoint's (refusing explicit values that contradict it)."""
    saved_path = work / "options.json"
    if opts.resume:
        if not saved_path.is_file():
            raise DistillError(f"--resume: no checkpoint in {work}")
        saved = json.loads(saved_path.read_text())
        for name in Options.ARCH:
            given = getattr(opts, name)
            if given is not None and given != saved[name]:
                raise DistillError(f"--resume: --{name.replace('_', '-')} {given} differs from the checkpoint's "
                                   f"{saved[name]}")
            setattr(opts, name, saved[name])
    elif saved_path.is_file() and not opts.force:
        raise DistillError(f"{work} holds a checkpoint of an earlier run: pass --resume to continue it or --force "
                           "to start over")
    for name, value in Options.DEFAULTS.items():
        if getattr(opts, name) is None:
            setattr(opts, name, value)
    if opts.steps is None and opts.time_budget is None:
        opts.steps = 2000
    return opts


@dataclass
class Prepared:
    """A checked distillation: options resolved, target loaded, drafter config chosen (nothing written yet)."""

    opts: Options
    out: Path
    engine: object
    raw: dict  # the drafter's HF config.json
    train_prompts: list
    eval_prompts: list
    documents: list  # the corpus's documents ([] without --corpus)
    started: float


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
    vocab = engine.target.config.vocab_size
    num_centroids = opts.num_centroids or default_centroids(vocab)
    if vocab % num_centroids:
        raise DistillError(f"--num-centroids {num_centroids} does not divide the vocabulary size {vocab}")
    raw = drafter_config(engine.target.config, opts, num_centroids)
    try:
        documents = corpus_text.documents(opts.corpus) if opts.corpus else []
    except corpus_text.CorpusError as e:
        raise DistillError(str(e)) from None
    return Prepared(opts, out, engine, raw, train_prompts, eval_prompts, documents, started)


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
        drafter = Drafter(DrafterConfig.from_dict(run.raw)).bind(run.engine.target)
        load_drafter_weights(drafter, work / "drafter.safetensors")
        return drafter, json.loads((work / "state.json").read_text())
    if work.exists():
        shutil.rmtree(work)
    (work / "data").mkdir(parents=True)
    mx.random.seed(run.opts.seed)
    drafter = new_drafter(run.engine.target, run.raw, run.opts.seed, report)
    state = dict(step=0, data_batches=0, data_positions=0, gen_batches=0, data_done=False, train_seconds=0.0,
                 baseline=None)
    _write_json(work / "options.json", {**asdict(run.opts), "num_centroids": run.raw["num_centroids"]})
    save_checkpoint(work, drafter, None, state)
    return drafter, state


def shard_paths(work: Path, state: dict) -> list[Path]:
    return [work / "data" / f"batch-{i:05d}.safetensors" for i in range(state["data_batches"])]


def save_shard(work: Path, state: dict, batch: Batch):
    _save_arrays(work / "data" / f"batch-{state['data_batches']:05d}.safetensors", batch.arrays())
    state["data_batches"] += 1
    state["data_positions"] = state.get("data_positions", 0) + batch.positions


def collect_data(run: Prepared, work: Path, state: dict, deadline, report: Reporter) -> list[Path]:
    """The data shards: the saved ones, then the target's continuations (`collect_generated`) and the corpus
    windows (`collect_corpus`) still missing. A --resume with a larger --samples or --corpus-tokens adds the
    difference."""
    share = run.opts.data_share
    data_deadline = None if deadline is None else run.started + share * (deadline - run.started)
    gen_deadline = data_deadline
    if deadline is not None and run.opts.corpus:
        gen_deadline = run.started + min(share, GENERATION_SHARE) * (deadline - run.started)
    collect_generated(run, work, state, gen_deadline, report)
    if run.opts.corpus:
        collect_corpus(run, work, state, data_deadline, report)
    state["data_done"] = True
    _write_json(work / "state.json", state)
    if not state["data_batches"]:
        raise DistillError("no training data could be made in the time budget: raise --time-budget")
    return shard_paths(work, state)


def collect_generated(run: Prepared, work: Path, state: dict, deadline, report: Reporter):
    """Generation batch by generation batch (each teacher-forced and saved) until --samples sequences or the
    deadline."""
    opts, engine, gen_size = run.opts, run.engine, GENERATION_BATCH
    total = -(-opts.samples // gen_size)
    if state["gen_batches"] >= total:
        return
    prompt_ids = training_prompts(engine, run.train_prompts) + corpus_prompts(run)
    report.phase("generating the target's own text (greedy and sampled), teacher-forced", total=total)
    report.advance(state["gen_batches"])
    while state["gen_batches"] < total:
        if deadline is not None and time.perf_counter() > deadline:
            report.note(f"generation stopped by the time budget after {state['gen_batches']} batches")
            break
        b, t1 = state["gen_batches"], time.perf_counter()
        seqs = generate_batch_sequences(engine, prompt_ids, b, min(gen_size, opts.samples - b * gen_size),
                                        opts.max_new_tokens, opts.seed)
        seqs.sort(key=len)  # similar lengths share a training batch: little padding
        for s in range(0, len(seqs), opts.batch_size):
            save_shard(work, state, teacher_force(engine.target, seqs[s : s + opts.batch_size]))
        state["gen_batches"] += 1
        state["gen_positions"] = state.get("gen_positions", 0) + sum(map(len, seqs))
        state["gen_seconds"] = state.get("gen_seconds", 0.0) + time.perf_counter() - t1
        _write_json(work / "state.json", state)
        report.advance(1, tokens=state["data_positions"])


def collect_corpus(run: Prepared, work: Path, state: dict, deadline, report: Reporter):
    """Corpus windows (shuffled with the seed, so a resume finds the same order), teacher-forced a batch at a time,
    until --corpus-tokens positions or the deadline."""
    opts, engine = run.opts, run.engine
    done = state.get("corpus_positions", 0)
    if done >= opts.corpus_tokens:
        return
    report.phase("reading the corpus")
    wins = corpus_text.windows(engine.encode, run.documents, WINDOW, opts.seed)
    state.setdefault("corpus_windows", 0)
    report.phase(f"teacher-forcing the corpus ({len(wins)} windows of <= {WINDOW} tokens)", total=opts.corpus_tokens)
    report.advance(done)
    t0, start = time.perf_counter(), done
    while done < opts.corpus_tokens and state["corpus_windows"] < len(wins):
        if deadline is not None and time.perf_counter() > deadline:
            report.note(f"corpus stopped by the time budget after {done} positions")
            break
        i, t1 = state["corpus_windows"], time.perf_counter()
        seqs = sorted(wins[i : i + opts.batch_size], key=len)
        batch = teacher_force(engine.target, seqs)
        save_shard(work, state, batch)
        state["corpus_windows"] += len(seqs)
        state["corpus_positions"] = done = done + batch.positions
        state["corpus_seconds"] = state.get("corpus_seconds", 0.0) + time.perf_counter() - t1
        _write_json(work / "state.json", state)
        rate = (done - start) / max(time.perf_counter() - t0, 1e-9)
        report.advance(batch.positions, tokens_per_s=rate)
        if state["data_batches"] % 25 == 0:
            report.note(f"corpus: {done} of {opts.corpus_tokens} positions, {rate:.0f} tokens/s")
    if state["corpus_windows"] >= len(wins) and done < opts.corpus_tokens:
        report.note(f"the corpus holds {done} positions, fewer than --corpus-tokens {opts.corpus_tokens}")


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
    left.set(xlabel="training positions", ylabel="held-out acceptance", ylim=(0, 1), title="acceptance per draft position")
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
