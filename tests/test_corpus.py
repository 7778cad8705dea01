"""gemma_mlx/corpus.py: which files of a corpus are read, fortune files regrouped, windows cut losslessly."""

import pytest

from gemma_mlx import corpus


def fake_encode(text):
    """BOS (2) then one id per word: enough to check where windows cut."""
    return [2] + [10 + len(w) for w in text.split()]


def test_documents_reads_text_files_and_skips_the_rest(tmp_path):
    (tmp_path / "a.txt").write_text("prose " * 5)
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.py").write_text("def f():\n    return 1\n")
    (tmp_path / "README").write_text("no suffix is text too")
    (tmp_path / "blob.bin").write_bytes(b"abc\0def")  # NUL: binary
    (tmp_path / "latin.txt").write_bytes("caf\xe9".encode("latin-1"))  # not UTF-8
    (tmp_path / "fortunes.dat").write_text("an index")  # skipped suffix
    (tmp_path / "empty.txt").write_text("\n\n")
    docs = corpus.documents([tmp_path])
    assert sorted(docs) == sorted(["prose " * 5, "def f():\n    return 1", "no suffix is text too"])


def test_fortune_files_become_documents_of_consecutive_entries(tmp_path, monkeypatch):
    monkeypatch.setattr(corpus, "FORTUNES_PER_DOC", 30)
    entries = [f"entry number {i} says something" for i in range(7)]
    (tmp_path / "wisdom").write_text("\n%\n".join(entries) + "\n%\n")
    docs = corpus.documents([tmp_path / "wisdom"])
    assert "%" not in "".join(docs)
    assert "\n\n".join(docs) == "\n\n".join(entries)  # every entry once, in order
    assert all(len(d) >= 30 for d in docs[:-1])


def test_windows_start_with_bos_and_cut_each_document_losslessly():
    docs = ["a bb ccc " * 100, "dddd " * 10, "x " * 5]  # 300 words, 10 words, 5 words (too short: dropped)
    wins = corpus.windows(fake_encode, docs, length=64, seed=0)
    assert all(w[0] == 2 and len(w) <= 64 for w in wins)
    assert all(len(w) >= corpus.MIN_WINDOW for w in wins)
    bodies = sorted(tuple(w[1:]) for w in wins)
    expected = fake_encode(docs[0])[1:]
    cut = sorted(tuple(expected[s : s + 63]) for s in range(0, len(expected), 63) if len(expected[s : s + 63]) >= 31)
    assert bodies == cut  # the long document, every token once; the 10- and 5-word ones are under MIN_WINDOW
    assert corpus.windows(fake_encode, docs, 64, seed=0) == wins
    assert corpus.windows(fake_encode, docs, 64, seed=1) != wins  # shuffled by the seed


def test_a_missing_path_or_an_empty_corpus_is_one_clear_error(tmp_path):
    with pytest.raises(corpus.CorpusError, match="no such file or directory"):
        corpus.documents([tmp_path / "missing"])
    (tmp_path / "only.bin").write_bytes(b"\0\0")
    with pytest.raises(corpus.CorpusError, match="no text files"):
        corpus.documents([tmp_path])
