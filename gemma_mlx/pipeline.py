"""A target split across processes in a pipeline (started by `mlx.launch`, over MLX's distributed backends): rank r
holds a run of consecutive layers and sends its activations on to rank r + 1 with `mx.distributed.send` / `recv`.

The last rank holds the final norm, the head and the drafter, and the producer layers whose K/V the drafter and the
kv-shared layers read: MTP drafts where its inputs are, and one verify of K + 1 tokens crosses the pipeline once, so
every hop between machines is paid once for several tokens (docs/design.md "Pipeline split").

Every rank runs the same decode loop (decode.py) on its own layers' caches. Rank 0, the leader, owns the terminal
and the HTTP port: it announces each decoder operation (a decoder opened, a row added, a round, a row removed) and
the other ranks repeat it (`follow`). What one rank alone knows is broadcast from it: the drafts, the verify's
choices and a row's first token from the last rank, K from the leader (its clock decides), and the prompt prefix
that every rank can resume from its prefix cache.

    split = Split(plan(config, 2, layer_bytes(sizes, n)), group)   # what loader.load_target(..., group) does
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from typing import Callable, Iterable

import mlx.core as mx

JOIN_SECONDS = float(os.environ.get("GEMMA_MLX_JOIN_SECONDS", 120))  # how long a rank waits for the others to start


class SplitError(ValueError):
    """A model that cannot be split as asked; the message is one line for the user."""


@dataclass
class LayerBytes:
    """A checkpoint's weight bytes as a split places them: per layer, the input tables (token embedding and PLE: the
    first rank's) and the output (final norm and head, or the tied embedding: the last rank's)."""

    layers: list
    first: int
    last: int


def layer_bytes(sizes: Iterable[tuple[str, int]], num_layers: int) -> LayerBytes:
    """Classify (tensor name, bytes) pairs of a target checkpoint (MLX, Hugging Face or GGUF names; towers of a
    multimodal wrapper are not the target's and are skipped)."""
    out = LayerBytes([0] * num_layers, 0, 0)
    for name, n in sizes:
        if re.search(r"(vision|audio)_tower|embed_(vision|audio)", name):
            continue
        if m := re.search(r"(?:^|\.)(?:layers|blk)\.(\d+)\.", name):
            out.layers[int(m.group(1))] += n
        elif "per_layer" in name:
            out.first += n
        elif "embed_tokens" in name or name.startswith("token_embd"):
            out.first, out.last = out.first + n, out.last + n  # the last rank's head (tied) and drafter read it
        else:
            out.last += n
    return out


def pinned_from(config) -> int:
    """The first layer the last rank must hold: the earliest producer layer the drafter or a kv-shared layer reads."""
    return min(config.producer_for(t) for t in set(config.layer_types[: config.first_shared_layer]))


def plan(config, ranks: int, sizes: LayerBytes) -> list[tuple[int, int]]:
    """Consecutive layer ranges [first, end) per rank that make the largest rank's bytes (its layers and tables) as
    small as they can be, with the last rank holding every layer from `pinned_from(config)` on."""
    n, pin = config.num_hidden_layers, pinned_from(config)
    if ranks > pin + 1:
        raise SplitError(f"cannot split this model over {ranks} ranks: its last rank must hold layers {pin}-{n - 1} "
                         f"(the producers the drafter and the kv-shared layers read), which leaves {pin} layers for "
                         f"{ranks - 1} ranks")

    best = {(0, 0): (0, [])}  # (ranks used, layers placed) -> (largest rank's bytes, ends)
    for r in range(ranks - 1):
        for a in range(r, pin + 1):
            if (r, a) not in best:
                continue
            worst, ends = best[r, a]
            for e in range(a + 1, pin - (ranks - 2 - r) + 1):
                option = (max(worst, held(sizes, r, ranks, a, e)), ends + [e])
                if (r + 1, e) not in best or option[0] < best[r + 1, e][0]:
                    best[r + 1, e] = option
    last = ranks - 1
    worst, ends = min((max(w, held(sizes, last, ranks, a, n)), e) for (r, a), (w, e) in best.items() if r == last)
    starts = [0] + ends
    return [(s, e) for s, e in zip(starts, ends + [n])]


def held(sizes: LayerBytes, rank: int, ranks: int, first: int, end: int) -> int:
    """The weight bytes rank `rank` of `ranks` holds with layers [first, end)."""
    return sum(sizes.layers[first:end]) + (sizes.first if rank == 0 else 0) + (sizes.last if rank == ranks - 1 else 0)


class Split:
    """This process's place in a pipeline: its rank, every rank's layer range, and the exchanges the engine makes.
    `Split.whole(n)` is a single process holding all n layers: every exchange is then the local value."""

    def __init__(self, ranges: list[tuple[int, int]], group=None):
        self.ranges, self.group = [tuple(r) for r in ranges], group
        self.rank = group.rank() if group is not None else 0
        self.size = len(ranges)
        self.dtype = mx.float32  # of the activations sent between ranks (the model's: set by `CausalLM.pipeline`)
        self.weight_bytes = [0] * self.size  # what each rank loaded (`share_layout`)
        self.pending = None  # this rank's last send: what it broadcasts next waits for it
        self._decoders = 0

    @classmethod
    def whole(cls, num_layers: int) -> "Split":
        return cls([(0, num_layers)])

    @property
    def layers(self) -> range:
        return range(*self.ranges[self.rank])

    @property
    def first(self) -> bool:
        return self.rank == 0

    @property
    def last(self) -> bool:
        return self.rank == self.size - 1

    def describe(self) -> dict:
        """`generate --json`'s "distributed": ranks, each rank's layers [first, last] and loaded weight bytes."""
        return {"ranks": self.size, "layers": [[a, e - 1] for a, e in self.ranges], "weight_bytes": self.weight_bytes}

    # --- activations, rank to rank ---------------------------------------------------------------------------------

    def receive(self, shape: tuple, dtype=None) -> mx.array:
        """What the previous rank sent (lazy)."""
        return mx.distributed.recv(shape, dtype or self.dtype, self.rank - 1, group=self.group)

    def pass_on(self, x: mx.array) -> mx.array:
        """Send x to the next rank (lazy); later broadcasts from this rank wait for it."""
        self.pending = mx.distributed.send(x.astype(self.dtype), self.rank + 1, group=self.group)
        return self.pending

    # --- what one rank knows, to every rank ------------------------------------------------------------------------

    def from_last(self, make: Callable[[], tuple], *likes: tuple) -> tuple:
        """`make()` (a tuple of integer or bool arrays) run on the last rank, its result on every rank (lazy);
        `likes`: (shape, dtype) of each array."""
        if self.size == 1:
            return make()
        arrays = make() if self.last else [mx.zeros(s, d) for s, d in likes]
        flat = mx.concatenate([a.astype(mx.int32).reshape(-1) for a in arrays])
        if self.pending is not None:
            flat = mx.depends(flat, self.pending)
        flat = mx.distributed.all_sum(flat, group=self.group)
        out, at = [], 0
        for shape, dtype in likes:
            count = 1
            for s in shape:
                count *= s
            out.append(flat[at : at + count].reshape(shape).astype(dtype))
            at += count
        return tuple(out)

    def from_leader(self, make: Callable[[], int]) -> int:
        """`make()` run on rank 0, its value on every rank (evaluated now)."""
        if self.size == 1:
            return make()
        value = make() if self.rank == 0 else 0
        return int(mx.distributed.all_sum(mx.array(value, mx.int64), group=self.group).item())

    def least(self, value: int) -> int:
        """The smallest of every rank's value (evaluated now)."""
        if self.size == 1:
            return value
        return int(mx.distributed.all_min(mx.array(value, mx.int64), group=self.group).item())

    def share_layout(self, weight_bytes: int):
        """Every rank learns what every rank loaded (also: every rank has loaded before any decodes)."""
        if self.size == 1:
            self.weight_bytes = [weight_bytes]
            return
        mine = mx.zeros((self.size,), mx.int64)
        mine[self.rank] = weight_bytes
        self.weight_bytes = mx.distributed.all_sum(mine, group=self.group).tolist()

    # --- the leader's announcements ----------------------------------------------------------------------------------

    @property
    def announcing(self) -> bool:
        return self.size > 1 and self.rank == 0

    def new_decoder(self) -> int:
        self._decoders += 1
        return self._decoders

    def announce(self, message: dict):
        """Rank 0: tell every other rank what to do next (a decoder operation, or "quit")."""
        if self.announcing:
            self._broadcast(json.dumps(message).encode())

    def heartbeat(self):
        """Rank 0, while idle: a message that does nothing, so that a rank that died is noticed now, not at the next
        request."""
        with exit_on_lost_peer():
            self.announce({"op": "ping"})

    def next_message(self) -> dict:
        """Ranks > 0: what rank 0 announced."""
        with exit_on_lost_peer():
            return json.loads(self._broadcast(b"").decode())

    def _broadcast(self, data: bytes) -> bytes:
        n = self.from_leader(lambda: len(data))
        buf = mx.array(list(data), mx.uint8) if self.rank == 0 else mx.zeros((n,), mx.uint8)
        return bytes(memoryview(mx.distributed.all_sum(buf, group=self.group)))


def follow(split: Split, build: Callable[[dict], object]):
    """Ranks > 0: repeat rank 0's decoder operations until it quits. `build(setup)` makes a decoder as the leader's
    (decode.Decoder.setup)."""
    decoders = {}
    while (message := split.next_message())["op"] != "quit":
        if message["op"] == "ping":
            continue
        key = message["decoder"]
        if message["op"] == "open":
            decoders[key] = build(message["setup"])
            continue
        decoder = decoders[key]
        op, args = message["op"], message.get("args", {})
        if op == "close":
            del decoders[key]
        elif op == "add":
            decoder.add(**args)
        elif op == "step":
            decoder.step()
        else:  # remove / cancel: a row by its place in the batch
            getattr(decoder, op)(decoder.rows[args["row"]])


# --- joining and leaving ---------------------------------------------------------------------------------------------


def launched() -> bool:
    """Started by mlx.launch (or mpirun) as one of several processes."""
    return any(k in os.environ for k in ("MLX_RANK", "OMPI_COMM_WORLD_SIZE"))


def launched_rank() -> str:
    """This process's rank as mlx.launch (or mpirun) gave it, for messages written before or without a group."""
    return os.environ.get("MLX_RANK", os.environ.get("OMPI_COMM_WORLD_RANK", "?"))


_WATCHDOG = ("import os, select, sys\n"
             "ready, _, _ = select.select([sys.stdin], [], [], float(sys.argv[1]))\n"
             "if not ready:\n"
             "    sys.stderr.write(sys.argv[2] + '\\n'); sys.stderr.flush(); os.kill(int(sys.argv[3]), 15)\n")


def join(timeout: float = JOIN_SECONDS):
    """The group of processes mlx.launch started (None when this process runs alone). A rank that cannot reach
    every other within `timeout` seconds exits with one line (MLX's own connect waits forever, holding the
    interpreter, so a watchdog process ends it)."""
    if not launched():
        return None
    message = (f"error: rank {launched_rank()}: not every rank joined within {timeout:.0f} s (check that each host is "
               "reachable at the addresses mlx.launch was given and runs the same command)")
    watchdog = subprocess.Popen([sys.executable, "-c", _WATCHDOG, str(timeout), message, str(os.getpid())],
                                stdin=subprocess.PIPE)
    try:
        group = mx.distributed.init(strict=True)
        mx.eval(mx.distributed.all_sum(mx.array(1), group=group))  # every rank is here
    except RuntimeError as e:
        raise SplitError(f"cannot join the other ranks: {str(e).splitlines()[0]}") from None
    finally:
        watchdog.stdin.close()
        watchdog.wait()
    return group if group.size() > 1 else None


def lost(e: BaseException):
    """A rank died or its host became unreachable: one line, and this rank exits (its peers do the same when they
    notice; never a hang on a dead socket)."""
    reason = str(e).splitlines()[0] if str(e) else type(e).__name__
    sys.stderr.write(f"error: rank {launched_rank()}: lost the other ranks of the pipeline ({reason}): exiting\n")
    sys.stderr.flush()
    os._exit(1)


@contextlib.contextmanager
def exit_on_lost_peer(active: bool = True):
    """A lost peer inside the block ends this process at once (`lost`), before any cleanup on the way out (a row
    removed, a decoder closed) makes another exchange on the dead connection, where it would wait forever."""
    try:
        yield
    except RuntimeError as e:
        if active and is_lost_peer(e):
            lost(e)
        raise


def ends_when_lost(operation):
    """exit_on_lost_peer around a decoder's operation, when its target is split."""

    @functools.wraps(operation)
    def guarded(decoder, *args, **kwargs):
        with exit_on_lost_peer(decoder.split.size > 1):
            return operation(decoder, *args, **kwargs)

    return guarded


def quit_followers(split: Split):
    """Rank 0, at exit: the other ranks stop following."""
    try:
        split.announce({"op": "quit"})
    except RuntimeError:
        pass  # they are gone already


def is_lost_peer(e: BaseException) -> bool:
    return isinstance(e, RuntimeError) and any(s in str(e) for s in ("[ring]", "[jaccl]", "[mpi]", "connection"))


__all__ = ["LayerBytes", "Split", "SplitError", "ends_when_lost", "follow", "held", "join", "layer_bytes", "plan"]
