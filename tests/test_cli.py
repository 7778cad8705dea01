"""The `gemma-mlx` command: every user error is one line and exit code 1; generate/info/convert on a tiny pair."""

import json

import pytest
from typer.testing import CliRunner

from gemma_mlx.cli import app

runner = CliRunner()


@pytest.fixture(scope="module")
def tiny(mlx_dir, tmp_path_factory):
    """A converted tiny pair laid out as users do: models/tiny and its sibling models/tiny-assistant."""
    import shutil

    root = tmp_path_factory.mktemp("models")
    shutil.copytree(mlx_dir("e2blike"), root / "tiny")
    shutil.copytree(mlx_dir("e2blike", ordered=True), root / "tiny-assistant")
    shutil.copytree(mlx_dir("keqv", ordered=False), root / "keqv-assistant")  # other KV geometry
    return root


def one_line_error(result, pattern):
    assert result.exit_code == 1, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), result.output
    assert pattern in lines[0], lines[0]
    assert "Traceback" not in result.output


def test_missing_model_dir():
    one_line_error(runner.invoke(app, ["generate", "-m", "/no/such/dir", "-p", "hi"]), "no such model directory")


def test_dir_without_config(tmp_path):
    (tmp_path / "empty").mkdir()
    one_line_error(runner.invoke(app, ["generate", "-m", str(tmp_path / "empty"), "-p", "hi"]), "no config.json")


def test_offline_default_model_says_what_to_do(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("GEMMA_MLX_HOME", str(tmp_path / "home"))
    one_line_error(runner.invoke(app, ["generate", "-p", "hi"]), "cannot be downloaded (offline?)")


def test_mismatched_pair_is_refused(tiny):
    result = runner.invoke(app, ["generate", "-m", str(tiny / "tiny"), "-d", str(tiny / "keqv-assistant"), "-p", "hi"])
    one_line_error(result, "KV geometry")
    info = runner.invoke(app, ["info", str(tiny / "tiny"), "--drafter", str(tiny / "keqv-assistant")])
    assert info.exit_code == 1 and "pair does not match" in info.output


@pytest.mark.parametrize("args,pattern", [
    (["--max-tokens", "-3"], "--max-tokens must be >= 1"),
    (["--temp", "-1"], "--temp must be >= 0"),
    (["--top-p", "1.5"], "--top-p must be in (0, 1]"),
    (["--top-k", "-2"], "--top-k must be >= 0"),
    (["--draft-tokens", "foo"], "--draft-tokens must be a number"),
    (["--draft-tokens", "12"], "between 0 and 8"),
    (["--batch-size", "0"], "--batch-size must be >= 1"),
])
def test_bad_flag_values(tiny, args, pattern):
    one_line_error(runner.invoke(app, ["generate", "-m", str(tiny / "tiny"), "-p", "hi", *args]), pattern)


def test_top_k_reaches_the_sampler(tiny):
    """--top-k 1 leaves only the most likely token: sampling at a high temperature gives the greedy text."""
    def tokens(*args):
        result = runner.invoke(app, ["generate", "-m", str(tiny / "tiny"), "-p", "hi", "--max-tokens", "12", "--json",
                                     *args])
        assert result.exit_code == 0, result.output
        return json.loads(result.stdout.strip().splitlines()[-1])["tokens"]

    greedy = tokens()
    assert tokens("--temp", "1.5", "--top-k", "1", "--seed", "4") == greedy
    assert tokens("--temp", "1.5", "--seed", "4") != greedy


def test_prompt_and_prompts_file_are_exclusive(tiny, tmp_path):
    one_line_error(runner.invoke(app, ["generate", "-m", str(tiny / "tiny")]), "exactly one of")
    one_line_error(runner.invoke(app, ["generate", "-m", str(tiny / "tiny"), "--prompts-file", str(tmp_path / "x")]),
                   "no such file")


def test_convert_errors(hf_dir, tmp_path):
    one_line_error(runner.invoke(app, ["convert", str(hf_dir("plain")), str(tmp_path)]),
                   "already exists")
    one_line_error(runner.invoke(app, ["convert", str(hf_dir("plain")), str(tmp_path / "o"), "--quantize", "3"]),
                   "--quantize 3 is not supported")
    ok = runner.invoke(app, ["convert", str(hf_dir("plain")), str(tmp_path / "o"), "--dtype", "fp32"])
    assert ok.exit_code == 0 and (tmp_path / "o" / "config.json").exists()


def test_generate_json_is_the_same_greedy_text_with_and_without_drafter(tiny):
    base = ["generate", "-m", str(tiny / "tiny"), "-p", "the quick brown fox", "--max-tokens", "24", "--json"]
    plain = json.loads(runner.invoke(app, base + ["-d", "none"]).stdout)
    spec = json.loads(runner.invoke(app, base + ["-k", "3"]).stdout)  # the sibling assistant is found by name
    assert plain["tokens"] == spec["tokens"] and len(plain["tokens"]) == 24
    assert plain["stats"]["drafted_tokens"] == 0 and spec["stats"]["drafted_tokens"] > 0


def test_info_describes_the_model(tiny):
    result = runner.invoke(app, ["info", str(tiny / "tiny"), "--drafter", str(tiny / "tiny-assistant")])
    assert result.exit_code == 0
    for text in ("gemma4_text", "8 (6 sliding, 2 full)", "PLE", "3 kv-shared", "pair matches", "centroid head"):
        assert text in result.output


def test_help_teaches():
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0 and "gemma-mlx chat --model" in result.output
    for command in ("chat", "generate", "convert", "info"):
        assert runner.invoke(app, [command, "--help"]).exit_code == 0


def test_generate_batch_from_a_prompts_file_matches_one_by_one(tiny, tmp_path):
    f = tmp_path / "prompts.txt"
    f.write_text("the quick brown fox\nwhy is the sky blue\n\nthe capital of france is\n")
    base = ["generate", "-m", str(tiny / "tiny"), "--prompts-file", str(f), "--max-tokens", "16", "--json", "-k", "2"]
    batched = [json.loads(line) for line in runner.invoke(app, base + ["--batch-size", "3"]).stdout.splitlines()]
    single = [json.loads(line) for line in runner.invoke(app, base).stdout.splitlines()]
    assert len(batched) == len(single) == 3
    assert [b["tokens"] for b in batched] == [s["tokens"] for s in single]


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_a_ctrl_c_whose_keyboardinterrupt_python_drops_still_stops_the_reply(monkeypatch):
    """A KeyboardInterrupt raised while a finalizer runs is printed ("Exception ignored in") and dropped by Python;
    the Ctrl-C it came from must stop the reply all the same (the chat once streamed on after a Ctrl-C)."""
    import os
    import signal
    import time

    import gemma_mlx
    from gemma_mlx import cli
    from gemma_mlx.generate import Piece

    class Finalized:
        def __del__(self):  # Ctrl-C lands while this runs: the KeyboardInterrupt is raised in here
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.5)

    def endless(engine, messages, **kwargs):
        for i in range(2000):
            if i == 3:
                Finalized()  # collected at once
            yield Piece(f"w{i} ", [i], None, None)

    monkeypatch.setattr(gemma_mlx, "stream_generate", endless)
    previous = signal.getsignal(signal.SIGINT)
    try:
        text, _ = cli.stream_reply(None, [], cli.CtrlC())
    finally:
        signal.signal(signal.SIGINT, previous)
    assert text == "w0 w1 w2 w3 "


def damaged_copies(src, tmp_path):
    """Copies of a converted checkpoint with its weight file truncated at 10 offsets (in the length prefix, the JSON
    header and the data) and with 10 header bytes flipped, plus one with a shard missing from its index."""
    import shutil
    import struct

    shard = "model.safetensors"
    data = (src / shard).read_bytes()
    header_end = 8 + struct.unpack("<Q", data[:8])[0]
    cuts = [0, 3, 8, 9, header_end // 2, header_end - 1, header_end, header_end + 1, len(data) // 2, len(data) - 1]
    flips = [1, 5, 7] + [8 + i * (header_end - 9) // 6 for i in range(7)]
    damaged = [(f"cut at {c}", data[:c]) for c in cuts]
    damaged += [(f"byte {i} flipped", data[:i] + bytes([data[i] ^ 0xFF]) + data[i + 1:]) for i in flips]
    for i, (what, content) in enumerate(damaged):
        d = tmp_path / f"damaged-{i}"
        shutil.copytree(src, d)
        (d / shard).write_bytes(content)
        yield what, d
    d = tmp_path / "missing-shard"
    shutil.copytree(src, d)
    (d / shard).unlink()
    yield "shard missing", d


def test_a_damaged_checkpoint_is_one_line_for_load_generate_and_info(tiny, tmp_path):
    import gemma_mlx

    tried = 0
    for what, d in damaged_copies(tiny / "tiny", tmp_path / "target"):
        with pytest.raises(gemma_mlx.LoadError, match="re-download or re-convert") as e:
            gemma_mlx.load(d)
        assert "\n" not in str(e.value), what
        for args in (["generate", "-m", str(d), "-d", "none", "-p", "hi"], ["info", str(d)]):
            one_line_error(runner.invoke(app, args), "re-download or re-convert")
        tried += 1
    for what, d in damaged_copies(tiny / "tiny-assistant", tmp_path / "drafter"):
        one_line_error(runner.invoke(app, ["generate", "-m", str(tiny / "tiny"), "-d", str(d), "-p", "hi"]),
                       "re-download or re-convert")
        tried += 1
    print(f"{tried} damaged checkpoints, each one line for load, generate and info")


def test_info_counts_quantized_parameters_unpacked(tiny, mlx_dir):
    """info reads headers only; a 4-bit checkpoint has as many parameters as its fp32 source."""
    import re

    def parameters(path):
        result = runner.invoke(app, ["info", str(path)])
        assert result.exit_code == 0, result.output
        return re.search(r"parameters\s+\S\s+([\d.]+) M", result.output).group(1)

    assert parameters(mlx_dir("e2blike", quantize=4)) == parameters(tiny / "tiny")


def test_help_shows_no_type_noise_and_every_default():
    import re

    for command in ("chat", "generate", "convert", "info", "serve", "distill"):
        text = runner.invoke(app, [command, "--help"], env={"COLUMNS": "200"}).output
        assert "<bool>" not in text and not re.search(r"\S \.(\s|$)", text) and "Example:" in text, command
    assert "[default: 300000]" in runner.invoke(app, ["distill", "--help"], env={"COLUMNS": "200"}).output


def test_the_default_dtype_is_the_backends_fast_one_and_a_slow_choice_says_so(hf_dir, hf_drafter_dir, tmp_path):
    import mlx.core as mx

    from gemma_mlx.convert import default_dtype
    from gemma_mlx.convert.safetensors_io import open_checkpoint

    on_cpu = mx.default_device() == mx.cpu
    assert default_dtype() == ("fp32" if on_cpu else "bf16")
    result = runner.invoke(app, ["convert", str(hf_dir("plain")), str(tmp_path / "default")])
    assert result.exit_code == 0 and "note:" not in result.output, result.output
    kinds = {f.dtype(k) for k, f in open_checkpoint(tmp_path / "default").items()}
    assert "F32" in kinds and "BF16" not in kinds if on_cpu else "BF16" in kinds
    if not on_cpu:
        return
    result = runner.invoke(app, ["convert", str(hf_dir("plain")), str(tmp_path / "bf16"), "--dtype", "bf16"])
    assert result.output.count("note: bf16 weights decode about 4x slower than fp32") == 1, result.output
    result = runner.invoke(app, ["generate", "-m", str(tmp_path / "bf16"), "-d", "none", "-p", "hi", "--raw",
                                 "--max-tokens", "2"])
    assert result.exit_code == 0 and result.output.count("note: bf16 weights") == 1, result.output
    result = runner.invoke(app, ["convert", str(hf_dir("plain")), str(tmp_path / "q4"), "-q", "4"])
    assert result.output.count("note: 4-bit weights") == 1, result.output
    result = runner.invoke(app, ["convert", str(hf_drafter_dir("plain", True)), str(tmp_path / "d4"), "-q", "4"])
    assert result.exit_code == 0 and "note:" not in result.output, result.output  # a drafter is 4-bit by design
