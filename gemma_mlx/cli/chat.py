"""`gemma-mlx chat`: the terminal chat (streaming, multi-turn cache reuse, slash commands, Ctrl-C)."""

from __future__ import annotations

import signal
from dataclasses import dataclass, field
from typing import Optional

import typer

from . import (
    DRAFT_TOKENS,
    MODEL,
    TEMP,
    TOP_K,
    TOP_P,
    UserError,
    app,
    check_sampling,
    demo_engine,
    load_engine,
    out,
    parse_draft,
    stats_table,
    status_line,
    user_errors,
)

HELP = """commands:
  /reset            forget the conversation
  /stats            acceptance per draft position of the last reply
  /draft on|off|N|auto   drafting: auto (default), off (plain decoding) or a fixed K
  /system TEXT      set the system prompt (resets the conversation)
  /image PATH       attach an image to your next message (a target with a vision tower)
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
    model: Optional[str] = MODEL,
    drafter: Optional[str] = typer.Option(None, "--drafter", "-d", help="Drafter dir or hub id, or 'none'. "
                                          "Default: the target's known assistant."),
    draft_tokens: str = DRAFT_TOKENS,
    temp: float = TEMP,
    top_p: float = TOP_P,
    top_k: int = TOP_K,
    max_tokens: int = typer.Option(1024, "--max-tokens", help="Longest reply, in tokens."),
    system: Optional[str] = typer.Option(None, "--system", help="System prompt."),
    demo: bool = typer.Option(False, "--demo", help="Chat with the demo pair (Gemma 3 270M + its distilled "
                              "drafter; `make demo` installs it)."),
):
    """Chat in the terminal, with streaming, multi-turn prompt-cache reuse and a speed line after each reply.

    Example: gemma-mlx chat --model models/e2b --drafter models/e2b-assistant --temp 0.7"""
    draft = parse_draft(draft_tokens)
    check_sampling(temp, top_p, top_k, max_tokens)
    engine = demo_engine(model, drafter) if demo else load_engine(model, drafter)
    if not getattr(engine.tokenizer, "chat_template", None):
        raise UserError("this checkpoint has no chat template, so it cannot chat: use `gemma-mlx generate --raw`")
    ctrl_c = CtrlC()
    try:
        import readline  # noqa: F401  (line editing and history for input())
    except ImportError:
        pass
    conv = Conversation(engine, [{"role": "system", "content": system}] if system else [], draft)
    out.print("[dim]Type a message; /help for commands, Ctrl-D to quit.[/dim]")
    while (text := read_line()) is not None:
        if text.startswith("/"):
            if not slash_command(conv, text):
                return
            continue
        conv.messages.append(user_message(conv, text))
        reply, stats = stream_reply(engine, conv.messages, ctrl_c, max_tokens=max_tokens, temperature=temp,
                                    top_p=top_p, top_k=top_k, draft_tokens=conv.draft)
        conv.last = stats or conv.last
        conv.messages.append({"role": "assistant", "content": reply})
        if conv.last:
            out.print(f"[dim]{status_line(conv.last)}[/dim]")


@dataclass
class Conversation:
    """What the chat loop carries between turns: the engine, the messages so far, the draft setting, the last stats."""

    engine: object
    messages: list
    draft: object
    last: object = None
    images: list = field(default_factory=list)  # attached with /image, for the next message


def user_message(conv: Conversation, text: str) -> dict:
    """The next user message: the text, after the images attached since the last one."""
    if not conv.images:
        return {"role": "user", "content": text}
    parts, conv.images = [{"type": "image", "image": p} for p in conv.images], []
    return {"role": "user", "content": parts + [{"type": "text", "text": text}]}


def attach_image(conv: Conversation, path: str):
    from ..image import ImageError, read_image

    if not conv.engine.has_vision:
        out.print("[red]this model has no vision tower[/red] (convert the multimodal gemma4 checkpoint)")
        return
    try:
        read_image(path)
    except ImageError as e:
        out.print(f"[red]{e}[/red]")
        return
    conv.images.append(path)
    out.print(f"[dim]{path} attached to your next message[/dim]")


def read_line() -> Optional[str]:
    """The next non-empty line typed (Ctrl-C clears the line), None at Ctrl-D."""
    while True:
        try:
            text = input(">>> ").strip()
        except EOFError:
            out.print()
            return None
        except KeyboardInterrupt:
            out.print()
            continue
        if text:
            return text


def slash_command(conv: Conversation, text: str) -> bool:
    """Run a /command; False when it ends the chat."""
    command, _, arg = text.partition(" ")
    arg = arg.strip()
    if command in ("/exit", "/quit"):
        return False
    if command == "/help":
        out.print(HELP)
    elif command in ("/reset", "/system"):
        conv.messages = [m for m in conv.messages if m["role"] == "system"] if command == "/reset" else (
            [{"role": "system", "content": arg}] if arg else [])
        conv.engine.prefix_cache.clear()
        out.print("[dim]conversation reset[/dim]" if command == "/reset" else
                  "[dim]system prompt set; conversation reset[/dim]")
    elif command == "/stats":
        last = conv.last
        out.print(stats_table(last) if last and last.drafted_tokens else "[dim]no drafting yet[/dim]")
        if last:
            out.print(f"[dim]{status_line(last)}[/dim]")
    elif command == "/draft":
        set_draft(conv, arg.lower())
    elif command == "/image":
        attach_image(conv, arg)
    else:
        out.print(f"[red]unknown command {command}[/red] (/help lists them)")
    return True


def set_draft(conv: Conversation, arg: str):
    if conv.engine.drafter is None and arg not in ("off", "0"):
        out.print("[yellow]no drafter loaded: plain decoding[/yellow]")
        return
    try:
        conv.draft = {"on": "auto", "off": 0}.get(arg) if arg in ("on", "off") else parse_draft(arg)
    except UserError as e:
        out.print(f"[red]{e}[/red]")
        return
    out.print(f"[dim]drafting: {conv.draft if conv.draft != 0 else 'off'}[/dim]")
