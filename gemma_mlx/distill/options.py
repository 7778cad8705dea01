"""What a distillation takes (Options, resolved against defaults or a checkpoint's), its progress sink (Reporter),
and the work dir's files."""

from __future__ import annotations

import functools
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import mlx.core as mx

from .. import corpus as corpus_text

# Prompts the target continues to make training data (varied registers; none on the demo's or the held-out prompts'
# topics), and held-out ones for acceptance.
_PROMPTS = json.loads((Path(__file__).parent.parent / "distill_prompts.json").read_text())
TRAIN_PROMPTS, EVAL_PROMPTS = _PROMPTS["train"], _PROMPTS["held_out"]
WORK_SUFFIX = ".work"
HELD_OUT_MAX = 16  # held-out prompts measured after every epoch
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
    init: Optional[str] = None  # a drafter to start from (fine-tune it, keeping its architecture) instead of a new one
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

    ARCH = ("init", "layers", "hidden_size", "num_centroids", "draft_steps", "max_new_tokens", "seed")
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


def read_prompts(opts: Options) -> tuple[list[str], list[str]]:
    """(training prompts, held-out prompts): the built-in lists, or a file's lines (`\\n` in a line stands for a
    newline) with its last tenth, at most HELD_OUT_MAX, held out."""
    if opts.prompts is None:
        return TRAIN_PROMPTS, EVAL_PROMPTS
    path = Path(opts.prompts)
    if not path.is_file():
        raise DistillError(f"{path}: no such prompts file")
    lines = [line.replace("\\n", "\n") for line in path.read_text().splitlines() if line.strip()]
    if len(lines) < 2:
        raise DistillError(f"{path}: needs at least 2 prompts (one line each; a tenth are held out)")
    held = min(max(1, len(lines) // 10), HELD_OUT_MAX)
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
    if opts.init is not None and not opts.resume:
        given = [n for n in ("layers", "hidden_size", "num_centroids") if getattr(opts, n) is not None]
        if given:
            raise DistillError(f"--init keeps that drafter's architecture: drop --{given[0].replace('_', '-')}")
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
    start: object = None  # the --init drafter (None: a new one)

    @functools.cached_property
    def windows(self) -> list[list[int]]:
        """The corpus tokenized and cut into windows, shuffled with the seed (the same order on a resume); once."""
        return corpus_text.windows(self.engine.encode, self.documents, WINDOW, self.opts.seed)
