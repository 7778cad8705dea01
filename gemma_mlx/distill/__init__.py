"""Distillation: train a `gemma4_assistant` MTP drafter for a target that has none (`gemma-mlx distill`).

One module per step below: drafter_init.py (1), data.py (2), loss.py (3, 4), run.py (5 and the run), options.py.

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

from .data import Batch, collect_generated, corpus_prompts, generate_batch_sequences, generation_picks, teacher_force
from .drafter_init import balanced_kmeans, drafter_config, new_drafter
from .loss import drafter_steps, training_masks
from .options import EVAL_PROMPTS, GENERATION_BATCH, PREFIX, TRAIN_PROMPTS, DistillError, Options, Reporter, work_dir
from .run import distill, prepare, train

__all__ = ["EVAL_PROMPTS", "GENERATION_BATCH", "PREFIX", "TRAIN_PROMPTS", "Batch", "DistillError", "Options",
           "Reporter", "balanced_kmeans", "collect_generated", "corpus_prompts", "distill", "drafter_config",
           "drafter_steps", "generate_batch_sequences", "generation_picks", "new_drafter", "prepare", "teacher_force",
           "train", "training_masks", "work_dir"]
