"""Every `gemma-mlx` command and the Python example of the README run as written, with the hub ids swapped for tiny
local checkpoints (no network here). `make demo` / `make test` are exercised by CI itself."""

import re
import shlex
from pathlib import Path

from typer.testing import CliRunner

import gemma_mlx.cli as cli

README = Path(__file__).resolve().parent.parent / "README.md"
runner = CliRunner()


def blocks(lang):
    return re.findall(rf"```{lang}\n(.*?)```", README.read_text(), flags=re.S)


def test_every_readme_command_runs(hf_dir, hf_drafter_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    hub = {"google/gemma-4-e2b-it-assistant": str(hf_drafter_dir("e2blike", True)),
           "google/gemma-4-e2b-it": str(hf_dir("e2blike"))}
    (tmp_path / "prompts.txt").write_text("Tell me a joke.\nName three rivers.\nWhy is the sky blue?\n")
    commands = [line for block in blocks("bash") for line in block.splitlines() if line.startswith("gemma-mlx ")]
    assert len(commands) >= 10
    convert_first = sorted(commands, key=lambda c: not c.startswith("gemma-mlx convert"))
    # the bare `gemma-mlx chat` uses the default model: point it at the tiny converted target
    monkeypatch.setattr(cli, "DEFAULT_MODEL", str(tmp_path / "models" / "e2b"))
    monkeypatch.setattr("gemma_mlx.server.serve", serve_then_run_the_readme_client)
    for command in convert_first:
        for hub_id, local in hub.items():
            command = command.replace(hub_id, local)
        args = shlex.split(command)[1:]
        result = runner.invoke(cli.app, args, input="Tell me a joke.\n/stats\n/exit\n")
        assert result.exit_code == 0, f"{command}\n{result.output}"


def serve_then_run_the_readme_client(engine, model_id, host, port, max_batch, draft_tokens, cache_mb):
    """Stands in for the blocking `serve`: the same app on a free loopback port, queried by the README's snippet."""
    import socket
    import threading
    import time

    import uvicorn

    from gemma_mlx.server import build_app

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        free = s.getsockname()[1]
    app = build_app(engine, model_id, max_batch, draft_tokens, cache_mb)
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=free, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    try:
        code = next(b for b in blocks("python") if "OpenAI(" in b).replace(f":{port}/", f":{free}/")
        scope = {}
        exec(compile(code, "README.md", "exec"), scope)
        assert scope["reply"].choices[0].message.content is not None
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        app.state.scheduler.close()


def test_readme_python_example_runs(mlx_dir, tmp_path, monkeypatch):
    import shutil

    monkeypatch.chdir(tmp_path)
    shutil.copytree(mlx_dir("e2blike"), tmp_path / "models" / "e2b")
    shutil.copytree(mlx_dir("e2blike", ordered=True), tmp_path / "models" / "e2b-assistant")
    code = next(b for b in blocks("python") if "gemma_mlx.load" in b)
    scope = {}
    exec(compile(code, "README.md", "exec"), scope)
    assert scope["result"].stats.generated_tokens >= 1 and len(scope["results"]) == 2
