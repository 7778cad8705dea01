"""Step 1: a new drafter whose tied table and centroid head start from the target's own embedding (docs/design.md),
or an existing drafter to fine-tune (--init)."""

from __future__ import annotations

import math

import mlx.core as mx
import numpy as np

from ..models.base import FULL, SLIDING
from ..models.gemma4_assistant import Drafter, DrafterConfig, PairError, check_pair
from .options import DistillError, Options, Reporter


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
        check_pair(target.config, drafter.config)
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


def existing_drafter(source: str, target) -> tuple[Drafter, dict]:
    """--init: the drafter to start from (a dir or hub id, MLX or Hugging Face), in float32 for training, and its
    Hugging Face config.json (without MLX's quantization entries: what distill saves is float32)."""
    from mlx_lm.utils import dequantize_model

    from ..loader import LoadError, load_drafter, read_config, resolve

    try:
        drafter = load_drafter(source, target, progress=False)
        raw = read_config(resolve(source, progress=False))
    except (LoadError, PairError) as e:
        raise DistillError(f"--init: {e}") from None
    dequantize_model(drafter)  # load_drafter keeps a quantized drafter quantized on Metal: training needs floats
    drafter.set_dtype(mx.float32)
    mx.eval(drafter.parameters())
    raw = {k: v for k, v in raw.items() if k not in ("quantization", "quantization_config")}
    return drafter, dict(raw, dtype="float32")


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
