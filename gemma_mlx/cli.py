"""The `gemma-mlx` command: chat, generate, convert, info, serve, distill. The only module that prints."""

from __future__ import annotations

import json
import signal
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from . import _blas

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
        from .convert import ConvertError
        from .loader import LoadError
        from .models.base import ConfigError
        from .models.gemma4_assistant import PairError

        try:
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
    import gemma_mlx

    model = model or DEFAULT_MODEL
    guessed = drafter is None
    drafter = assistant_for(model) if guessed else None if drafter.lower() == "none" else drafter
    try:
        engine = gemma_mlx.load(model, drafter=drafter)
    except gemma_mlx.LoadError as e:
        if "cannot download" in str(e):
            raise UserError(f"{model} is not cached and cannot be downloaded (offline?): convert it elsewhere with "
                            "`gemma-mlx convert`, or pass --model DIR") from None
        raise
    if guessed and drafter is None:
        err.print(f"[yellow]no MTP drafter known for {model}: plain decoding (pass --drafter DIR|ID)[/yellow]")
    note_slow_weights(engine.target)
    if VERBOSE:
        err.print(f"[dim]target {model}, drafter {drafter or 'none'}[/dim]")
    return engine


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
    from . import demo

    if model or drafter:
        raise UserError("--demo runs the demo pair: give it without --model / --drafter")
    try:
        return demo.load_pair()
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


def check_sampling(temp: float, top_p: float, max_tokens: int):
    if temp < 0:
        raise UserError(f"--temp must be >= 0, got {temp}")
    if not 0 < top_p <= 1:
        raise UserError(f"--top-p must be in (0, 1], got {top_p}")
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


# --- chat -----------------------------------------------------------------------------------------------------

HELP = """commands:
  /reset            forget the conversation
  /stats            acceptance per draft position of the last reply
  /draft on|off|N|auto   drafting: auto (default), off (plain decoding) or a fixed K
  /system TEXT      set the system prompt (resets the conversation)
  /help             this help
  /exit             quit (Ctrl-D works too; Ctrl-C stops a reply)"""


class CtrlC:
    """Ctrl-C in the chat: a KeyboardInterrupt at once (it stops a prefill, or the line being typed), and a request
    the reply loop also checks after each piece. Python drops a KeyboardInterrupt raised while a finalizer runs
    (printing "Exception ignored in"); the request is not dropped with it. Installed even when the parent process
    started us with SIGINT ignored (Python then keeps it so)."""

    def __init__(self):
        self.pressed = False
        signal.signal(signal.SIGINT, self.handler)

    def handler(self, signum, frame):
        self.pressed = True
        raise KeyboardInterrupt


def stream_reply(engine, messages: list, ctrl_c: CtrlC, **kwargs):
    """Print a reply as it streams; (text, stats of the last piece or None). Ctrl-C stops it, keeping the text."""
    import gemma_mlx

    ctrl_c.pressed = False
    reply, stats = "", None
    try:
        for piece in gemma_mlx.stream_generate(engine, messages, **kwargs):
            out.print(piece.text, end="")
            reply += piece.text
            stats = piece.stats
            if ctrl_c.pressed:  # its KeyboardInterrupt was dropped on the way
                raise KeyboardInterrupt
    except KeyboardInterrupt:
        out.print("[dim] \\[stopped][/dim]", end="")
    out.print()
    return reply, stats


@app.command()
@user_errors
def chat(
    model: Optional[str] = typer.Option(None, "--model", "-m", help=f"Target dir or hub id \\[default: {DEFAULT_MODEL}]."),
    drafter: Optional[str] = typer.Option(None, "--drafter", "-d", help="Drafter dir or hub id, or 'none'. "
                                          "Default: the target's known assistant."),
    draft_tokens: str = typer.Option("auto", "--draft-tokens", "-k", help="Drafted tokens per round: N or auto."),
    temp: float = typer.Option(0.0, "--temp", help="Sampling temperature (0 = greedy)."),
    top_p: float = typer.Option(1.0, "--top-p", help="Nucleus sampling threshold."),
    max_tokens: int = typer.Option(1024, "--max-tokens", help="Longest reply, in tokens."),
    system: Optional[str] = typer.Option(None, "--system", help="System prompt."),
    demo: bool = typer.Option(False, "--demo", help="Chat with the demo pair (Gemma 3 270M + its distilled "
                              "drafter; `make demo` installs it)."),
):
    """Chat in the terminal, with streaming, multi-turn prompt-cache reuse and a speed line after each reply.

    Example: gemma-mlx chat --model models/e2b --drafter models/e2b-assistant --temp 0.7"""
    draft = parse_draft(draft_tokens)
    check_sampling(temp, top_p, max_tokens)
    engine = demo_engine(model, drafter) if demo else load_engine(model, drafter)
    if not getattr(engine.tokenizer, "chat_template", None):
        raise UserError("this checkpoint has no chat template, so it cannot chat: use `gemma-mlx generate --raw`")
    ctrl_c = CtrlC()
    try:
        import readline  # noqa: F401  (line editing and history for input())
    except ImportError:
        pass
    messages = [{"role": "system", "content": system}] if system else []
    last = None
    out.print("[dim]Type a message; /help for commands, Ctrl-D to quit.[/dim]")
    while True:
        try:
            line = input(">>> ")
        except EOFError:
            out.print()
            return
        except KeyboardInterrupt:
            out.print()
            continue
        text = line.strip()
        if not text:
            continue
        if text.startswith("/"):
            command, _, arg = text.partition(" ")
            if command in ("/exit", "/quit"):
                return
            if command == "/help":
                out.print(HELP)
            elif command == "/reset":
                messages = [m for m in messages if m["role"] == "system"]
                engine.session.reset()
                out.print("[dim]conversation reset[/dim]")
            elif command == "/stats":
                out.print(stats_table(last) if last and last.drafted_tokens else "[dim]no drafting yet[/dim]")
                if last:
                    out.print(f"[dim]{status_line(last)}[/dim]")
            elif command == "/draft":
                arg = arg.strip().lower()
                if engine.drafter is None and arg not in ("off", "0"):
                    out.print("[yellow]no drafter loaded: plain decoding[/yellow]")
                    continue
                try:
                    draft = {"on": "auto", "off": 0}.get(arg) if arg in ("on", "off") else parse_draft(arg)
                except UserError as e:
                    out.print(f"[red]{e}[/red]")
                    continue
                out.print(f"[dim]drafting: {draft if draft != 0 else 'off'}[/dim]")
            elif command == "/system":
                messages = [{"role": "system", "content": arg.strip()}] if arg.strip() else []
                engine.session.reset()
                out.print("[dim]system prompt set; conversation reset[/dim]")
            else:
                out.print(f"[red]unknown command {command}[/red] (/help lists them)")
            continue
        messages.append({"role": "user", "content": text})
        reply, stats = stream_reply(engine, messages, ctrl_c, max_tokens=max_tokens, temperature=temp, top_p=top_p,
                                    draft_tokens=draft)
        last = stats or last
        messages.append({"role": "assistant", "content": reply})
        if last:
            out.print(f"[dim]{status_line(last)}[/dim]")


# --- generate -------------------------------------------------------------------------------------------------


@app.command()
@user_errors
def generate(
    prompt: Optional[str] = typer.Option(None, "--prompt", "-p", help="The prompt."),
    prompts_file: Optional[Path] = typer.Option(None, "--prompts-file", help="One prompt per line."),
    model: Optional[str] = typer.Option(None, "--model", "-m", help=f"Target dir or hub id \\[default: {DEFAULT_MODEL}]."),
    drafter: Optional[str] = typer.Option(None, "--drafter", "-d", help="Drafter dir or hub id, or 'none'."),
    draft_tokens: str = typer.Option("auto", "--draft-tokens", "-k", help="Drafted tokens per round: N or auto."),
    temp: float = typer.Option(0.0, "--temp", help="Sampling temperature (0 = greedy)."),
    top_p: float = typer.Option(1.0, "--top-p", help="Nucleus sampling threshold."),
    max_tokens: int = typer.Option(256, "--max-tokens", help="Most new tokens per prompt."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Random seed for sampling."),
    chat_template: bool = typer.Option(True, "--chat/--raw", help="Wrap prompts in the chat template (default) "
                                       "or feed them raw."),
    batch_size: int = typer.Option(1, "--batch-size", "-b", help="Prompts decoded together (batch mode)."),
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
        check_sampling(temp, top_p, max_tokens)
        prompts = None if prompt is None and prompts_file is None else read_prompts(prompt, prompts_file)
        return run_demo(max_tokens if max_tokens != 256 else 64, prompts, chat_template, repeats, as_json)
    if (prompt is None) == (prompts_file is None):
        raise UserError("give exactly one of --prompt and --prompts-file")
    draft = parse_draft(draft_tokens)
    check_sampling(temp, top_p, max_tokens)
    prompts = read_prompts(prompt, prompts_file)
    engine = load_engine(model, drafter)
    inputs = [[{"role": "user", "content": p}] if chat_template else p for p in prompts]
    kwargs = dict(max_tokens=max_tokens, temperature=temp, top_p=top_p, draft_tokens=draft, seed=seed)
    if batch_size > 1:
        if not hasattr(gemma_mlx, "generate_batch"):
            raise UserError("batch mode is not available in this build")
        results = []
        for s in range(0, len(inputs), batch_size):
            results += gemma_mlx.generate_batch(engine, inputs[s:s + batch_size], **kwargs)
    else:
        results = [gemma_mlx.generate(engine, p, reuse_cache=False, **kwargs) for p in inputs]
    for p, r in zip(prompts, results):
        if as_json:
            out.print_json(json.dumps(dict(prompt=p, text=r.text, tokens=r.tokens, finish_reason=r.finish_reason,
                                           stats=r.stats.as_dict())), indent=None)
        else:
            out.print(r.text)
            err.print(f"[dim]{status_line(r.stats)}[/dim]")


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

    from . import demo

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


def _on_cpu() -> bool:
    import mlx.core as mx

    return mx.default_device() == mx.cpu


# --- convert --------------------------------------------------------------------------------------------------


@app.command()
@user_errors
def convert(
    src: str = typer.Argument(..., metavar="SRC", help="A Hugging Face checkpoint (a local dir or a hub id), a Gemma 3 "
                              ".gguf file, or an MLX dir to re-quantize."),
    out_dir: Path = typer.Argument(..., metavar="OUT", help="Where to write the MLX checkpoint."),
    dtype: Optional[str] = typer.Option(None, "--dtype", help="bf16, fp16 or fp32 \\[default: the backend's fast "
                                        "one: fp32 on MLX's CPU backend, bf16 on Metal and CUDA]."),
    quantize: Optional[int] = typer.Option(None, "--quantize", "-q", help="4 or 8 bits."),
    group_size: int = typer.Option(64, "--group-size", help="Quantization group size: 32, 64 or 128."),
    force: bool = typer.Option(False, "--force", help="Replace OUT if it exists."),
):
    """Convert a Gemma 4 target or its assistant (or a Gemma 3 GGUF) to MLX: streams tensor by tensor, writes a temp
    dir renamed when complete.

    Example: gemma-mlx convert google/gemma-4-e2b-it models/e2b"""
    from .convert import convert as run
    from .convert import default_dtype

    path = run(src, out_dir, dtype=dtype, quantize=quantize, group_size=group_size, force=force)
    err.print(f"[green]wrote[/green] {path}")
    note = slow_on_cpu(dtype or default_dtype(), quantize)
    if note:
        err.print(f"[dim]note: {note}[/dim]")


# --- info -----------------------------------------------------------------------------------------------------


@app.command()
@user_errors
def info(
    model: str = typer.Argument(..., help="A model dir or hub id (target or drafter)."),
    drafter: Optional[str] = typer.Option(None, "--drafter", "-d", help="Check whether this drafter fits the target."),
):
    """Architecture, size, dtype/quantization, memory estimate; with --drafter, whether the pair matches.

    Example: gemma-mlx info models/e2b --drafter models/e2b-assistant"""
    from .loader import describe
    from .models.gemma4_assistant import PairError, check_pair

    m = describe(model)  # config and weight headers (a GGUF's metadata): nothing converted or loaded
    cfg = m.config.text if m.is_drafter else m.config
    q = m.raw.get("quantization")
    table = Table(show_header=False, show_edge=False)
    table.add_row("model", f"{m.raw.get('model_type')} ({'drafter' if m.is_drafter else 'target'}) {m.path}")
    kinds = {t: cfg.layer_types.count(t) for t in ("sliding_attention", "full_attention")}
    table.add_row("layers", f"{cfg.num_hidden_layers} ({kinds['sliding_attention']} sliding, "
                            f"{kinds['full_attention']} full), window {cfg.sliding_window}")
    table.add_row("hidden / heads", f"{cfg.hidden_size} / {cfg.num_attention_heads} q, {cfg.num_key_value_heads} kv; "
                                    f"head dim {cfg.head_dim} sliding, {cfg.global_head_dim} full")
    features = [f for f, on in (("PLE", cfg.hidden_size_per_layer_input), ("MoE", cfg.enable_moe_block),
                                ("k_eq_v", cfg.attention_k_eq_v)) if on]
    if cfg.num_kv_shared_layers and not m.is_drafter:
        features.append(f"{cfg.num_kv_shared_layers} kv-shared layers")
    table.add_row("features", ", ".join(features) or "-")
    table.add_row("parameters", f"{m.parameters / 1e6:.1f} M")
    dtypes = ", ".join(t.lower().replace("u32", "uint32") for t in m.dtypes)
    table.add_row("dtype", dtypes + (f"; {q['bits']}-bit, group {q['group_size']}" if q else "") +
                  ("; converted to fp32/bf16 when loaded" if m.path.suffix == ".gguf" else ""))
    table.add_row("weights", f"{m.nbytes / 2**30:.2f} GiB")
    if not m.is_drafter:
        table.add_row("KV per 1k tokens", f"{kv_bytes_per_token(cfg, 2) * 1000 / 2**20:.1f} MiB (bf16)")
    out.print(table)
    if drafter:
        if m.is_drafter:
            raise UserError(f"{model} is a drafter; pass the target first")
        d = describe(drafter)
        if not d.is_drafter:
            raise UserError(f"{drafter} is not a drafter (gemma4_assistant)")
        try:
            check_pair(m.config, d.config)
        except PairError as e:
            out.print(f"[red]pair does not match:[/red] {e}")
            raise typer.Exit(1)
        out.print(f"[green]pair matches[/green]: drafter {d.config.text.num_hidden_layers} layers, hidden "
                  f"{d.config.text.hidden_size}, {'centroid' if d.config.use_ordered_embeddings else 'dense'} head")


@app.command()
@user_errors
def serve(
    model: Optional[str] = typer.Option(None, "--model", "-m", help=f"Target dir or hub id \\[default: {DEFAULT_MODEL}]."),
    drafter: Optional[str] = typer.Option(None, "--drafter", "-d", help="Drafter dir or hub id, or 'none'."),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to bind (loopback by default)."),
    port: int = typer.Option(8080, "--port", help="Port."),
    max_batch: int = typer.Option(8, "--max-batch", help="Most requests decoded together."),
    draft_tokens: str = typer.Option("auto", "--draft-tokens", "-k", help="Drafted tokens per round: N or auto."),
    demo: bool = typer.Option(False, "--demo", help=f"Serve the demo pair as model {DEMO_ID!r}."),
):
    """An OpenAI-compatible server (/v1/chat/completions, /v1/completions, /v1/models, /health); concurrent
    requests share batched MTP rounds.

    Example: gemma-mlx serve --model models/e2b --drafter models/e2b-assistant --port 8080"""
    from .server import serve as run

    if max_batch < 1:
        raise UserError(f"--max-batch must be >= 1, got {max_batch}")
    draft = parse_draft(draft_tokens)
    engine = demo_engine(model, drafter) if demo else load_engine(model, drafter)
    model_id = DEMO_ID if demo else Path(model).name if model and Path(model).is_dir() else (model or DEFAULT_MODEL)
    err.print(f"serving {model_id} on http://{host}:{port}/v1 (drafter: {'yes' if engine.drafter else 'none'})")
    run(engine, model_id, host, port, max_batch, draft)


# --- distill --------------------------------------------------------------------------------------------------


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
    prompts: Optional[Path] = typer.Option(None, "--prompts", help="Prompts to continue, one per line (a tenth "
                                           "held out) \\[default: built-in varied prompts]."),
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
    """Train an MTP drafter (gemma4_assistant) for a target that has none, saved in Hugging Face layout for
    `gemma-mlx convert`; prints held-out acceptance per draft position.

    Example: gemma-mlx distill --target models/gemma3-270m --out models/gemma3-270m-drafter-hf --corpus ~/texts
    --time-budget 120"""
    from .distill import Options, prepare, train

    opts = Options(target=target, out=str(out_dir), layers=layers, hidden_size=hidden_size,
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


def kv_bytes_per_token(cfg, itemsize: int) -> int:
    """Full layers grow per token; sliding rings are bounded (counted at their window)."""
    per_layer = [2 * cfg.layer_kv_heads(i) * cfg.layer_head_dim(i) * itemsize for i in range(cfg.first_shared_layer)]
    return sum(b for i, b in enumerate(per_layer) if cfg.layer_types[i] == "full_attention")


def main():
    app()


if __name__ == "__main__":
    main()
