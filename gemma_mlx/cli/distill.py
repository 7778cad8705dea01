"""`gemma-mlx distill`: train an MTP drafter for a target that has none, with progress bars."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from . import app, err, out, user_errors


class DistillProgress:
    """distill.Reporter drawn with rich: one bar per phase, notes as log lines (kept in a non-terminal log)."""

    def __init__(self):
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        self.bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                            TextColumn("ETA"), TimeRemainingColumn(), TextColumn("{task.fields[info]}"), console=err,
                            transient=True)
        self.task = None

    def phase(self, name, total=None):
        if self.task is not None:
            self.bar.update(self.task, visible=False)
        self.task = self.bar.add_task(name, total=total, info="")
        if not err.is_terminal:
            err.log(name)

    def advance(self, n=1, **info):
        text = " ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in info.items())
        self.bar.update(self.task, advance=n, info=text)

    def note(self, message):
        err.log(message)


@app.command()
@user_errors
def distill(
    target: str = typer.Option(..., "--target", "-t", help="Target model dir or hub id (Gemma 4 or Gemma 3 text)."),
    out_dir: Path = typer.Option(..., "--out", "-o", help="Where to write the drafter (Hugging Face layout)."),
    init: Optional[str] = typer.Option(None, "--init", help="Start from this drafter (a dir or hub id, e.g. the "
                                       "target's released assistant or an earlier distill's output) and fine-tune it "
                                       "on your prompts and corpus; its architecture is kept \\[default: a new "
                                       "drafter]."),
    layers: Optional[int] = typer.Option(None, "--layers", help="Drafter layers \\[default: 4]."),
    hidden_size: Optional[int] = typer.Option(None, "--hidden-size", help="Drafter hidden size d \\[default: 256]."),
    num_centroids: Optional[int] = typer.Option(None, "--num-centroids", help="Centroid-head groups; must divide "
                                                "the vocabulary \\[default: vocab/128]."),
    steps: Optional[int] = typer.Option(None, "--steps", help="Training steps \\[default: 2000 without "
                                        "--time-budget, else until the budget runs out]."),
    time_budget: Optional[float] = typer.Option(None, "--time-budget", help="Wall-clock minutes for the whole run; "
                                                "training stops in time to measure acceptance and save."),
    draft_steps: Optional[int] = typer.Option(None, "--draft-steps", "-k", help="K chained drafter steps in the "
                                              "loss and the acceptance figure \\[default: 4]."),
    prompts: Optional[Path] = typer.Option(None, "--prompts", help="Prompts to continue, one per line, \\n for a "
                                           "newline (a tenth, at most 16, held out) \\[default: built-in varied "
                                           "prompts]."),
    samples: Optional[int] = typer.Option(None, "--samples", help="Sequences the target generates \\[default: 256]."),
    corpus: Optional[list[Path]] = typer.Option(None, "--corpus", help="Text files or directories the target is "
                                                "teacher-forced over (repeatable) \\[default: none]."),
    corpus_tokens: Optional[int] = typer.Option(None, "--corpus-tokens", help="Corpus positions to teacher-force "
                                                "\\[default: 300000]."),
    max_new_tokens: Optional[int] = typer.Option(None, "--max-new-tokens", help="Tokens per generated sequence "
                                                 "\\[default: 128]."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Random seed \\[default: 0]."),
    resume: bool = typer.Option(False, "--resume", help="Continue from the checkpoint in OUT.work."),
    force: bool = typer.Option(False, "--force", help="Replace OUT (and an earlier run's checkpoint)."),
):
    """Train an MTP drafter (gemma4_assistant) for a target that has none, or fine-tune one on your text (--init),
    saved in Hugging Face layout for `gemma-mlx convert`; prints held-out acceptance per draft position.

    Example: gemma-mlx distill --target models/gemma3-270m --out models/gemma3-270m-drafter-hf --corpus ~/texts
    --time-budget 120"""
    from ..distill import Options, prepare, train

    opts = Options(target=target, out=str(out_dir), init=init, layers=layers, hidden_size=hidden_size,
                   num_centroids=num_centroids, steps=steps, time_budget=time_budget, draft_steps=draft_steps,
                   prompts=None if prompts is None else str(prompts), samples=samples,
                   corpus=[str(c) for c in corpus] if corpus else None, corpus_tokens=corpus_tokens,
                   max_new_tokens=max_new_tokens, seed=seed, resume=resume, force=force)
    prepared = prepare(opts)  # bad input fails here, before any output
    progress = DistillProgress()
    with progress.bar:
        result = train(prepared, progress)
    table = Table(title="held-out acceptance per draft position", show_edge=False)
    for col in ("position", "untrained", "trained", "rounds reaching it"):
        table.add_column(col, justify="right")
    before, after = result["before"], result["after"]
    for j in range(result["draft_tokens"]):
        b, a, r = (before["acceptance_by_position"][j], after["acceptance_by_position"][j],
                   after["reached_by_position"][j])
        table.add_row(str(j + 1), "-" if b is None else f"{100 * b:.0f}%", "-" if a is None else f"{100 * a:.0f}%",
                      "-" if r is None else f"{100 * r:.0f}%")
    out.print(table)
    out.print(f"tokens per round {before['tokens_per_round']:.2f} -> {after['tokens_per_round']:.2f} "
              f"(K={result['draft_tokens']}, {result['steps']} steps, {result['training_tokens']} training tokens)")
    err.print(f"[green]wrote[/green] {out_dir} (acceptance.json inside; convert with `gemma-mlx convert {out_dir} "
              "OUT`)")
