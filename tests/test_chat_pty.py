"""The real `gemma-mlx chat` in a pseudo-terminal (pexpect) on a tiny converted pair."""

import re
import shutil
import signal
import sys

import pexpect
import pytest

PROMPT = ">>> "
STATUS = re.compile(r"prefill (\d+) tok · (\d+) tok")


@pytest.fixture(scope="module")
def models(mlx_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("chat")
    shutil.copytree(mlx_dir("e2blike"), root / "tiny")
    shutil.copytree(mlx_dir("e2blike", ordered=True), root / "tiny-assistant")
    return root


def start(models, *args):
    child = pexpect.spawn(sys.executable, ["-m", "gemma_mlx.cli", "chat", "-m", str(models / "tiny"), *args],
                          encoding="utf-8", timeout=60, dimensions=(50, 400), env={"TERM": "dumb", "COLUMNS": "400",
                                                                                  "PATH": "/usr/bin:/bin"})
    child.expect_exact(PROMPT)
    return child


def ask(child, text):
    """Send a turn; return (reply text, prefill tokens, generated tokens)."""
    child.sendline(text)
    child.expect(STATUS)
    prefill, generated = int(child.match.group(1)), int(child.match.group(2))
    reply = child.before.split(text, 1)[-1].strip().splitlines()[0] if text in child.before else child.before
    child.expect_exact(PROMPT)
    return reply.strip(), prefill, generated


def test_two_turns_reuse_the_prompt_cache_and_draft_off_gives_the_same_text(models):
    child = start(models, "--max-tokens", "12")
    first, prefill1, n1 = ask(child, "the quick brown fox")
    second, prefill2, _ = ask(child, "and the lazy dog")
    # the second turn prefills only its new tokens (+ the previous reply's last token, never cached)
    user_turn = len("<end_of_turn>\n<start_of_turn>user\nand the lazy dog<end_of_turn>\n<start_of_turn>model\n")
    assert prefill2 < prefill1 + 12 and prefill2 < user_turn
    child.sendline("/stats")
    child.expect("acceptance per draft position|no drafting yet")
    child.expect_exact(PROMPT)
    child.sendline("/reset")
    child.expect_exact(PROMPT)
    child.sendline("/draft off")
    child.expect("drafting: off")
    child.expect_exact(PROMPT)
    again, _, _ = ask(child, "the quick brown fox")
    assert again == first  # greedy: identical with and without drafting
    child.sendline("/exit")
    child.expect(pexpect.EOF)


def test_ctrl_c_stops_a_reply_and_keeps_the_conversation(models):
    child = start(models, "--max-tokens", "100000", "--draft-tokens", "0")
    child.sendline("the quick brown fox")
    child.expect_exact("the quick brown fox\r\n")  # the echo of the input line
    child.expect(r"\S+ \S+ \S+ \S+ \S+")  # the reply is streaming
    child.sendintr()
    child.expect_exact("[stopped]")
    child.expect(STATUS)
    first_prompt, stopped_at = int(child.match.group(1)), int(child.match.group(2))
    assert 0 < stopped_at < 100000
    child.expect_exact(PROMPT)
    child.sendline("again")
    child.expect_exact("again\r\n")
    child.expect(r"\S+ \S+ \S+ \S+ \S+")
    child.sendintr()
    child.expect(STATUS)
    # the conversation stayed cached: the next turn does not prefill the first prompt again (how much of the reply it
    # prefills depends on where Ctrl-C landed: the chat template re-renders the reply from its printed text)
    assert int(child.match.group(1)) < first_prompt + stopped_at
    child.expect_exact(PROMPT)
    child.sendeof()
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0


def test_help_and_unknown_commands(models):
    child = start(models)
    child.sendline("/help")
    child.expect("/draft on\\|off\\|N\\|auto")
    child.expect_exact(PROMPT)
    child.sendline("/frobnicate")
    child.expect("unknown command")
    child.expect_exact(PROMPT)
    child.kill(signal.SIGTERM)
