"""Step 3: the training forward (K chained drafter steps from every position at once) and its loss."""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx
import numpy as np

from ..cache import attention_mask
from ..models.base import SLIDING
from ..models.gemma4_assistant import Drafter
from .data import Batch


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
    offset = mx.ones((B,), dtype=mx.int32)  # row b's queries are positions 1…N−1
    g = batch.hidden[:, :T]
    out = []
    for j in range(k):
        h, g = drafter.forward_positions(mx.concatenate([target.model.embed(tokens[:, 1 + j : 1 + j + T]), g], axis=-1),
                                         offset, batch.kv, masks)
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
