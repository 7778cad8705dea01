"""Started by tests/test_pipeline.py under mlx.launch: greedy decoding of a target split across the launched
processes, with its drafter; rank 0 writes what it generated and the split's layout to OUT (JSON).

    mlx.launch --backend ring -n 2 python tests/pipeline_worker.py TARGET DRAFTER CASE.json OUT

CASE.json: {"prompts": [...], "references": [prompt + the oracle's greedy continuation, ...], "max_tokens": N}. The
drafts of the last rank (where they are made) are the real drafter's, each replaced by the reference token with
probability 0.7 (bench/controlled.py), so rounds accept all, some and none of their drafts. Every prompt alone at
K = 0, 3 and auto, then all of them in one batch at K = 3 and auto; end of sequence never stops a row (the oracle's
greedy runs to max tokens too). Last, the longest prompt sampled (temperature 0.8, seed 11) at K = 0 and 3."""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # bench/

import gemma_mlx  # noqa: E402
from bench.controlled import ControlledDrafter  # noqa: E402
from gemma_mlx import pipeline  # noqa: E402
from gemma_mlx.decode import Decoder  # noqa: E402
from gemma_mlx.draft_length import DraftLength  # noqa: E402
from gemma_mlx.sampling import SamplingParams  # noqa: E402

target, drafter, case_file, out = sys.argv[1:]
case = json.loads(Path(case_file).read_text())
prompts, max_tokens = case["prompts"], case["max_tokens"]
reference = {tuple(r[: len(p)]): r for p, r in zip(prompts, case["references"])}
engine = gemma_mlx.load(target, drafter, progress=False, group=pipeline.join())
split = engine.target.split


def controlled(decoder: Decoder) -> Decoder:
    decoder.drafter = ControlledDrafter(engine.drafter, lambda: [reference[tuple(r.prompt)] for r in decoder.rows],
                                        alpha=0.7, seed=5)
    return decoder


if split.rank != 0:
    def build(setup):
        return controlled(Decoder(engine.target, engine.drafter, SamplingParams(**setup["params"]),
                                  eos_ids=setup["eos_ids"], chunk=setup["chunk"]))

    pipeline.follow(split, build)
    sys.exit(0)


def run(k, batch: list, params=SamplingParams(), seed=None) -> tuple[list, list]:
    """(tokens of each prompt, (K, accepted) of each round)."""
    decoder = controlled(Decoder(engine.target, engine.drafter, params,
                                 draft=DraftLength(fixed=None if k == "auto" else k), chunk=8))
    rows = [decoder.add(p, max_tokens, seed=seed) for p in batch]
    while decoder.rows:
        decoder.step()
    decoder.close()
    return [r.tokens for r in rows], [h for r in rows for h in zip(r.stats.k_history, r.stats.accepted_history)]


result = {"alone": {}, "batch": {}, "rounds": [], "distributed": split.describe()}
for k in (0, 3, "auto"):
    runs = [run(k, [p]) for p in prompts]
    result["alone"][str(k)] = [tokens[0] for tokens, _ in runs]
    result["rounds"] += [h for _, rounds in runs for h in rounds]
for k in (3, "auto"):
    result["batch"][str(k)], rounds = run(k, prompts)
    result["rounds"] += rounds
result["sampled"] = {str(k): run(k, [max(prompts, key=len)], SamplingParams(temperature=0.8), seed=11)[0][0]
                     for k in (0, 3)}
pipeline.quit_followers(split)
Path(out).write_text(json.dumps(result))
