"""`gemma-mlx convert` and `gemma-mlx info`."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from . import UserError, app, err, out, slow_on_cpu, user_errors


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
    from ..convert import convert as run
    from ..convert import default_dtype
    from ..loader import read_config
    from ..models import model_kind

    path = run(src, out_dir, dtype=dtype, quantize=quantize, group_size=group_size, force=force)
    err.print(f"[green]wrote[/green] {path}")
    note = slow_on_cpu(dtype or default_dtype(), quantize) if model_kind(read_config(path)) == "target" else None
    if note:  # a target's weights are what a decode step streams; a drafter's are a few percent of them
        err.print(f"[dim]note: {note}[/dim]")


# --- info -----------------------------------------------------------------------------------------------------


@app.command()
@user_errors
def info(
    model: str = typer.Argument(..., help="A model dir or hub id (target or drafter)."),
    drafter: Optional[str] = typer.Option(None, "--drafter", "-d", help="Check whether this drafter fits the target."),
    hostfile: Optional[Path] = typer.Option(None, "--hostfile", help="mlx.launch's hostfile: show how the target's "
                                            "layers and bytes would be split across its hosts (nothing is loaded)."),
    hosts: Optional[str] = typer.Option(None, "--hosts", help="As mlx.launch --hosts (host1,host2,...): the same."),
):
    """Architecture, size, dtype/quantization, memory estimate; with --drafter, whether the pair matches; with
    --hostfile or --hosts, the pipeline split `mlx.launch ... -- gemma-mlx` would make.

    Example: gemma-mlx info models/e2b --drafter models/e2b-assistant --hosts mac1,mac2"""
    from ..loader import describe
    from ..models.gemma4_assistant import PairError, check_pair

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
    if hostfile or hosts:
        print_split(m, hosts_of(hostfile, hosts))
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


def hosts_of(hostfile: Optional[Path], hosts: Optional[str]) -> list[str]:
    """The hosts of an mlx.launch hostfile or --hosts list, in rank order, read as mlx.launch reads them."""
    from mlx._distributed_utils.common import Hostfile

    if hostfile and hosts:
        raise UserError("give one of --hostfile and --hosts")
    try:
        parsed = Hostfile.from_file(hostfile) if hostfile else Hostfile.from_list(hosts)
    except ValueError as e:
        raise UserError(str(e).splitlines()[0]) from None
    return [h.ssh_hostname for h in parsed.hosts]


def print_split(m, hosts: list[str]):
    """The pipeline split of target `m` over `hosts` (pipeline.plan): each rank's layers and weight bytes."""
    from ..pipeline import SplitError, held, layer_bytes, plan

    if m.is_drafter:
        raise UserError(f"{m.path} is a drafter: a split is of the target (the drafter runs on the last rank)")
    if m.sizes is None:
        raise UserError(f"{m.path.name}: convert it first (gemma-mlx convert), then ask for the split of the "
                        "converted dir: a GGUF is split after its conversion, in the dtype it is converted to")
    if len(hosts) < 2:
        raise UserError(f"a split needs at least 2 hosts, got {len(hosts)}")
    cfg = m.config
    sizes = layer_bytes(m.sizes, cfg.num_hidden_layers)
    try:
        ranges = plan(cfg, len(hosts), sizes)
    except SplitError as e:
        raise UserError(str(e)) from None
    table = Table(title=f"split over {len(hosts)} ranks", title_justify="left")
    for column in ("rank", "host", "layers", "weights"):
        table.add_column(column, justify="right" if column == "weights" else "left")
    for r, (host, (a, e)) in enumerate(zip(hosts, ranges)):
        tables = [what for what, on in (("embeddings", r == 0), ("norm + head", r == len(hosts) - 1)) if on]
        table.add_row(str(r), host, f"{a}-{e - 1}" + (f" + {', '.join(tables)}" if tables else ""),
                      f"{held(sizes, r, len(hosts), a, e) / 2**30:.2f} GiB")
    out.print(table)
    out.print("[dim]each rank also holds its own layers' KV cache; the last rank runs the drafter[/dim]")


def kv_bytes_per_token(cfg, itemsize: int) -> int:
    """Full layers grow per token; sliding rings are bounded (counted at their window)."""
    per_layer = [2 * cfg.layer_kv_heads(i) * cfg.layer_head_dim(i) * itemsize for i in range(cfg.first_shared_layer)]
    return sum(b for i, b in enumerate(per_layer) if cfg.layer_types[i] == "full_attention")
