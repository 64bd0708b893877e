"""Tokenizer files: what ``ssmkit train --task lm`` writes beside the model, and what ssmkit reads.

The reference is transformers itself: ``AutoTokenizer.from_pretrained`` and the text-generation
``pipeline`` on a folder saved by a real (short) training run, and AutoTokenizer's reading of a
GPT-NeoX-like folder (a BPE ``tokenizer.json`` built here with ``tokenizers``, special tokens and a chat
template in ``tokenizer_config.json`` / ``special_tokens_map.json``). A Hub id for ``--tokenizer`` is
resolved from a Hugging Face cache built in tmp_path (huggingface_hub's layout), offline.
"""

import hashlib
import json
import os
import random
import shutil
import socket
from pathlib import Path

import pytest
import torch

from ssmkit.cli import main
from ssmkit.data.tokenizer import ByteTokenizer, JsonTokenizer, load_tokenizer, tokenizer_settings

transformers = pytest.importorskip("transformers")

SENTENCE = "the quick brown fox jumps over the lazy dog.\n"
# text that a byte tokenizer must carry through unchanged: multi-byte UTF-8, NUL and other control
# bytes, runs of spaces, CRLF, combining marks, text that looks like special tokens
TEXTS = [
    "",
    "the quick brown fox",
    "  leading and   inner   spaces ",
    "Ünïcödé 数字 emoji 🙂👍🏽 e\u0301",
    "\x00\x01\x7f\t\r\n\x1b[0m",
    "<|endoftext|> <s> </s> [PAD]",
    "don 't , . ! ?  ' s",
]


def train_argv(tmp_path: Path, out: Path, *extra: str) -> list[str]:
    (tmp_path / "fox.txt").write_text(SENTENCE * 100)
    return [
        "train",
        "--task",
        "lm",
        "--data",
        str(tmp_path / "fox.txt"),
        "--d-model",
        "16",
        "--n-layer",
        "1",
        "--seq-len",
        "16",
        "--steps",
        "3",
        "--batch-size",
        "2",
        "--eval-examples",
        "2",
        "--val-fraction",
        "0.1",
        "--out",
        str(out),
        "--no-progress",
        *extra,
    ]


@pytest.fixture(scope="module")
def byte_folder(tmp_path_factory) -> Path:
    """OUT/model of `ssmkit train --task lm` (a tiny Mamba on bytes, 3 steps)."""
    d = tmp_path_factory.mktemp("bytes")
    assert main(train_argv(d, d / "run")) == 0
    return d / "run" / "model"


def test_byte_run_writes_tokenizer_files(byte_folder):
    names = {p.name for p in byte_folder.iterdir()}
    assert {"tokenizer.json", "tokenizer_config.json", "generation_config.json"} <= names
    generation = json.loads((byte_folder / "generation_config.json").read_text())
    # a byte model has no special tokens: all 256 ids are bytes (the padded vocabulary adds none)
    assert generation == {
        "do_sample": False,
        "bos_token_id": None,
        "eos_token_id": None,
        "pad_token_id": None,
    }
    assert json.loads((byte_folder / "config.json").read_text())["vocab_size"] == 256


def test_auto_tokenizer_encodes_and_decodes_like_byte_tokenizer(byte_folder):
    tok = transformers.AutoTokenizer.from_pretrained(byte_folder)
    byte = ByteTokenizer()
    assert len(tok) == 256
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (None, None, None)
    for text in TEXTS:
        assert tok(text)["input_ids"] == byte.encode(text), text
        assert tok.decode(byte.encode(text)) == text
    rng = random.Random(0)
    for _ in range(500):  # any byte string, valid UTF-8 or not, decodes as bytes.decode(errors="replace")
        ids = [rng.randrange(256) for _ in range(rng.randrange(1, 16))]
        assert tok.decode(ids) == byte.decode(ids), ids
    assert tok.decode(list(range(256))) == byte.decode(list(range(256)))


def test_ssmkit_reads_the_byte_tokenizer_json_as_bytes(byte_folder):
    loaded = load_tokenizer(byte_folder)
    byte = ByteTokenizer()
    assert isinstance(loaded, JsonTokenizer) and loaded.vocab_size == 256
    assert (loaded.bos_token_id, loaded.eos_token_id, loaded.pad_token_id) == (None, None, None)
    for text in TEXTS:
        assert loaded.encode(text) == byte.encode(text), text
    rng = random.Random(1)
    for _ in range(500):
        ids = [rng.randrange(256) for _ in range(rng.randrange(1, 16))]
        assert loaded.decode(ids) == byte.decode(ids), ids


def test_pipeline_generates_from_a_saved_folder(byte_folder):
    """transformers' text-generation pipeline on the folder (it failed with "`bos_token_id` has to be
    defined" before the folder had tokenizer files), greedy: its continuation is ssmkit's greedy one."""
    from ssmkit import MambaLM

    pipe = transformers.pipeline("text-generation", model=str(byte_folder), device="cpu")
    out = pipe("the ", max_new_tokens=6, do_sample=False)
    text = out[0]["generated_text"]
    assert isinstance(text, str) and text.startswith("the ")
    model = MambaLM.from_pretrained(byte_folder)
    ids = model.generate(torch.tensor([list(b"the ")]), 6, temperature=0.0)  # (1, 4 + 6)
    assert text == ByteTokenizer().decode(ids[0].tolist())


def test_generate_prints_the_same_text_as_with_bytes(byte_folder, tmp_path, capsys):
    """`ssmkit generate` on the folder (now with a byte-level tokenizer.json) prints what it printed for
    the folder without tokenizer files (bytes), sampling so that many ids are drawn."""
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(byte_folder / name, bare / name)
    common = ["--prompt", "héllo 🙂 ", "--max-new-tokens", "40", "--temperature", "1.5", "--seed", "7"]
    assert main(["generate", str(bare), *common]) == 0
    before = capsys.readouterr().out
    assert main(["generate", str(byte_folder), *common]) == 0
    assert capsys.readouterr().out == before
    assert main(["generate", str(byte_folder), "--prompt", "the ", "--max-new-tokens", "20"]) == 0
    assert main(["generate", str(bare), "--prompt", "the ", "--max-new-tokens", "20"]) == 0
    greedy_new, greedy_bare = capsys.readouterr().out.split("\n")[:2]
    assert greedy_new == greedy_bare


# ---------------------------------------------------------------------------- a GPT-NeoX-like folder
CHAT = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{{ eos_token }}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def neox_like(folder: Path, special_map: bool = True) -> "object":
    """A byte-level BPE tokenizer.json with GPT-NeoX's special tokens (<|endoftext|> = 0,
    <|padding|> = 1), its tokenizer_config.json (bos/eos as AddedToken objects, a chat template) and a
    special_tokens_map.json giving the pad token."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        special_tokens=["<|endoftext|>", "<|padding|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator([SENTENCE] * 20, trainer)
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    eos = {
        "__type": "AddedToken",
        "content": "<|endoftext|>",
        "lstrip": False,
        "rstrip": False,
        "normalized": False,
        "special": True,
    }
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": eos,
        "eos_token": "<|endoftext|>",
        "clean_up_tokenization_spaces": False,
        "chat_template": CHAT,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    if special_map:
        (folder / "special_tokens_map.json").write_text(json.dumps({"pad_token": "<|padding|>"}))
    return tok


def test_gpt_neox_like_folder_is_read_with_its_special_tokens(tmp_path):
    tok = neox_like(tmp_path / "neox")
    loaded = load_tokenizer(tmp_path / "neox")
    reference = transformers.AutoTokenizer.from_pretrained(tmp_path / "neox")
    assert isinstance(loaded, JsonTokenizer)
    assert (loaded.bos_token_id, loaded.eos_token_id, loaded.pad_token_id) == (0, 0, 1)
    assert (reference.bos_token_id, reference.eos_token_id, reference.pad_token_id) == (0, 0, 1)
    assert loaded.chat_template == CHAT == reference.chat_template
    for text in [SENTENCE * 2, "the lazy fox 🙂"]:
        assert loaded.encode(text) == reference(text)["input_ids"] == tok.encode(text).ids
    messages = [{"role": "user", "content": "hi"}]
    from ssmkit.serve.chat import ChatTemplate

    rendered = ChatTemplate(loaded.chat_template, "<|endoftext|>", "<|endoftext|>").render(messages)
    assert rendered == reference.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def test_lm_run_with_a_tokenizer_folder_exports_its_files(tmp_path, capsys):
    """--tokenizer FOLDER: the model folder gets the tokenizer files, and a generation_config.json whose
    bos/eos/pad ids are the tokenizer's, which transformers reads back."""
    neox_like(tmp_path / "neox")
    assert main(train_argv(tmp_path, tmp_path / "run", "--tokenizer", str(tmp_path / "neox"))) == 0
    capsys.readouterr()
    folder = tmp_path / "run" / "model"
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        assert (folder / name).read_bytes() == (tmp_path / "neox" / name).read_bytes()
    generation = transformers.GenerationConfig.from_pretrained(folder)
    assert (generation.bos_token_id, generation.eos_token_id, generation.pad_token_id) == (0, 0, 1)
    assert load_tokenizer(folder).eos_token_id == 0


def test_special_tokens_map_fills_in_what_the_config_lacks(tmp_path):
    neox_like(tmp_path / "a")
    assert tokenizer_settings(tmp_path / "a")["pad_token"] == "<|padding|>"
    neox_like(tmp_path / "b", special_map=False)
    assert tokenizer_settings(tmp_path / "b")["pad_token"] is None
    cfg = json.loads((tmp_path / "b" / "tokenizer_config.json").read_text())
    (tmp_path / "b" / "tokenizer_config.json").write_text(json.dumps({**cfg, "eos_token": "<|nope|>"}))
    with pytest.raises(ValueError, match=r"eos_token '<\|nope\|>' is not in .*tokenizer.json"):
        load_tokenizer(tmp_path / "b")


def test_bad_tokenizer_config_is_one_line_naming_it(tmp_path):
    neox_like(tmp_path / "t")
    (tmp_path / "t" / "tokenizer_config.json").write_text('{"eos_token": "<|endoftext|>",')
    with pytest.raises(ValueError) as err:
        load_tokenizer(tmp_path / "t")
    assert "tokenizer_config.json is not valid JSON" in str(err.value) and "\n" not in str(err.value)
    (tmp_path / "t" / "tokenizer_config.json").write_text('{"eos_token": 3}')
    with pytest.raises(ValueError, match="tokenizer_config.json: eos_token must be a string"):
        load_tokenizer(tmp_path / "t")


# ---------------------------------------------------------------------------- no tokenizer.json
@pytest.mark.parametrize(
    "files, what",
    [
        (["tokenizer.model"], "sentencepiece tokenizer.model"),
        (["vocab.json", "merges.txt"], "vocab.json (+ merges.txt)"),
        (["merges.txt"], "merges.txt (+ vocab.json)"),
    ],
)
def test_other_tokenizer_formats_without_tokenizer_json_are_one_line(tmp_path, capsys, files, what):
    """A folder holding another tokenizer format was silently read as bytes; now it is an error."""
    folder = tmp_path / "m"
    folder.mkdir()
    for name in files:
        (folder / name).write_text("x")
    for required in (False, True):
        with pytest.raises(FileNotFoundError) as err:
            load_tokenizer(folder, required=required)
        msg = str(err.value)
        assert "\n" not in msg and what in msg and "no tokenizer.json" in msg and str(folder) in msg
    argv = train_argv(tmp_path, tmp_path / "run", "--tokenizer", str(folder))
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and what in err and err.count("\n") == 1


def test_a_folder_without_tokenizer_files_is_still_bytes(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    assert isinstance(load_tokenizer(tmp_path), ByteTokenizer)


# ---------------------------------------------------------------------------- --tokenizer HUB_ID
def _git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def add_to_cache(cache: Path, repo_id: str, folder: Path, commit: str) -> Path:
    """``folder``'s files as commit ``commit`` (ref "main") of ``repo_id`` in huggingface_hub's cache
    layout: blobs/<git blob sha1>, refs/main, snapshots/<commit>/<file> -> ../../blobs/<hash>."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (repo / "blobs").mkdir(exist_ok=True)
    for file in sorted(folder.iterdir()):
        blob = repo / "blobs" / _git_blob_sha1(file.read_bytes())
        blob.write_bytes(file.read_bytes())
        (snapshot / file.name).symlink_to(os.path.relpath(blob, snapshot))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    return snapshot


@pytest.fixture
def offline_cache(tmp_path, monkeypatch) -> Path:
    """HF_HOME in tmp_path, HF_HUB_OFFLINE=1, and every socket connection an error."""
    pytest.importorskip("huggingface_hub")

    def refuse(self, *args, **kwargs):
        raise AssertionError(f"a test tried to open a network connection to {args}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    for key in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return tmp_path / "hf" / "hub"


def test_train_tokenizer_by_hub_id_offline(tmp_path, offline_cache, capsys):
    tok = neox_like(tmp_path / "neox")
    snapshot = add_to_cache(offline_cache, "org/neox-tok", tmp_path / "neox", "c" * 40)
    from huggingface_hub import scan_cache_dir

    assert [r.repo_id for r in scan_cache_dir(offline_cache).repos] == ["org/neox-tok"]  # a real cache
    out = tmp_path / "run"
    assert main(train_argv(tmp_path, out, "--tokenizer", "org/neox-tok")) == 0
    assert f"{tok.get_vocab_size()} tokens" in capsys.readouterr().out
    folder = out / "model"
    assert (folder / "tokenizer.json").read_bytes() == (tmp_path / "neox" / "tokenizer.json").read_bytes()
    assert load_tokenizer(folder).encode(SENTENCE) == tok.encode(SENTENCE).ids
    from ssmkit.train.checkpoint import read_checkpoint

    # the checkpoint records the snapshot folder, which a resumed run finds offline
    assert read_checkpoint(out / "checkpoint.safetensors")[1]["task"]["tokenizer"] == str(snapshot)


def test_train_tokenizer_hub_id_not_cached_is_one_line(tmp_path, offline_cache, capsys):
    assert main(train_argv(tmp_path, tmp_path / "run", "--tokenizer", "org/absent")) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: --tokenizer: ") and "'org/absent'" in err and "HF_HUB_OFFLINE" in err
    assert err.count("\n") == 1


def test_export_replaces_the_tokenizer_files_of_an_earlier_export(tmp_path):
    """Exporting into a folder that holds another tokenizer's files leaves only the new tokenizer's; a
    Transformer LM folder (a model type transformers does not know) still loads with AutoTokenizer."""
    from ssmkit.data.text import TokenCorpus
    from ssmkit.models.transformer_lm import TransformerConfig, TransformerLM
    from ssmkit.tasks.lm import LMTask

    (tmp_path / "fox.txt").write_text(SENTENCE * 50)
    neox_like(tmp_path / "neox")
    neox = load_tokenizer(tmp_path / "neox")
    folder = tmp_path / "model"
    for tok in (neox, ByteTokenizer()):
        corpus = TokenCorpus.build(tok, tmp_path / "cache", tmp_path / "fox.txt", verbose=False)
        model = TransformerLM(TransformerConfig(d_model=16, n_layer=1, vocab_size=320, n_head=2, d_mlp=32))
        LMTask(corpus, seq_len=8, tokenizer=tok).export(model, folder)
        if tok is neox:
            assert (folder / "special_tokens_map.json").is_file()
    assert not (folder / "special_tokens_map.json").exists()
    assert json.loads((folder / "generation_config.json").read_text())["eos_token_id"] is None
    auto = transformers.AutoTokenizer.from_pretrained(folder)
    assert auto("héllo")["input_ids"] == list("héllo".encode())


def test_pipeline_on_a_mamba2_byte_run(tmp_path, capsys):
    from ssmkit import MambaLM

    argv = train_argv(tmp_path, tmp_path / "run", "--model", "mamba2")
    argv[argv.index("--d-model") + 1] = "32"
    assert main(argv) == 0
    capsys.readouterr()
    folder = tmp_path / "run" / "model"
    pipe = transformers.pipeline("text-generation", model=str(folder), device="cpu")
    text = pipe("the ", max_new_tokens=5, do_sample=False)[0]["generated_text"]
    ids = MambaLM.from_pretrained(folder).generate(torch.tensor([list(b"the ")]), 5, temperature=0.0)
    assert text == ByteTokenizer().decode(ids[0].tolist())


def test_train_tokenizer_that_is_neither_a_path_nor_an_id_is_one_line(tmp_path, capsys):
    assert main(train_argv(tmp_path, tmp_path / "run", "--tokenizer", str(tmp_path / "no" / "such"))) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: --tokenizer: ") and "does not exist" in err and err.count("\n") == 1
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    flag_help = capsys.readouterr().out.split("  --tokenizer TOKENIZER", 1)[1].split("\n  --", 1)[0]
    assert "or a Hub id (org/name" in " ".join(flag_help.split())  # however argparse wraps it
