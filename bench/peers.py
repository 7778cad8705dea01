"""gemma-mlx peers bench: the same converted Gemma 4 pair decoded by gemma-mlx, mlx-lm and mlx-vlm, side by side.

What it measures, on one random-weight 31b-like pair (bench/run.py's shape: dense, k_eq_v, sliding window 128, with a
4-layer d=256 MTP assistant), batch 1, greedy, a 100-token prompt and 48 new tokens (so decoding crosses the sliding
window: positions 100..147 vs W = 128):
- plain decoding: ours vs mlx-lm (`generate_step` on our converted target) vs mlx-vlm (its `generate_step`, on the
  HF-layout dirs the conversion was made from, i.e. the same weights: it cannot run MTP on our converted dirs);
- speculative decoding: our MTP (K = 3 and auto) vs mlx-lm's `--draft-model` path (`speculative_generate_step`, K = 3)
  vs mlx-vlm's Gemma 4 MTP (`--draft-kind mtp`, block 4 = K 3), each at its natural acceptance (random weights: about
  zero) and at a controlled acceptance α = 0.7 (the draft is replaced, with probability α per position, by the
  target's greedy token: bench/controlled.py for ours, the same wrapper idea around mlx-lm's draft model and
  mlx-vlm's `draft_block`). mlx-lm has no MTP, so its draft model is a small gemma4_text model of the same
  vocabulary with random weights of its own, sized like our assistant (2 full-attention layers, hidden 256, its own
  tied 32k-token embedding head; full attention, so mlx-lm can always roll its cache back). (An early exit of the
  target, its first layers + head, is no test: on these random weights it agrees with the target on every token.)
  Also the degenerate upper bound "the target as its own draft model" (acceptance 1);
- whether each output is token-identical to plain greedy (and where it first differs), past the sliding window;
- tokens/s as (n − 1) / (t(n) − t(1)) from whole-call wall clocks (`marginal_rate`): the systems' streams differ in
  what is computed when a token is yielded, so no clock started at a yielded token is fair to all;
- memory: peak RSS of each configuration (each runs in its own process, measured before anything else is loaded),
  drafter bytes / target bytes, KV-cache bytes with and without the drafter;
- whether mlx-vlm loads the pair at all, in each layout (transformers-written HF dirs, our converted dirs, HF dirs
  with the hub's config keys), with the exact error where it does not.

Every configuration runs in a fresh process that alternates it with the plain decoding of the same system (ratios in
one process, medians of the repeats); the plain configurations of mlx-lm and mlx-vlm alternate with ours. Quiet-machine
check: before each process, a wait (bounded) until other processes use at most --busy-cores (/proc/stat); load
average before/after and the CPU time other processes used meanwhile are recorded; a process run while others used
more than --busy-cores is rerun (bounded) and, if still busy, marked busy.
Absolute tokens/s are CPU figures (fp32, 2 cores, the BLAS the report names).

The pair is built with transformers (tests/oracle.py's initialisation and patches: a repository checkout with the
test extra) as a Gemma4ForConditionalGeneration (1-layer vision tower, no audio, like the 31B) + a
Gemma4AssistantForCausalLM, converted with our converter to fp32 MLX dirs, and cached under --work.
mlx-vlm runs in its own venv (`make bench` creates it; --mlx-vlm-python or $MLX_VLM_PYTHON):
`python -m venv --system-site-packages V && V/bin/pip install --no-deps mlx-vlm==0.7.10 Pillow`.

    python -m bench.peers [--quick] [--tokens 48] [--repeats 3] [--mlx-vlm-python PATH] [--out bench/results]
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import gemma_mlx  # noqa: F401  (OpenBLAS before mlx, in every worker too)
import numpy as np

from gemma_mlx import _blas

from .quiet import mark, others_since, wait_quiet
from .run import COMMON, SHAPES, drafter_text

ROOT = Path(__file__).resolve().parent.parent
MODULE = __spec__.name if __spec__ else "bench.peers"
MLX_VLM_VERSION = "0.7.10"
RESULT_TAG = "PEERS-RESULT "
S, F = "sliding_attention", "full_attention"
TINY = dict(target=dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=6,
                        num_attention_heads=4, num_key_value_heads=2, head_dim=16, global_head_dim=32,
                        layer_types=[S, S, F, S, S, F], sliding_window=8, attention_k_eq_v=True,
                        num_global_key_value_heads=1, hidden_size_per_layer_input=0, final_logit_softcapping=30.0),
            drafter=dict(hidden_size=32, intermediate_size=64))
# The target's embedding rows: N(0, EMBEDDING_STD²). With oracle.perturb's 0.1 the token embedding (×sqrt(hidden))
# dominates the residual stream of a random 31b-like net, and greedy decoding just repeats the last token, which any
# draft with tied embeddings predicts (a 2-layer random draft model gets acceptance 1) and which a corrupted cache
# does not change (identity checks would prove nothing). At 0.01 the greedy continuation is chaotic: 24 distinct
# tokens in 24.
EMBEDDING_STD = 0.01
K = 3  # drafts per round for the fixed-K configurations (mlx-vlm's Gemma 4 assistant block 4 = K 3)
ALPHA = 0.7
DRAFT_MODEL = dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=2, num_attention_heads=4)

# (system, label, config); kind: plain | mtp | draft (mlx-lm's small draft model) | self (the target as its draft)
CONFIGS = [
    ("ours", "plain", dict(kind="plain")),
    ("ours", "MTP, K 3", dict(kind="mtp", k=K, alpha=None)),
    ("ours", "MTP, K auto", dict(kind="mtp", k="auto", alpha=None)),
    ("ours", "MTP, K 3, α 0.7", dict(kind="mtp", k=K, alpha=ALPHA)),
    ("ours", "MTP, K auto, α 0.7", dict(kind="mtp", k="auto", alpha=ALPHA)),
    ("mlx_lm", "plain", dict(kind="plain")),
    ("mlx_lm", "draft model (2 layers, d 256), K 3", dict(kind="draft", k=K, alpha=None)),
    ("mlx_lm", "draft model (2 layers, d 256), K 3, α 0.7", dict(kind="draft", k=K, alpha=ALPHA)),
    ("mlx_lm", "target as its own draft, K 3", dict(kind="self", k=K, alpha=None)),
    ("mlx_vlm", "plain", dict(kind="plain")),
    ("mlx_vlm", "MTP, block 4 (K 3)", dict(kind="mtp", k=K, alpha=None)),
    ("mlx_vlm", "MTP, block 4 (K 3), α 0.7", dict(kind="mtp", k=K, alpha=ALPHA)),
]
NAMES = {"ours": "gemma-mlx", "mlx_lm": "mlx-lm", "mlx_vlm": "mlx-vlm"}


# --- the pair ---------------------------------------------------------------------------------------------------


def pair_spec(shape: str) -> dict:
    """Target text config (Gemma4TextConfig kwargs) and the assistant's text config for a shape."""
    if shape == "tiny":
        target = dict(TINY["target"])
        return dict(target=target, drafter=drafter_text(target, **TINY["drafter"]))
    if SHAPES[shape]["target"].get("enable_moe_block") or SHAPES[shape]["target"].get("num_kv_shared_layers"):
        raise ValueError(f"{shape}: the peers bench runs dense targets without kv sharing (31b-like)")
    target = {**COMMON, **SHAPES[shape]["target"]}
    return dict(target=target, drafter=drafter_text(target, hidden_size=SHAPES[shape]["drafter"]["hidden_size"]))


def dummy_tokenizer(vocab: int) -> str:
    """A word-level tokenizer over the vocabulary (t0, t1, ...): the loaders need one; the bench feeds token ids."""
    from tokenizers import Tokenizer, models

    return Tokenizer(models.WordLevel({f"t{i}": i for i in range(vocab)}, unk_token="t3")).to_str()


def _write_tokenizer(out: Path, vocab: int):
    (out / "tokenizer.json").write_text(dummy_tokenizer(vocab))
    (out / "tokenizer_config.json").write_text(json.dumps(dict(
        tokenizer_class="PreTrainedTokenizerFast", bos_token="t2", eos_token="t1", pad_token="t0", unk_token="t3")))


def hub_style(src: Path, out: Path):
    """`out`: `src` with the config keys the hub's Gemma 4 config.json files carry (`global_head_dim`,
    `num_global_key_value_heads`); transformers 5.23.0 writes them only inside `per_layer_config`. Weights are
    symlinked."""
    out.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        if f.name != "config.json" and not (out / f.name).exists():
            (out / f.name).symlink_to(f.resolve())
    cfg = json.loads((src / "config.json").read_text())
    text = cfg.get("text_config", cfg)
    for layer, over in (text.get("per_layer_config") or {}).items():
        if text["layer_types"][int(layer)] == F:
            text.setdefault("global_head_dim", over.get("head_dim"))
            if "num_key_value_heads" in over:
                text.setdefault("num_global_key_value_heads", over["num_key_value_heads"])
    (out / "config.json").write_text(json.dumps(cfg, indent=1))


def build_pair(shape: str, work: Path, seed: int = 0) -> dict:
    """Build (once, cached by shape) the HF target + assistant with transformers, their hub-style copies and our fp32
    conversions; returns the paths."""
    spec = pair_spec(shape)
    tag = hashlib.sha256(json.dumps(dict(spec, embedding_std=EMBEDDING_STD), sort_keys=True).encode()).hexdigest()[:10]
    base = work / f"{shape}-{tag}"
    paths = {k: str(base / k) for k in ("target_hf", "drafter_hf", "target_hf_hub", "drafter_hf_hub", "target_mlx",
                                        "drafter_mlx")}
    if (base / "done").exists():
        return paths
    if base.exists():
        shutil.rmtree(base)
    tests = ROOT / "tests"
    if not (tests / "oracle.py").exists():
        raise RuntimeError("the peers bench builds its pair with tests/oracle.py: run it from a repository checkout")
    sys.path.insert(0, str(tests))
    import oracle  # noqa: E402  (patches transformers 5.23.0)
    import torch
    from transformers import (Gemma4AssistantConfig, Gemma4AssistantForCausalLM, Gemma4Config,
                              Gemma4ForConditionalGeneration, Gemma4TextConfig, Gemma4VisionConfig)

    from gemma_mlx.convert import convert

    t, v = spec["target"], spec["target"]["vocab_size"]
    text = dict(t, vocab_size_per_layer_input=v, max_position_embeddings=4096, bos_token_id=2, eos_token_id=1,
                pad_token_id=0)
    vision = Gemma4VisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                                num_key_value_heads=2, head_dim=16, patch_size=4, position_embedding_size=64,
                                pooling_kernel_size=2)
    cfg = Gemma4Config(text_config=Gemma4TextConfig(**text), vision_config=vision, audio_config=None,
                       image_token_id=v - 12, video_token_id=v - 11, boi_token_id=v - 10, eoi_token_id=v - 9)
    torch.manual_seed(seed)
    target = Gemma4ForConditionalGeneration(cfg).eval()
    oracle.perturb(target, seed)
    with torch.no_grad():  # perturb's N(0, 0.1²) rows dominate the residual stream at these widths: see EMBEDDING_STD
        target.get_input_embeddings().weight.mul_(EMBEDDING_STD / 0.1)
    target.save_pretrained(paths["target_hf"])
    del target
    d = dict(spec["drafter"], max_position_embeddings=4096, final_logit_softcapping=None,
             hidden_size_per_layer_input=0, vocab_size_per_layer_input=0, num_kv_shared_layers=4)
    dcfg = Gemma4AssistantConfig(text_config=Gemma4TextConfig(**d), backbone_hidden_size=t["hidden_size"],
                                 use_ordered_embeddings=False)
    torch.manual_seed(seed + 1)
    drafter = Gemma4AssistantForCausalLM(dcfg).eval()
    oracle.perturb(drafter, seed + 1)
    drafter.generation_config.num_assistant_tokens = K + 1
    drafter.save_pretrained(paths["drafter_hf"])
    del drafter
    for k in ("target", "drafter"):
        _write_tokenizer(Path(paths[f"{k}_hf"]), v)
        hub_style(Path(paths[f"{k}_hf"]), Path(paths[f"{k}_hf_hub"]))
        convert(paths[f"{k}_hf"], paths[f"{k}_mlx"], dtype="fp32", progress=False)
    (base / "done").write_text(json.dumps(spec))
    return paths


# --- runs (in the workers) --------------------------------------------------------------------------------------


@dataclasses.dataclass
class Run:
    tokens: list
    seconds: float  # wall clock of the whole call, prefill included (rates: see `marginal_rate`)
    kv_bytes: int
    rounds: int = 0
    drafted: int = 0
    accepted: int = 0


def _timed(stream):
    """(tokens, wall seconds) of a lazy token stream: the clock covers the whole call, prefill included.

    Every system is timed this way because their streams differ in what has been computed when a token is yielded:
    mlx-lm and mlx-vlm compute token i+1 before yielding token i (and on MLX's CPU backend `async_eval` blocks, so
    that is one whole forward), ours yields a round as soon as it is verified."""
    t0 = time.perf_counter()
    toks = [int(tok) for tok in stream]
    return toks, time.perf_counter() - t0


def marginal_rate(n: int, seconds: float, first_seconds: float) -> float:
    """Decode tokens/s from whole-call times: (n − 1) tokens in t(n) − t(1), the prefill and first token cancelled
    by the same call with max_tokens 1."""
    return (n - 1) / max(seconds - first_seconds, 1e-9)


def cache_bytes(caches) -> int:
    total = 0
    for c in caches:
        if c is None:
            continue
        inner = getattr(c, "caches", None)
        if inner is not None:
            total += cache_bytes(inner)
            continue
        for name in ("keys", "values"):
            a = getattr(c, name, None)
            if a is not None and hasattr(a, "nbytes"):
                total += a.nbytes
    return total


def param_bytes(module) -> int:
    from mlx.utils import tree_flatten

    return sum(v.nbytes for _, v in tree_flatten(module.parameters()))


class Ours:
    def __init__(self, paths, cfg):
        from gemma_mlx.loader import load_checkpoint

        self.target = load_checkpoint(Path(paths["target_mlx"]))
        self.drafter = None
        if cfg["kind"] != "plain":
            self.drafter = load_checkpoint(Path(paths["drafter_mlx"]))

    def weights(self):
        return dict(target_bytes=param_bytes(self.target),
                    drafter_bytes=param_bytes(self.drafter) if self.drafter is not None else 0)

    def plain(self, prompt, n):
        from .run import decode

        t0 = time.perf_counter()
        out, st, sess = decode(self.target, None, prompt, n, 0)
        return Run(out, time.perf_counter() - t0, sess.nbytes, st.rounds)

    def spec(self, cfg, prompt, n, reference, seed):
        from .controlled import ControlledDrafter
        from .run import decode

        drafter = self.drafter if cfg["alpha"] is None else ControlledDrafter(self.drafter, [reference], cfg["alpha"],
                                                                              seed)
        t0 = time.perf_counter()
        out, st, sess = decode(self.target, drafter, prompt, n, cfg["k"])
        return Run(out, time.perf_counter() - t0, sess.nbytes, st.rounds, st.drafted_tokens, st.accepted_tokens)


def small_draft(model, seed: int = 1):
    """mlx-lm's draft model: a gemma4_text of DRAFT_MODEL's size with the target's vocabulary, head geometry and
    softcap, random weights of its own (seeded), and full-attention layers only (a KVCache, which mlx-lm can always
    trim)."""
    import mlx.core as mx
    from mlx_lm.models import gemma4_text

    n = DRAFT_MODEL["num_hidden_layers"]
    args = dataclasses.replace(model.args, **DRAFT_MODEL, layer_types=[F] * n, num_kv_shared_layers=0,
                               hidden_size_per_layer_input=0, enable_moe_block=False)
    mx.random.seed(seed)
    draft = gemma4_text.Model(args)
    mx.eval(draft.parameters())
    return draft


class ForcedDraftModel:
    """Around an mlx-lm draft model: with probability alpha per drafted position, the logits are overridden so the
    draft's greedy pick is the target's greedy token there (bench/controlled.py's idea, with its coins). The position
    a call predicts is its cache's length after the call."""

    def __init__(self, model, reference, alpha, seed):
        from .controlled import position_coins

        self.model, self.reference, self.alpha = model, reference, alpha
        self.coins = position_coins(seed, 0, len(reference))

    def __call__(self, inputs, cache=None, **kw):
        import mlx.core as mx

        logits = self.model(inputs, cache=cache, **kw)
        pos = cache[0].offset
        if pos < len(self.reference) and self.coins[pos] < self.alpha:
            hit = mx.arange(logits.shape[-1]) == self.reference[pos]
            last = mx.where(hit, mx.array(1e4, logits.dtype), logits[:, -1:, :])
            logits = mx.concatenate([logits[:, :-1, :], last], axis=1)
        return logits


class MlxLm:
    def __init__(self, paths, cfg):
        from mlx_lm import load

        self.model, _ = load(paths["target_mlx"])
        self.draft = small_draft(self.model) if cfg["kind"] == "draft" else None

    def weights(self):
        return dict(target_bytes=param_bytes(self.model),
                    drafter_bytes=param_bytes(self.draft) if self.draft is not None else 0,
                    drafter_note="the self-draft is the target: no bytes of its own")

    def plain(self, prompt, n):
        import mlx.core as mx
        from mlx_lm.generate import generate_step, generation_stream  # the default stream since one_stream
        from mlx_lm.models.cache import make_prompt_cache

        cache = make_prompt_cache(self.model)
        toks, seconds = _timed(tok for tok, _ in generate_step(mx.array(prompt), self.model, generation_stream,
                                                           max_tokens=n, prompt_cache=cache))
        return Run(toks, seconds, cache_bytes(cache), len(toks))

    def spec(self, cfg, prompt, n, reference, seed):
        import mlx.core as mx
        from mlx_lm.generate import generation_stream, speculative_generate_step  # see plain
        from mlx_lm.models.cache import make_prompt_cache

        draft = self.model if cfg["kind"] == "self" else self.draft
        tcache, dcache = make_prompt_cache(self.model), make_prompt_cache(draft)
        if cfg["alpha"] is not None:
            draft = ForcedDraftModel(draft, reference, cfg["alpha"], seed)
        flags, k = [], cfg["k"]
        stream = speculative_generate_step(mx.array(prompt), self.model, draft, generation_stream, num_draft_tokens=k,
                                           max_tokens=n, prompt_cache=tcache + dcache)

        def tokens():
            for tok, _, from_draft in stream:
                flags.append(from_draft)
                yield tok

        toks, seconds = _timed(tokens())
        rounds = flags.count(False)
        drafted, emitted = 0, 0
        for i, f in enumerate(flags):  # each round drafts min(K, tokens still wanted at its start)
            if i == 0 or not flags[i - 1]:
                drafted += min(k, n - emitted)
            emitted += 1
        return Run(toks, seconds, cache_bytes(tcache) + cache_bytes(dcache), rounds, drafted, flags.count(True))


class MlxVlm:
    def __init__(self, paths, cfg):
        from mlx_vlm.utils import load_model

        self.model = load_model(Path(paths["target_hf_hub"]))
        self.draft = None
        if cfg["kind"] != "plain":
            from mlx_vlm.speculative.drafters import load_drafter

            self.draft, kind = load_drafter(paths["drafter_hf_hub"], kind="mtp")
            assert kind == "mtp", kind

    def weights(self):
        return dict(target_bytes=param_bytes(self.model.language_model),
                    drafter_bytes=param_bytes(self.draft) if self.draft is not None else 0,
                    other_bytes=param_bytes(self.model) - param_bytes(self.model.language_model))

    def plain(self, prompt, n):
        import mlx.core as mx
        from mlx_vlm.generate import generate_step
        from mlx_vlm.models.cache import make_prompt_cache

        cache = make_prompt_cache(self.model.language_model)
        toks, seconds = _timed(t for t, _ in generate_step(mx.array([prompt]), self.model, None, None, max_tokens=n,
                                                       temperature=0.0, prompt_cache=cache))
        return Run(toks, seconds, cache_bytes(cache), len(toks))

    def spec(self, cfg, prompt, n, reference, seed):
        import mlx.core as mx
        from mlx_vlm.generate import generate_step
        from mlx_vlm.models.cache import make_prompt_cache

        d = self.draft
        if cfg["alpha"] is not None:
            d.draft_block = self._forced(reference, cfg["alpha"], seed)
        cache = make_prompt_cache(self.model.language_model)
        try:
            toks, seconds = _timed(t for t, _ in generate_step(mx.array([prompt]), self.model, None, None, max_tokens=n,
                                                           temperature=0.0, prompt_cache=cache, draft_model=d,
                                                           draft_kind="mtp", draft_block_size=cfg["k"] + 1))
        finally:
            d.__dict__.pop("draft_block", None)
        accepted = [int(a) for a in d.accept_lens]
        return Run(toks, seconds, cache_bytes(cache), len(accepted), int(sum(d.draft_lens)), sum(accepted))

    def _forced(self, reference, alpha, seed):
        """mlx-vlm's `draft_block`, then with probability alpha per position (bench/controlled.py's coins) the
        target's greedy token: the last bonus token sits at position `_kv_offset`, draft j guesses position
        `_kv_offset` + 1 + j."""
        import mlx.core as mx

        from .controlled import position_coins

        d, ref = self.draft, np.asarray(reference)
        coins = position_coins(seed, 0, len(ref))
        real = type(d).draft_block

        def draft_block(last_bonus, hidden, cache, block_size, sampler, token_dtype=mx.int32, greedy=False):
            drafts = real(d, last_bonus, hidden, cache, block_size, sampler, token_dtype, greedy=greedy)
            pos = np.minimum(d._kv_offset + 1 + np.arange(block_size - 1), len(ref) - 1)
            forced = coins[pos] < alpha
            return mx.where(mx.array(forced)[None], mx.array(ref[pos][None]).astype(drafts.dtype), drafts)

        return draft_block


RUNNERS = {"ours": Ours, "mlx_lm": MlxLm, "mlx_vlm": MlxVlm}


def peak_rss_mb() -> float:
    """This process's peak RSS. Linux: VmHWM (reset by exec; ru_maxrss of a child starts at its parent's RSS at fork)."""
    try:
        with open("/proc/self/status") as f:
            return next(int(x.split()[1]) for x in f if x.startswith("VmHWM:")) / 1024
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (1 << 20 if sys.platform == "darwin" else 1024)


def first_difference(a, b):
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None if len(a) == len(b) else min(len(a), len(b)))


def one_stream():
    """Make every system compute on this thread's default MLX stream (call before mlx-vlm is imported).

    MLX runs each stream on its own thread, and mlx-lm and mlx-vlm decode on streams of their own. With MKL on GNU
    OpenMP, every thread that calls BLAS gets its own OpenMP team, and once a process has more OpenMP threads than
    cores libgomp throttles its spin-waits: from then on every small matmul of every system is about 50% slower (on
    the 31b-like target, 47 steps of mlx-lm took 1.85 s on one stream, 2.85 s on the default stream after one run on
    a second). Alone in its process each system computes on one stream, so one shared stream is each one's own
    speed (mlx-vlm's MTP even gains: it uses two streams of its own). OpenBLAS has one thread pool: no effect there."""
    import mlx.core as mx
    import mlx_lm.generate

    default = mx.default_stream(mx.default_device())
    mx.new_thread_local_stream = lambda device: default  # the module-level streams of peers imported from now on
    mlx_lm.generate.generation_stream = default  # imported already (by gemma_mlx): MlxLm passes it as `stream=`


def worker(job: dict) -> dict:
    """One configuration of one system, in this process: load, warm up (plain greedy = the reference, then the
    configuration, checked against it), record the peak RSS, then alternate with the yardstick (the system's own
    plain decoding, or ours for the plain configurations of the peers) for the timed repeats."""
    import mlx.core as mx

    system, cfg, prompt, n = job["system"], job["config"], job["prompt"], job["tokens"]
    one_stream()
    out = dict(system=system, label=job["label"], config=cfg, blas=_blas.status, mlx=mx.__version__)
    if system == "mlx_vlm":
        import mlx_vlm

        out["mlx_vlm"] = mlx_vlm.__version__
    elif system == "mlx_lm":
        import mlx_lm

        out["mlx_lm"] = mlx_lm.__version__
    t0 = time.perf_counter()
    runner = RUNNERS[system](job["paths"], cfg)
    out["load_seconds"] = time.perf_counter() - t0
    out.update(runner.weights())
    ref = runner.plain(prompt, n)
    reference = prompt + ref.tokens
    first = ref if cfg["kind"] == "plain" else runner.spec(cfg, prompt, n, reference, seed=0)
    out["peak_rss_mb"] = peak_rss_mb()
    out["kv_bytes_plain"], out["kv_bytes"] = ref.kv_bytes, first.kv_bytes
    diffs = [first_difference(first.tokens, ref.tokens)]
    cross = job.get("yardstick") == "ours" and system != "ours"
    yard = Ours(job["paths"], dict(kind="plain")) if cross else runner
    if cross:
        ours = yard.plain(prompt, n)
        out["same_tokens_as_ours"] = ours.tokens == ref.tokens
        out["first_difference_from_ours"] = first_difference(ref.tokens, ours.tokens)
    def run(m, seed):
        return runner.plain(prompt, m) if cfg["kind"] == "plain" else runner.spec(cfg, prompt, m, reference, seed)

    own_plain = cfg["kind"] == "plain" and not cross  # its own yardstick
    t1 = statistics.median(run(1, 0).seconds for _ in range(3))  # t(1): prefill + first token
    yard_t1 = t1 if own_plain else statistics.median(yard.plain(prompt, 1).seconds for _ in range(3))
    out["first_token_seconds"], out["yardstick_first_token_seconds"] = t1, yard_t1
    runs, tps, yard_tps = [], [], []
    for rep in range(job["repeats"]):
        y = None if own_plain else yard.plain(prompt, n)
        r = run(n, rep + 1)
        tps.append(marginal_rate(len(r.tokens), r.seconds, t1))
        yard_tps.append(tps[-1] if own_plain else marginal_rate(len(y.tokens), y.seconds, yard_t1))
        runs.append(r)
        diffs.append(first_difference(r.tokens, ref.tokens))
    out["tokens"] = first.tokens
    out["reference"] = ref.tokens
    out["identical"] = all(d is None for d in diffs)
    known = [d for d in diffs if d is not None]
    out["first_difference"] = min(known) if known else None  # index into the new tokens
    out["first_difference_position"] = None if not known else len(prompt) + min(known)
    out["tps_runs"] = tps
    out["yardstick_tps_runs"] = yard_tps
    out["yardstick"] = "ours plain" if cross else f"{NAMES[system]} plain"
    out["tps"] = statistics.median(out["tps_runs"])
    out["yardstick_tps"] = statistics.median(yard_tps)
    out["ratio"] = statistics.median(t / y for t, y in zip(tps, yard_tps))
    rounds, drafted, accepted = (sum(getattr(r, a) for r in runs) for a in ("rounds", "drafted", "accepted"))
    out["rounds"], out["drafted"], out["accepted"] = rounds, drafted, accepted
    if cfg["kind"] != "plain":
        out["acceptance"] = accepted / drafted if drafted else 0.0
        out["tokens_per_round"] = (accepted + rounds) / rounds if rounds else 0.0
    return out


def probe_mlx_vlm(paths: dict, prompt: list, tokens: int) -> list:
    """Which layouts mlx-vlm loads, and whether its MTP runs on them: (layout, outcome) with the exact error line."""
    import mlx.core as mx
    from mlx_vlm.generate import generate_step
    from mlx_vlm.speculative.drafters import load_drafter
    from mlx_vlm.utils import load_model

    layouts = [("HF dirs as transformers 5.23.0 writes them", "target_hf", "drafter_hf"),
               ("our converted MLX dirs", "target_mlx", "drafter_mlx"),
               ("HF dirs + the hub's config keys (global_head_dim, num_global_key_value_heads)", "target_hf_hub",
                "drafter_hf_hub")]
    found = []
    for name, t, d in layouts:
        entry = dict(layout=name, target=paths[t], drafter=paths[d])
        step = "load target"
        try:
            model = load_model(Path(paths[t]))
            entry["target_class"] = f"{type(model).__module__}.{type(model).__name__}"
            step = "plain decoding"
            plain = [int(x) for x, _ in generate_step(mx.array([prompt]), model, None, None, max_tokens=tokens,
                                                      temperature=0.0)]
            step = "load drafter"
            draft, kind = load_drafter(paths[d], kind="mtp")
            step = "MTP decoding"
            spec = [int(x) for x, _ in generate_step(mx.array([prompt]), model, None, None, max_tokens=tokens,
                                                     temperature=0.0, draft_model=draft, draft_kind=kind)]
            entry.update(ok=True, mtp_identical=spec == plain)
        except Exception as e:  # the exact reason is the result
            entry.update(ok=False, failed_at=step, error=f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
            entry["why"] = _why(paths[t], entry)
        found.append(entry)
    return found


def _why(target: str, entry: dict) -> str | None:
    """The cause of a failure we have traced in mlx-vlm 0.7.10's source, where it is that one."""
    cfg = json.loads((Path(target) / "config.json").read_text())
    text = cfg.get("text_config", cfg)
    if entry["failed_at"] == "load target" and "global_head_dim" not in text and text.get("per_layer_config"):
        return ("transformers 5.23.0 writes the full-attention head dim and KV heads only inside "
                "text_config.per_layer_config; mlx-vlm reads global_head_dim (num_global_key_value_heads), finds none "
                "and builds its default (512)")
    if entry["failed_at"] == "MTP decoding" and entry.get("target_class", "").endswith("gemma4_text.Model"):
        return ("a gemma4_text checkpoint loads as mlx-vlm's text-only Gemma 4 model, whose forward does not return "
                "the hidden states and shared K/V its MTP loop reads (run_speculative_rounds: "
                "last_outputs.hidden_states is None); mlx-vlm's Gemma 4 MTP needs the multimodal gemma4 layout")
    return None


# --- the orchestration ------------------------------------------------------------------------------------------


def subprocess_result(python: str, job: dict, args):
    """A worker's result from a fresh process; on a crash, {"error": its last stderr line, "stderr_tail": ...}."""
    proc = subprocess.run([python, "-m", MODULE, "--worker", json.dumps(job)], cwd=ROOT, capture_output=True,
                          text=True, timeout=args.timeout)
    lines = [x for x in proc.stdout.splitlines() if x.startswith(RESULT_TAG)]
    if proc.returncode or not lines:
        err = [x for x in proc.stderr.strip().splitlines() if x.strip()]
        return dict(error=err[-1] if err else f"exit code {proc.returncode}", stderr_tail=err[-15:])
    return json.loads(lines[-1][len(RESULT_TAG):])


def run_job(job: dict, python: str | None, args) -> dict:
    """Run a worker job (in a fresh process with `python`, or here when None), with the quiet-machine check: rerun
    (bounded) while other processes used more than args.busy_cores meanwhile; the quietest attempt is kept."""
    best = None
    for attempt in range(1 + args.reruns):
        budget = args.wait_budget - args.waited
        waited = wait_quiet(args.busy_cores, min(args.max_wait, budget)) if min(args.max_wait, budget) > 0 else 0.0
        args.waited += waited
        load_before, start = os.getloadavg()[0], mark(python is not None)
        if python is None:
            res = worker(job)
        else:
            res = subprocess_result(python, job, args)
            if "error" in res:
                res.update(system=job["system"], label=job["label"], config=job["config"])
        wall, others = time.time() - start[2], others_since(start)
        res["machine"] = dict(load_before=load_before, load_after=os.getloadavg()[0], waited_seconds=waited,
                              other_processes_cores=others, seconds=wall, attempt=attempt + 1,
                              busy=others is not None and others > args.busy_cores)
        if best is None or "error" in best or (others or 0) < (best["machine"]["other_processes_cores"] or 0):
            best = res
        if "error" in res or not res["machine"]["busy"] or attempt == args.reruns or args.waited >= args.wait_budget:
            break
        print(f"  busy machine (others used {others:.2f} cores): rerunning", flush=True)
    return best


def mlx_vlm_python(option: str | None) -> tuple[str | None, str]:
    """The venv python that has mlx-vlm, or None and why not."""
    candidates = [option, os.environ.get("MLX_VLM_PYTHON"), str(Path.home() / "vlmvenv" / "bin" / "python")]
    for c in candidates:
        if not c:
            continue
        if not Path(c).exists():
            if c == option:
                return None, f"--mlx-vlm-python {c}: no such file"
            continue
        probe = subprocess.run([c, "-c", "import gemma_mlx, mlx_vlm; print(mlx_vlm.__version__)"], cwd=ROOT,
                               capture_output=True, text=True)
        if probe.returncode:
            err = [x for x in probe.stderr.splitlines() if x.strip()]
            return None, f"{c} cannot import mlx_vlm: {err[-1] if err else probe.returncode}"
        return c, f"mlx-vlm {probe.stdout.strip()} at {c}"
    return None, ("mlx-vlm not installed: make bench creates a venv for it (or python -m venv --system-site-packages V "
                  f"&& V/bin/pip install --no-deps mlx-vlm=={MLX_VLM_VERSION} Pillow; then --mlx-vlm-python "
                  "V/bin/python)")


def summarise(report: dict) -> str:
    rows = report["configs"]
    by = {(r["system"], r["label"]): r for r in rows}
    plain = {s: by.get((s, "plain")) for s in NAMES}

    def vs_mlx_lm(r):
        """config tok/s over mlx-lm plain, chained from ratios each measured within one process."""
        lm, own = plain["mlx_lm"], plain[r["system"]]
        if any(x is None or "error" in x for x in (r, lm, own)):
            return None
        own_over_ours = 1.0 if r["system"] == "ours" else own["ratio"]
        return (1.0 if r["label"] == "plain" else r["ratio"]) * own_over_ours / lm["ratio"]

    head = ("| system | configuration | acceptance | tokens / round | tok/s (CPU) | vs own plain | vs mlx-lm plain | "
            "identical to greedy | peak RSS | KV bytes | busy |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        if "error" in r:
            lines.append(f"| {NAMES[r['system']]} | {r['label']} | failed: `{r['error']}` |" + " |" * 8)
            continue
        acc = f"{r['acceptance']:.2f}" if "acceptance" in r else "-"
        tpr = f"{r['tokens_per_round']:.2f}" if "tokens_per_round" in r else "-"
        own = f"{r['ratio']:.2f}x" + (" ours" if r["label"] == "plain" and r["system"] != "ours" else "")
        v = vs_mlx_lm(r)
        ident = "yes" if r["identical"] else f"no: from new token {r['first_difference']} (position " \
                                              f"{r['first_difference_position']})"
        if r["label"] == "plain" and r["system"] != "ours":
            ident = "= ours" if r.get("same_tokens_as_ours") else \
                f"differs from ours at new token {r.get('first_difference_from_ours')}"
        busy = "busy" if r["machine"]["busy"] else "quiet"
        lines.append(f"| {NAMES[r['system']]} | {r['label']} | {acc} | {tpr} | {r['tps']:.1f} | {own} | "
                     f"{'-' if v is None else f'{v:.2f}x'} | {ident} | {r['peak_rss_mb']:.0f} MB | "
                     f"{r['kv_bytes'] / 2**20:.1f} MiB | {busy} |")
    return "\n".join(lines)


def notes(report: dict) -> str:
    """Why a peer's speculative output is not greedy, where it is the cause we traced (and test)."""
    out = []
    lm = [r for r in report["configs"] if r["system"] == "mlx_lm" and r["config"].get("kind") == "draft"
          and "error" not in r and not r["identical"]]
    if lm:
        w = report["settings"]["sliding_window"]
        at = sorted({r["first_difference_position"] for r in lm})
        out.append(f"mlx-lm's draft-model output leaves greedy at position {', '.join(map(str, at))} (window {w}): "
                   "mlx-lm cannot roll back a sliding-window RotatingKVCache once it has wrapped (`is_trimmable` is "
                   "`offset < max_size`, and `trim_prompt_cache` then trims no layer), so rejected drafts stay in "
                   "the target's cache; with the target's window widened the same runs are greedy "
                   "(tests/test_bench_peers.py). The target as its own draft never rolls back, so it stays greedy.")
    return "".join(f"{x}\n\n" for x in out)


def memory_lines(report: dict) -> str:
    out = []
    for system in NAMES:
        rows = [r for r in report["configs"] if r["system"] == system and "error" not in r]
        p = next((r for r in rows if r["label"] == "plain"), None)
        spec = [r for r in rows if r["label"] != "plain"]
        if not p or not spec:
            continue
        s = max(spec, key=lambda r: r["peak_rss_mb"])
        d = max(r["drafter_bytes"] for r in spec)
        kv = sorted({r["kv_bytes"] for r in spec})
        note = next((r["drafter_note"] for r in spec if "drafter_note" in r), None)
        out.append(f"- {NAMES[system]}: target {p['target_bytes'] / 2**20:.0f} MiB, drafter {d / 2**20:.1f} MiB "
                   f"(drafter / target {d / p['target_bytes']:.3f}{'; ' + note if note else ''}); KV bytes plain "
                   f"{p['kv_bytes_plain']} vs "
                   f"speculative {', '.join(map(str, kv))}; peak RSS plain {p['peak_rss_mb']:.0f} MB vs "
                   f"speculative up to {s['peak_rss_mb']:.0f} MB")
    return "\n".join(out)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="a tiny pair (W = 8), few tokens, one repeat (a smoke run)")
    ap.add_argument("--shape", default="31b-like")
    ap.add_argument("--tokens", type=int, default=48)
    ap.add_argument("--prompt-tokens", type=int, default=100)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--systems", nargs="*", default=list(NAMES), choices=list(NAMES))
    ap.add_argument("--mlx-vlm-python", default=None, help="python of a venv with mlx-vlm (default: $MLX_VLM_PYTHON, "
                                                           "~/vlmvenv/bin/python)")
    ap.add_argument("--work", type=Path, default=None, help="where the built pair is cached")
    ap.add_argument("--inprocess", action="store_true", help="run our and mlx-lm's configurations in this process "
                                                             "(tests; peak RSS then is not per configuration)")
    ap.add_argument("--max-wait", type=float, default=60.0, help="longest wait for a quiet machine, seconds")
    ap.add_argument("--wait-budget", type=float, default=600.0, help="longest total of those waits, seconds")
    ap.add_argument("--busy-cores", type=float, default=0.3, help="others using more cores than this = busy")
    ap.add_argument("--reruns", type=int, default=1, help="reruns of a configuration measured on a busy machine")
    ap.add_argument("--timeout", type=float, default=900.0, help="per-process limit, seconds")
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    args.waited = 0.0
    if args.worker:
        job = json.loads(args.worker)
        if "probe" in job or "jobs" in job:  # the layouts probe and/or several configurations in one process
            res = dict(results=[worker(j) for j in job.get("jobs", [])])
            if "probe" in job:
                res["layouts"] = probe_mlx_vlm(**job["probe"])
        else:
            res = worker(job)
        print(RESULT_TAG + json.dumps(res), flush=True)
        return 0
    from .run import blas_ok

    shape = "tiny" if args.quick else args.shape
    n_new = min(args.tokens, 24) if args.quick else args.tokens
    n_prompt = 12 if args.quick else args.prompt_tokens
    repeats = 1 if args.quick else args.repeats
    if args.quick:
        args.max_wait, args.reruns = 0.0, 0
    ok, dt = blas_ok()
    print(f"BLAS: {_blas.status}; 2048³ fp32 matmul {dt:.3f}s", flush=True)
    if not ok and sys.platform.startswith("linux") and not args.quick:
        print("MLX is on the reference BLAS: speed figures would be meaningless (make install sets up OpenBLAS)")
        return 1
    started, load_start = time.time(), os.getloadavg()
    work = args.work or Path(os.environ.get("GEMMA_MLX_HOME", Path.home() / ".cache" / "gemma-mlx")) / "bench-peers"
    t0 = time.time()
    paths = build_pair(shape, work)
    print(f"pair ({shape}) at {Path(paths['target_mlx']).parent} ({time.time() - t0:.0f}s)", flush=True)
    spec = pair_spec(shape)
    vocab, window = spec["target"]["vocab_size"], spec["target"]["sliding_window"]
    prompt = [2] + np.random.default_rng(0).integers(3, vocab - 16, n_prompt - 1).tolist()
    vlm_python, vlm_status = (None, "not requested") if "mlx_vlm" not in args.systems else \
        mlx_vlm_python(args.mlx_vlm_python)
    print(f"mlx-vlm: {vlm_status}", flush=True)
    report = dict(
        what="peers on one converted pair: plain, speculative (ours MTP, mlx-lm draft model, mlx-vlm MTP), identity "
             "to greedy past the sliding window, memory; CPU figures (fp32, the BLAS in `blas`)",
        machine=dict(platform=platform.platform(), machine=platform.machine(), cpus=os.cpu_count(),
                     blas=_blas.status, load_average_at_start=load_start),
        settings=dict(shape=shape, target=spec["target"], drafter=spec["drafter"], prompt_tokens=n_prompt,
                      new_tokens=n_new, sliding_window=window, repeats=repeats, k=K, alpha=ALPHA,
                      draft_model=DRAFT_MODEL, dtype="fp32", paths=paths,
                      inprocess=args.inprocess, busy_cores=args.busy_cores, max_wait=args.max_wait,
                      reruns=args.reruns, wait_budget=args.wait_budget),
        mlx_vlm=dict(status=vlm_status, python=vlm_python, version=MLX_VLM_VERSION),
        configs=[])
    jobs = [dict(system=system, label=label, config=cfg, paths=paths, prompt=prompt, tokens=n_new, repeats=repeats,
                 yardstick="ours" if cfg["kind"] == "plain" else "own")
            for system, label, cfg in CONFIGS if system in args.systems]
    vlm_jobs = [j for j in jobs if j["system"] == "mlx_vlm"] if vlm_python and args.inprocess else []
    if vlm_python:  # the layouts probe (--inprocess: with every mlx-vlm configuration, in one process)
        batch = subprocess_result(vlm_python, dict(jobs=vlm_jobs, probe=dict(paths=paths, prompt=prompt[:16],
                                                                             tokens=8)), args) if not vlm_jobs else \
            run_job(dict(jobs=vlm_jobs, probe=dict(paths=paths, prompt=prompt[:16], tokens=8), system="mlx_vlm",
                         label="all", config={}), vlm_python, args)
        report["mlx_vlm"]["layouts"] = batch.get("layouts") or dict(error=batch.get("error"))
        for j, r in zip(vlm_jobs, batch.get("results") or [dict(error=batch.get("error"))] * len(vlm_jobs)):
            j["result"] = {**r, "machine": batch["machine"]} if "error" not in r else \
                dict(system="mlx_vlm", label=j["label"], config=j["config"], error=r["error"])
    for job in jobs:
        system, label = job["system"], job["label"]
        if "result" in job:
            res = job.pop("result")
        elif system == "mlx_vlm" and not vlm_python:
            res = dict(system=system, label=label, config=job["config"], error=vlm_status)
        else:
            res = run_job(job, vlm_python if system == "mlx_vlm" else None if args.inprocess else sys.executable,
                          args)
        report["configs"].append(res)
        if "error" in res:
            print(f"{NAMES[system]:9} {label:48} failed: {res['error']}", flush=True)
        else:
            m = res["machine"]
            others = "-" if m["other_processes_cores"] is None else f"{m['other_processes_cores']:.2f}"
            print(f"{NAMES[system]:9} {label:48} {res['tps']:6.1f} tok/s  {res['ratio']:.2f}x {res['yardstick']:16}"
                  f" identical {res['identical']!s:5}  RSS {res['peak_rss_mb']:.0f} MB  others {others} cores"
                  f"{'  BUSY' if m['busy'] else ''}", flush=True)
    report["seconds"], report["waited_seconds"] = time.time() - started, args.waited
    report["machine"]["load_average_at_end"] = os.getloadavg()
    write(report, args.out)
    return 0


def write(report: dict, out: Path):
    s = report["settings"]
    busy = [r for r in report["configs"] if r.get("machine", {}).get("busy")]
    layouts = report["mlx_vlm"].get("layouts")
    if isinstance(layouts, list):
        def one(x):
            kind = f"loads as {x['target_class'].rsplit('.', 2)[-2]}" if x.get("target_class") else "does not load"
            if x["ok"]:
                return f"{kind}, MTP runs, {'identical' if x['mtp_identical'] else 'NOT identical'} to its plain greedy"
            return f"{kind}, fails at {x['failed_at']}: `{x['error']}`" + (f" ({x['why']})" if x.get("why") else "")

        lay = "\n".join(f"- {x['layout']}: {one(x)}" for x in layouts)
    else:
        lay = f"- {layouts['error'] if layouts else report['mlx_vlm']['status']}"
    text = (
        f"Peers on one converted pair: CPU figures ({report['machine']['machine']}, {report['machine']['cpus']} "
        f"cores, fp32, {report['machine']['blas']}), batch 1, greedy. Target {s['shape']} (random weights), a "
        f"{s['prompt_tokens']}-token prompt and {s['new_tokens']} new tokens (sliding window {s['sliding_window']}: "
        f"decoding crosses it), medians of {s['repeats']} repeats alternating with the yardstick in the same process "
        + ("(configurations share processes: peak RSS is cumulative). " if s["inprocess"] else
           "(each configuration in its own process, so peak RSS is per configuration). ") + f"α = controlled acceptance (the "
        f"draft replaced by the target's greedy token with probability α); without α, the drafts' own acceptance "
        f"(random weights: about zero). mlx-lm's draft model: a {s['draft_model']['num_hidden_layers']}-layer "
        f"gemma4_text of hidden {s['draft_model']['hidden_size']} with random weights of its own (same "
        f"vocabulary, full attention). 'vs mlx-lm plain' chains ratios each measured within one process. tok/s "
        f"= (n − 1) / (t(n) − t(1)) from whole-call wall clocks, t(1) the same call with max_tokens 1 (median of "
        f"3), so every system is charged the same way for prefill and look-ahead.\n\n"
        + summarise(report) + "\n\n" + notes(report) + "Memory:\n" + memory_lines(report) + "\n\nmlx-vlm "
        f"({report['mlx_vlm']['status']}), which layouts load:\n{lay}\n\n"
        f"Quiet-machine check: load average {report['machine']['load_average_at_start'][0]:.2f} at the start, "
        f"{report['machine']['load_average_at_end'][0]:.2f} at the end; "
        + (f"{len(busy)} of {len(report['configs'])} configuration(s) measured while other processes used more "
           f"than {s['busy_cores']} cores (marked busy: waits of up to {s['max_wait']:.0f} s for a quiet machine and "
           f"{s['reruns']} rerun(s) each did not find one)." if busy else
           "no configuration was measured on a busy machine.") + "\n")
    out.mkdir(parents=True, exist_ok=True)
    (out / "peers.json").write_text(json.dumps(report, indent=1))
    (out / "peers.md").write_text(text)
    print("\n" + text)


if __name__ == "__main__":
    sys.exit(main())
