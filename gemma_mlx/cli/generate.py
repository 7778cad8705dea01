"""`gemma-mlx generate`: prompts in, text out (or --json), and `--demo`: MTP against plain decoding on the demo pair."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from . import (
    DRAFT_TOKENS,
    MODEL,
    TEMP,
    TOP_K,
    TOP_P,
    UserError,
    _on_cpu,
    app,
    check_sampling,
    demo_engine,
    err,
    fail,
    load_engine,
    out,
    parse_draft,
    status_line,
    user_errors,
)


@app.command()
@user_errors
def generate(
    prompt: Optional[str] = typer.Option(None, "--prompt", "-p", help="The prompt."),
    prompts_file: Optional[Path] = typer.Option(None, "--prompts-file", help="One prompt per line."),
    model: Optional[str] = MODEL,
    drafter: Optional[str] = typer.Option(None, "--drafter", "-d", help="Drafter dir or hub id, or 'none'."),
    draft_tokens: str = DRAFT_TOKENS,
    temp: float = TEMP,
    top_p: float = TOP_P,
    top_k: int = TOP_K,
    seed: Optional[int] = typer.Option(None, "--seed", help="Random seed for sampling."),
    max_tokens: int = typer.Option(256, "--max-tokens", help="Most new tokens per prompt."),
    chat_template: bool = typer.Option(True, "--chat/--raw", help="Wrap prompts in the chat template (default) "
                                       "or feed them raw."),
    batch_size: int = typer.Option(1, "--batch-size", "-b", help="Prompts decoded together (batch mode)."),
    images: Optional[list[Path]] = typer.Option(None, "--image", help="An image for every prompt, before its text "
                                                "(repeatable; needs a target converted from a multimodal gemma4)."),
    as_json: bool = typer.Option(False, "--json", help="One JSON object per prompt on stdout (text, tokens, stats)."),
    demo: bool = typer.Option(False, "--demo", help="The demo pair (Gemma 3 270M + its distilled drafter): each "
                              "prompt greedy with MTP and without, compared \\[default prompts: 4 built-in ones, "
                              "64 tokens]."),
    repeats: int = typer.Option(2, "--repeats", help="With --demo: runs of each prompt, alternating MTP and plain."),
):
    """Generate once: text on stdout, stats on stderr (or --json for scripts).

    Example: gemma-mlx generate --model models/e2b --prompt 'Why is the sky blue?' --max-tokens 100"""
    import gemma_mlx

    if batch_size < 1:
        raise UserError(f"--batch-size must be >= 1, got {batch_size}")
    if demo:
        if repeats < 1:
            raise UserError(f"--repeats must be >= 1, got {repeats}")
        check_sampling(temp, top_p, top_k, max_tokens)
        prompts = None if prompt is None and prompts_file is None else read_prompts(prompt, prompts_file)
        return run_demo(max_tokens if max_tokens != 256 else 64, prompts, chat_template, repeats, as_json)
    if (prompt is None) == (prompts_file is None):
        raise UserError("give exactly one of --prompt and --prompts-file")
    draft = parse_draft(draft_tokens)
    check_sampling(temp, top_p, top_k, max_tokens)
    prompts = read_prompts(prompt, prompts_file)
    engine = load_engine(model, drafter)
    inputs = prompt_inputs(prompts, chat_template, images or [])
    kwargs = dict(max_tokens=max_tokens, temperature=temp, top_p=top_p, top_k=top_k, draft_tokens=draft,
                  seed=seed)
    if batch_size > 1:
        if not hasattr(gemma_mlx, "generate_batch"):
            raise UserError("batch mode is not available in this build")
        results = []
        for s in range(0, len(inputs), batch_size):
            results += gemma_mlx.generate_batch(engine, inputs[s:s + batch_size], **kwargs)
    else:
        results = [gemma_mlx.generate(engine, p, reuse_cache=False, **kwargs) for p in inputs]
    split = engine.target.split
    for p, r in zip(prompts, results):
        if as_json:
            record = dict(prompt=p, text=r.text, tokens=r.tokens, finish_reason=r.finish_reason,
                          stats=r.stats.as_dict())
            if split.size > 1:
                record["distributed"] = split.describe()
            out.print_json(json.dumps(record), indent=None)
        else:
            out.print(r.text)
            err.print(f"[dim]{status_line(r.stats)}[/dim]")


def prompt_inputs(prompts: list[str], chat_template: bool, images: list[Path]) -> list:
    """What generate takes for each prompt: the text, or a user message (the images first, then the text)."""
    if not chat_template:
        if images:
            raise UserError("--image needs the chat template: drop --raw")
        return prompts
    parts = [{"type": "image", "image": str(i)} for i in images]
    return [[{"role": "user", "content": parts + [{"type": "text", "text": p}] if parts else p}] for p in prompts]


def read_prompts(prompt: Optional[str], prompts_file: Optional[Path]) -> list[str]:
    if prompts_file is None:
        return [prompt]
    if prompt is not None:
        raise UserError("give exactly one of --prompt and --prompts-file")
    if not prompts_file.is_file():
        raise UserError(f"{prompts_file}: no such file")
    prompts = [line for line in prompts_file.read_text().splitlines() if line.strip()]
    if not prompts:
        raise UserError(f"{prompts_file}: no prompts in it (one per line)")
    return prompts


def run_demo(max_tokens: int, texts: Optional[list], chat_template: bool, repeats: int, as_json: bool):
    """Gemma 3 270M with its distilled drafter: each prompt with MTP and without (`repeats` alternating runs), then
    the comparison table, or with --json one object per prompt."""
    import statistics

    from .. import demo

    engine = demo_engine()
    group = "chat" if chat_template else "prose"
    prompts = demo.by_label(demo.DEMO) if texts is None else [
        demo.Prompt(f"prompt {i + 1}", t, group) for i, t in enumerate(texts)]
    err.print(f"[dim]demo pair: Gemma 3 270M ({demo.target_path().name}, fp32) + {demo.DRAFTER.name}; "
              f"{len(prompts)} prompts × {max_tokens} tokens, greedy, {repeats} alternating runs each[/dim]")

    def show(c):
        if as_json:
            out.print_json(json.dumps(c.as_dict()), indent=None)
        else:
            shown = c.prompt.text if c.prompt.group != "chat" else f"{c.prompt.text}\n"
            out.print(f"[bold]{shown}[/bold]{c.text}\n")

    results = demo.compare(engine, prompts, max_tokens=max_tokens, repeats=repeats, on_result=show)
    if not as_json:
        out.print(demo_table(results))
        speedups = [c.speedup for c in results]
        out.print(f"median speed-up {statistics.median(speedups):.2f}x; acceptance by draft position: "
                  + " ".join(f"{a:.2f}" for a in demo.acceptance_by_position(results)))
    if not all(c.identical for c in results):
        fail("MTP output differs from plain greedy decoding (a bug: please report it)")


def demo_table(results) -> Table:
    """One row per prompt, medians of its runs; fits 80 columns (a pipe's width)."""
    import statistics

    table = Table(title="MTP vs plain decoding (same weights, CPU figures)" if _on_cpu() else
                  "MTP vs plain decoding (same weights)", pad_edge=False)
    for col in ("prompt", "kind", "plain tok/s", "MTP tok/s", "speed-up", "tok/round", "same"):
        table.add_column(col, justify="left" if col in ("prompt", "kind") else "right")
    for c in results:
        table.add_row(c.prompt.label[:16], c.prompt.group, f"{statistics.median(c.plain_tps):.1f}",
                      f"{statistics.median(c.mtp_tps):.1f}", f"{c.speedup:.2f}x",
                      f"{statistics.median(c.accepted_length):.2f}", "yes" if c.identical else "[red]NO[/red]")
    return table
