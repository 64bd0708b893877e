"""Text corpora: sources, the text-level split, the token file, windows and bits per byte.

Independent references: the token file is compared with ``list(text.encode())`` written here; the split
is checked on a corpus whose two halves use disjoint alphabets, so any window that crossed the split
would contain both."""

import math
import os

import numpy as np
import pytest
import torch

from ssmkit.data.text import (
    TokenCorpus,
    read_documents,
    resolve_sources,
    split_documents,
    stdlib_files,
    token_dtype,
)


class Bytes:
    """A byte-level tokenizer written for the test (id = byte value)."""

    vocab_size = 256

    def __init__(self):
        self.calls = 0

    def encode(self, text):
        self.calls += 1
        return list(text.encode("utf-8"))


class Pairs:
    """Two bytes per token (id = 256·b0 + b1, a trailing odd byte alone): exercises bytes/token = 2."""

    vocab_size = 65536

    def encode(self, text):
        b = text.encode("utf-8")
        return [b[i] * 256 + (b[i + 1] if i + 1 < len(b) else 0) for i in range(0, len(b), 2)]


def _ab_corpus(tmp_path):
    """90 lines of 'a' then 10 lines of 'b' (equal lengths): val_fraction 0.1 splits exactly between."""
    text = "a" * 19 + "\n"
    path = tmp_path / "ab.txt"
    path.write_text(text * 90 + ("b" * 19 + "\n") * 10)
    return path


def test_token_file_matches_independent_encoding(tmp_path):
    path = _ab_corpus(tmp_path)
    corpus = TokenCorpus.build(Bytes(), tmp_path / "cache", path, val_fraction=0.1, verbose=False)
    raw = path.read_text()
    expected = np.array(list(raw.encode()), dtype=np.uint16)
    np.testing.assert_array_equal(np.asarray(corpus.tokens), expected)
    assert corpus.meta.n_train == 1800 and corpus.meta.n_val == 200
    assert corpus.meta.train_bytes == 1800 and corpus.meta.val_bytes == 200
    assert corpus.tokens.dtype == np.uint16


def test_windows_never_cross_the_split(tmp_path):
    corpus = TokenCorpus.build(Bytes(), tmp_path / "c", _ab_corpus(tmp_path), val_fraction=0.1, verbose=False)
    a, b = ord("a"), ord("b")
    g = torch.Generator().manual_seed(0)
    for seq_len in (1, 7, 64, 1799):  # 1799 = the longest window the train split allows
        x, y = corpus.sample("train", 32, seq_len, g)
        assert x.shape == (32, seq_len) and y.shape == (32, seq_len) and x.dtype == torch.int64
        assert not (x == b).any() and not (y == b).any()
        torch.testing.assert_close(x[:, 1:], y[:, :-1], rtol=0, atol=0)  # y is x shifted by one
    for seq_len in (1, 50, 199):
        x, y = corpus.sample("val", 16, seq_len, g)
        assert not (x == a).any() and not (y == a).any()
    with pytest.raises(ValueError, match="seq_len"):
        corpus.sample("train", 1, 1800, g)
    with pytest.raises(ValueError, match="seq_len"):
        corpus.sample("val", 1, 200, g)
    with pytest.raises(ValueError, match="split"):
        corpus.sample("test", 1, 4, g)


def test_sampling_is_a_function_of_the_generator_seed(tmp_path):
    corpus = TokenCorpus.build(Bytes(), tmp_path / "c", _ab_corpus(tmp_path), val_fraction=0.1, verbose=False)
    x1, _ = corpus.sample("train", 8, 16, torch.Generator().manual_seed(3))
    x2, _ = corpus.sample("train", 8, 16, torch.Generator().manual_seed(3))
    torch.testing.assert_close(x1, x2, rtol=0, atol=0)


def test_iter_windows_tiles_validation_split_once(tmp_path):
    path = tmp_path / "t.txt"
    path.write_text("".join(f"line {i}\n" for i in range(400)))
    corpus = TokenCorpus.build(Bytes(), tmp_path / "c", path, val_fraction=0.25, verbose=False)
    start, stop = corpus.split_range("val")
    val = np.asarray(corpus.tokens[start:stop]).astype(np.int64)
    l = 13
    ys = torch.cat([y.reshape(-1) for _, y in corpus.iter_windows("val", 5, l)])
    k = (len(val) - 1) // l  # windows that fit
    np.testing.assert_array_equal(ys.numpy(), val[1 : 1 + k * l])
    assert sum(x.shape[0] for x, _ in corpus.iter_windows("val", 5, l, max_windows=7)) == 7


def test_cache_is_reused_and_keyed(tmp_path):
    path = _ab_corpus(tmp_path)
    tok = Bytes()
    TokenCorpus.build(tok, tmp_path / "c", path, val_fraction=0.1, verbose=False)
    calls = tok.calls
    again = TokenCorpus.build(tok, tmp_path / "c", path, val_fraction=0.1, verbose=False)
    assert tok.calls == calls + 1  # only the fingerprint probe, no re-tokenisation
    assert again.meta.n_train == 1800
    other = TokenCorpus.build(tok, tmp_path / "c", path, val_fraction=0.2, verbose=False)
    assert other.bin_path != again.bin_path and other.meta.n_val == 400
    assert not list((tmp_path / "c").glob("*.tmp"))  # atomic writes leave no temporaries


def test_split_is_on_text_at_line_boundaries():
    docs = ["x" * 9 + "\n"] * 3 + ["yy\nzz\n", "w" * 10]  # 46 bytes
    train, val = split_documents(docs, 0.26)  # cut at byte 34 → back to the start of line "zz\n" (33)
    assert "".join(train) + "".join(val) == "".join(docs)
    assert "".join(train).endswith("yy\n") and "".join(val).startswith("zz\n")
    with pytest.raises(ValueError, match="val_fraction"):
        split_documents(docs, 1.0)


def test_bits_per_byte_uses_tokens_per_byte(tmp_path):
    path = tmp_path / "t.txt"
    path.write_text("ab" * 500 + "\n" + "cd" * 500 + "\n")
    corpus = TokenCorpus.build(Pairs(), tmp_path / "c", path, val_fraction=0.5, verbose=False)
    vb, vt = corpus.meta.val_bytes, corpus.meta.n_val
    assert vb == 1001 and vt == 501  # the odd trailing byte makes a token of its own
    loss = 1.7
    assert math.isclose(corpus.bits_per_byte(loss, "val"), loss / math.log(2) * vt / vb, rel_tol=1e-12)


def test_folder_and_glob_sources_sorted_and_non_utf8_skipped(tmp_path):
    d = tmp_path / "docs"
    (d / "sub").mkdir(parents=True)
    (d / "b.txt").write_text("bbb\n")
    (d / "a.txt").write_text("aaa\n")
    (d / "sub" / "c.txt").write_text("ccc\n")
    (d / ".hidden").write_text("hidden\n")
    (d / "bad.bin").write_bytes(b"\xff\xfe\x00bad")
    files, _ = resolve_sources(d)
    assert [f.relative_to(d).as_posix() for f in files] == ["a.txt", "b.txt", "bad.bin", "sub/c.txt"]
    docs, report = read_documents(files, max_bytes=10**6)
    assert docs == ["aaa\n", "bbb\n", "ccc\n"] and report.skipped == [str(d / "bad.bin")]
    files, _ = resolve_sources(os.path.join(d, "**", "*.txt"))
    assert [f.name for f in files] == ["a.txt", "b.txt", "c.txt"]
    with pytest.raises(ValueError, match="data"):
        resolve_sources(tmp_path / "missing.txt")
    with pytest.raises(ValueError, match="glob"):
        resolve_sources(str(tmp_path / "*.nothing"))


def test_size_cap_cuts_at_a_line(tmp_path):
    (tmp_path / "a.txt").write_text("12345\n" * 10)
    (tmp_path / "b.txt").write_text("never read\n")
    docs, report = read_documents([tmp_path / "a.txt", tmp_path / "b.txt"], max_bytes=20)
    assert docs == ["12345\n" * 3] and report.truncated and report.n_bytes == 18


def test_default_corpus_is_the_stdlib(tmp_path):
    files = stdlib_files()
    names = {f.name for f in files}
    assert "os.py" in names and "functools.py" in names
    assert not any("site-packages" in f.parts or "test" in f.parts for f in files)
    corpus = TokenCorpus.build(
        Bytes(), tmp_path / "c", None, val_fraction=0.1, max_bytes=50_000, verbose=False
    )
    assert corpus.meta.source.startswith("stdlib:")
    assert corpus.meta.train_bytes + corpus.meta.val_bytes <= 50_000
    assert corpus.meta.truncated


def test_token_dtype():
    assert token_dtype(256) == np.uint16 and token_dtype(65536) == np.uint16
    assert token_dtype(65537) == np.uint32
    with pytest.raises(ValueError, match="vocab_size"):
        token_dtype(0)


def test_a_folder_holding_the_cache_does_not_read_it(tmp_path):
    (tmp_path / "a.txt").write_text("hello world\n" * 20)
    first = TokenCorpus.build(Bytes(), tmp_path / "cache", tmp_path, val_fraction=0.1, verbose=False)
    again = TokenCorpus.build(Bytes(), tmp_path / "cache", tmp_path, val_fraction=0.1, verbose=False)
    assert again.bin_path == first.bin_path and first.meta.files == [str(tmp_path / "a.txt")]


def test_data_path_that_is_not_a_file_or_folder_says_what_it_is():
    with pytest.raises(ValueError, match="character device"):
        resolve_sources("/dev/zero")
    with pytest.raises(ValueError, match="does not exist"):
        resolve_sources("/no/such/file.txt")


def test_load_tokenizer_takes_a_file_or_a_folder(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    from ssmkit.data.tokenizer import ByteTokenizer, JsonTokenizer, load_tokenizer

    tok = Tokenizer(models.BPE(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.train_from_iterator(
        ["abc abd abe"] * 5, trainers.BpeTrainer(vocab_size=270, special_tokens=["[UNK]"])
    )
    tok.save(str(tmp_path / "my.json"))
    by_file = load_tokenizer(tmp_path / "my.json")
    assert isinstance(by_file, JsonTokenizer) and by_file.encode("abc abd") == tok.encode("abc abd").ids
    assert isinstance(load_tokenizer(tmp_path), ByteTokenizer)  # a folder without tokenizer.json: bytes …
    with pytest.raises(FileNotFoundError, match="holds no tokenizer.json"):
        load_tokenizer(tmp_path, required=True)  # … unless one was asked for
    (tmp_path / "my.json").rename(tmp_path / "tokenizer.json")
    assert load_tokenizer(tmp_path, required=True).vocab_size == tok.get_vocab_size()
