"""bench/clients.py on the tiny pair: the waves run, MTP and plain replies are compared, the table is written."""

import gemma_mlx
from bench import clients
from gemma_mlx.server import build_app


def test_clients_bench_runs_mtp_and_plain_on_one_server(mlx_dir):
    engine = gemma_mlx.load(mlx_dir("e2blike"), drafter=mlx_dir("e2blike", ordered=True))
    app = build_app(engine, "tiny", max_batch=8, draft_tokens=2)
    url, srv, thread = clients.start(app)
    try:
        rows = clients.run(url, ["one two three", "the old man", "where is the house"], [1, 3], 2, 6, 2)
    finally:
        srv.should_exit = True
        thread.join(timeout=10)
        app.state.scheduler.close()
    assert [r["clients"] for r in rows] == [1, 3] and all(r["identical"] for r in rows)
    assert all(r["plain_tokens_per_second"] > 0 and r["mtp_tokens_per_second"] > 0 for r in rows)
    assert all(1.0 <= r["tokens_per_round"] <= 3.0 and r["acceptance_by_position"][0] is not None for r in rows)
    text = clients.table(rows, 100.0, type("Args", (), dict(requests=2, tokens=6, repeats=2))())
    assert text.count("\n| ") == 3 and "MTP / plain" in text
