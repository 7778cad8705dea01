"""bench/pipeline.py's counting of rounds and exchanges on the tiny pair in one process (the split run itself needs
the demo pair: `python -m bench.pipeline`)."""

import gemma_mlx
from bench import pipeline as bench
from gemma_mlx import demo
from gemma_mlx.decode import Decoder


def test_rounds_and_their_exchanges_are_counted_per_mode(mlx_dir, monkeypatch):
    engine = gemma_mlx.load(mlx_dir("e2blike"), drafter=mlx_dir("e2blike", ordered=True), progress=False)
    monkeypatch.setattr(demo, "DEMO", ("lighthouse", "is_prime"))
    monkeypatch.setattr(Decoder, "step", Decoder.step)  # counting_exchanges wraps it: restored after the test
    counts = bench.counting_exchanges(engine.target.split)
    summary = bench.decode(engine, tokens=12, repeats=2)
    assert counts["plain rounds"] > 0 and counts["mtp rounds"] > 0
    plain, mtp = bench.per_round(counts, "plain"), bench.per_round(counts, "mtp")
    assert plain["sends"] == mtp["sends"] == 0  # one process: nothing crosses
    assert 1 <= plain["broadcasts"] < mtp["broadcasts"]  # the verify's choices; MTP adds its drafts
    assert summary["plain_round_ms"] > 0 and summary["mtp_round_ms"] > 0 and summary["identical"]
