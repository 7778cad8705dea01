"""The `gemma-mlx` command: the app, what its commands share (loading, flag checks, the speed line, one-line
errors) and `main`. Each command lives in its own module of this package (chat, generate, checkpoints: convert and
info, serve, distill); this package is the only code that prints."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from .. import _blas

app = typer.Typer(add_completion=False, no_args_is_help=True, rich_markup_mode="rich",
                  help="Gemma 4 on MLX with its MTP drafters: lossless speculative decoding (the same tokens as plain "
                       "decoding, fewer target passes).\n\n"
                       "Examples:\n\n"
                       "  gemma-mlx chat --demo\n\n"
                       "  gemma-mlx chat\n\n"
                       "  gemma-mlx chat --model models/e2b --drafter models/e2b-assistant --temp 0.7\n\n"
                       "  gemma-mlx generate --prompt 'Why is the sky blue?' --max-tokens 100\n\n"
                       "  gemma-mlx convert google/gemma-4-e2b-it models/e2b --quantize 4\n\n"
                       "  gemma-mlx info models/e2b --drafter models/e2b-assistant")
if hasattr(typer.core.TyperOption, "display_type_rich"):  # typer >= 0.2x shows every flag as `<bool>`: not for flags
    _show_type = typer.core.TyperOption.display_type_rich
    typer.core.TyperOption.display_type_rich = lambda self, ctx: None if self.is_flag else _show_type(self, ctx)
out = Console(highlight=False, soft_wrap=True)
err = Console(stderr=True, highlight=False, soft_wrap=True)

DEFAULT_MODEL = "google/gemma-4-e2b-it"
ASSISTANTS = {  # a known target finds its MTP assistant by name
    "gemma-4-e2b": "google/gemma-4-e2b-it-assistant",
    "gemma-4-e4b": "google/gemma-4-e4b-it-assistant",
    "gemma-4-26b-a4b": "google/gemma-4-26b-a4b-it-assistant",
    "gemma-4-31b": "google/gemma-4-31b-it-assistant",
}
VERBOSE = False

# options that chat and generate share
MODEL = typer.Option(None, "--model", "-m", help=f"Target dir or hub id \\[default: {DEFAULT_MODEL}].")
DRAFT_TOKENS = typer.Option("auto", "--draft-tokens", "-k", help="Drafted tokens per round: N or auto.")
TEMP = typer.Option(0.0, "--temp", help="Sampling temperature (0 = greedy).")
TOP_P = typer.Option(1.0, "--top-p", help="Nucleus sampling threshold.")
TOP_K = typer.Option(0, "--top-k", help="Sample from the k most likely tokens only (0 = all; Gemma's recommended "
                     "sampling is --temp 1 --top-k 64 --top-p 0.95).")


class UserError(Exception):
    """Shown as one red line; exit code 1."""


def fail(message: str):
    err.print(f"[red]error:[/red] {message}")
    raise typer.Exit(1)


def user_errors(fn):
    """Every expected failure becomes one line and exit code 1; tracebacks are for bugs."""
    import functools

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from ..convert import ConvertError
        from ..loader import LoadError
        from ..models.base import ConfigError
        from ..models.gemma4_assistant import PairError

        from .. import pipeline

        try:
            with pipeline.exit_on_lost_peer(pipeline.launched()):  # a pipeline rank that lost its peers (loading)
                return fn(*args, **kwargs)
        except (UserError, LoadError, PairError, ConfigError, ConvertError, ValueError, FileNotFoundError) as e:
            fail(str(e).splitlines()[0] if str(e) else type(e).__name__)

    return wrapper


@app.callback()
def main_options(verbose: bool = typer.Option(False, "--verbose", "-v", help="Show details (BLAS in use, paths).")):
    global VERBOSE
    VERBOSE = verbose
    if verbose:
        err.print(f"[dim]{_blas.status}[/dim]")


# --- loading --------------------------------------------------------------------------------------------------


def assistant_for(model: str) -> Optional[str]:
    """The MTP assistant of a known target: by hub name, or a sibling dir `<name>-assistant`."""
    path = Path(model).expanduser()
    if path.is_dir():
        sibling = path.with_name(path.name + "-assistant")
        return str(sibling) if sibling.is_dir() else None
    name = model.split("/")[-1].lower()
    return next((a for key, a in ASSISTANTS.items() if name.startswith(key)), None)


def load_engine(model: Optional[str], drafter: Optional[str]):
    """The engine of --model / --drafter. Under mlx.launch with several processes the target is split across them
    (pipeline.py): rank 0 returns the engine and runs the command; every other rank follows it, then exits."""
    import gemma_mlx
    from .. import pipeline

    model = model or DEFAULT_MODEL
    guessed = drafter is None
    drafter = assistant_for(model) if guessed else None if drafter.lower() == "none" else drafter
    group = pipeline.join()
    leader = group is None or group.rank() == 0
    try:
        engine = gemma_mlx.load(model, drafter=drafter, progress=leader, group=group)
    except gemma_mlx.LoadError as e:
        if "cannot download" in str(e):
            raise UserError(f"{model} is not cached and cannot be downloaded (offline?): convert it elsewhere with "
                            "`gemma-mlx convert`, or pass --model DIR") from None
        raise
    if leader and guessed and drafter is None:
        err.print(f"[yellow]no MTP drafter known for {model}: plain decoding (pass --drafter DIR|ID)[/yellow]")
    if leader:
        note_slow_weights(engine.target)
    if VERBOSE and leader:
        err.print(f"[dim]target {model}, drafter {drafter or 'none'}[/dim]")
    return lead_or_follow(engine)


def lead_or_follow(engine):
    """Rank 0 of a pipeline (or a process alone) gets the engine back; the others follow rank 0 until it quits."""
    import atexit

    from .. import pipeline
    from ..generate import follow

    split = engine.target.split
    if split.size == 1:
        return engine
    if split.rank == 0:
        err.print(f"[dim]split over {split.size} ranks: layers "
                  + ", ".join(f"{a}-{e - 1}" for a, e in split.ranges) + "[/dim]")
        atexit.register(pipeline.quit_followers, split)
        return engine
    follow(engine)
    raise typer.Exit(0)


def slow_on_cpu(dtype: Optional[str], bits: Optional[int]) -> Optional[str]:
    """What weights of this kind cost on MLX's CPU backend (None when they are the fast kind, or not on the CPU)."""
    if not _on_cpu():
        return None
    if bits:
        return f"{bits}-bit weights decode about 3x slower than fp32 on MLX's CPU backend (quantize for Metal)"
    if dtype in ("bf16", "fp16"):
        return f"{dtype} weights decode about 4x slower than fp32 on MLX's CPU backend (fp32 is its default)"
    return None


def note_slow_weights(model):
    """Once per load: a dim line when the target's weights are a slow kind on this backend."""
    import mlx.core as mx
    from mlx.utils import tree_flatten

    kinds = {v.dtype for _, v in tree_flatten(model.parameters())}
    bits = next((m.bits for m in model.modules() if hasattr(m, "bits") and "scales" in m), None)
    note = slow_on_cpu("bf16" if mx.bfloat16 in kinds else "fp16" if mx.float16 in kinds else None, bits)
    if note:
        err.print(f"[dim]note: {note}[/dim]")


DEMO_ID = "gemma-3-270m-demo"


def demo_engine(model: Optional[str] = None, drafter: Optional[str] = None):
    """The demo pair (Gemma 3 270M + its distilled drafter), for --demo."""
    from .. import demo

    if model or drafter:
        raise UserError("--demo runs the demo pair: give it without --model / --drafter")
    from .. import pipeline

    try:
        return lead_or_follow(demo.load_pair(pipeline.join()))
    except demo.DemoError as e:
        raise UserError(str(e)) from None


def parse_draft(value: str):
    if value == "auto":
        return "auto"
    try:
        k = int(value)
    except ValueError:
        raise UserError(f"--draft-tokens must be a number 0-8 or 'auto', got {value!r}") from None
    if not 0 <= k <= 8:
        raise UserError(f"--draft-tokens must be between 0 and 8, got {k}")
    return k


def check_sampling(temp: float, top_p: float, top_k: int, max_tokens: int):
    if temp < 0:
        raise UserError(f"--temp must be >= 0, got {temp}")
    if not 0 < top_p <= 1:
        raise UserError(f"--top-p must be in (0, 1], got {top_p}")
    if top_k < 0:
        raise UserError(f"--top-k must be >= 0, got {top_k}")
    if max_tokens < 1:
        raise UserError(f"--max-tokens must be >= 1, got {max_tokens}")


def status_line(stats) -> str:
    parts = [f"{stats.tokens_per_second:.1f} tok/s", f"TTFT {stats.time_to_first_token:.2f}s",
             f"prefill {stats.prefill_tokens} tok", f"{stats.generated_tokens} tok"]
    if stats.drafted_tokens:
        parts += [f"accepted {stats.mean_accepted_length:.2f}/round", f"acceptance {100 * stats.acceptance:.0f}%",
                  f"K {stats.k_last}"]
    else:
        parts.append("plain decoding")
    return " · ".join(parts)


def stats_table(stats) -> Table:
    table = Table(title="acceptance per draft position", show_edge=False)
    for col in ("position", "reached", "accepted", "rate"):
        table.add_column(col, justify="right")
    for j, (n, a) in enumerate(zip(stats.attempted_by_position, stats.accepted_by_position), 1):
        if n:
            table.add_row(str(j), str(n), str(a), f"{100 * a / n:.0f}%")
    return table


def _on_cpu() -> bool:
    import mlx.core as mx

    return mx.default_device() == mx.cpu


def main():
    app()


# each module adds its commands to app; help lists them in this order
from . import chat, generate, checkpoints, serve, distill  # noqa: E402,F401,I001
from .chat import CtrlC, stream_reply  # noqa: E402,F401
