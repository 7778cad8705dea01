"""bench/batch.py: the speed-up vs batch size plot, drawn from a report as batch.json holds it (batch sizes as
string keys)."""

import pytest

from bench import batch


def test_speedup_vs_batch_size_is_plotted(tmp_path):
    pytest.importorskip("matplotlib")
    decode = {"dense": {"1": dict(speedup=1.4), "2": dict(speedup=1.3), "8": dict(speedup=1.0)},
              "moe": {"1": dict(speedup=1.0), "4": dict(speedup=1.1)}}
    batch.plot(decode, tmp_path / "batch.png")
    assert (tmp_path / "batch.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
