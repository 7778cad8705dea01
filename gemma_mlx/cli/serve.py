"""`gemma-mlx serve`: the OpenAI-compatible server."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from . import DEFAULT_MODEL, DEMO_ID, UserError, app, demo_engine, err, load_engine, parse_draft, user_errors


@app.command()
@user_errors
def serve(
    model: Optional[str] = typer.Option(None, "--model", "-m", help=f"Target dir or hub id \\[default: {DEFAULT_MODEL}]."),
    drafter: Optional[str] = typer.Option(None, "--drafter", "-d", help="Drafter dir or hub id, or 'none'."),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to bind (loopback by default)."),
    port: int = typer.Option(8080, "--port", help="Port."),
    max_batch: int = typer.Option(8, "--max-batch", help="Most requests decoded together."),
    draft_tokens: str = typer.Option("auto", "--draft-tokens", "-k", help="Drafted tokens per round: N or auto."),
    cache_mb: float = typer.Option(1024, "--cache-mb", help="Memory for the caches of finished requests, kept "
                                   "so that a request resending a conversation prefills only its new tokens "
                                   "(0: none)."),
    demo: bool = typer.Option(False, "--demo", help=f"Serve the demo pair as model {DEMO_ID!r}."),
):
    """An OpenAI-compatible server (/v1/chat/completions, /v1/completions, /v1/models, /health); concurrent
    requests share batched MTP rounds.

    Example: gemma-mlx serve --model models/e2b --drafter models/e2b-assistant --port 8080"""
    from ..server import serve as run

    if max_batch < 1:
        raise UserError(f"--max-batch must be >= 1, got {max_batch}")
    if cache_mb < 0:
        raise UserError(f"--cache-mb must be >= 0, got {cache_mb}")
    draft = parse_draft(draft_tokens)
    engine = demo_engine(model, drafter) if demo else load_engine(model, drafter)
    model_id = DEMO_ID if demo else Path(model).name if model and Path(model).is_dir() else (model or DEFAULT_MODEL)
    err.print(f"serving {model_id} on http://{host}:{port}/v1 (drafter: {'yes' if engine.drafter else 'none'})")
    run(engine, model_id, host, port, max_batch, draft, cache_mb)
