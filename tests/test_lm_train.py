"""Language-model training end to end on a tiny corpus: the LM task's batches, and a tiny Mamba LM (and
Transformer LM) whose validation loss falls below the text's unigram entropy — a bar computed here from
character counts, which no model can clear without using the context — within a few dozen steps of the
real trainer."""

import math
from collections import Counter

import pytest
import torch

from ssmkit.data.text import TokenCorpus
from ssmkit.data.tokenizer import ByteTokenizer
from ssmkit.models.config import Mamba2Config, MambaConfig
from ssmkit.models.mamba_lm import MambaLM
from ssmkit.models.transformer_lm import TransformerConfig, TransformerLM
from ssmkit.tasks.lm import LMTask
from ssmkit.train.metrics import read_metrics
from ssmkit.train.trainer import TrainConfig, train

SENTENCE = "the quick brown fox jumps over the lazy dog.\n"


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    d = tmp_path_factory.mktemp("lm")
    (d / "fox.txt").write_text(SENTENCE * 300)
    corpus = TokenCorpus.build(ByteTokenizer(), d / "cache", d / "fox.txt", val_fraction=0.1, verbose=False)
    return LMTask(corpus, seq_len=32, seed=0)


def unigram_entropy_nats(text: str) -> float:
    counts = Counter(text.encode())
    n = sum(counts.values())
    return -sum(c / n * math.log(c / n) for c in counts.values())


def test_batches_are_shifted_windows_and_pure_in_step(task):
    b1 = task.train_batch(5, 8)
    b2 = task.train_batch(5, 8)
    torch.testing.assert_close(b1.inputs, b2.inputs, rtol=0, atol=0)
    torch.testing.assert_close(b1.inputs[:, 1:], b1.targets[:, :-1], rtol=0, atol=0)
    assert b1.inputs.shape == (8, 32)
    assert not torch.equal(task.train_batch(6, 8).inputs, b1.inputs)
    # DDP: the two ranks' shares of world size 2 are the rows of the one-process global batch
    r0, r1 = task.train_batch(5, 4, 0, 2), task.train_batch(5, 4, 1, 2)
    torch.testing.assert_close(torch.cat([r0.inputs, r1.inputs]), b1.inputs, rtol=0, atol=0)


def test_validation_set_is_fixed_and_from_the_val_split(task):
    v = task.validation_set(32, 5)
    start, _ = task.corpus.split_range("val")
    expected = torch.from_numpy(task.corpus.tokens[start : start + 5 * 32].astype("int64")).view(5, 32)
    torch.testing.assert_close(v.inputs, expected, rtol=0, atol=0)
    assert task.bits_per_byte(math.log(2)) == pytest.approx(1.0, rel=1e-12)  # bytes: 1 token = 1 byte


@pytest.mark.parametrize("kind", ["mamba", "mamba2", "transformer"])
def test_tiny_lm_learns_repetitive_text(task, kind, tmp_path):
    torch.manual_seed(0)
    if kind == "mamba":
        model = MambaLM(MambaConfig(d_model=32, n_layer=2, vocab_size=256, d_state=8))
    elif kind == "mamba2":
        model = MambaLM(Mamba2Config(d_model=32, n_layer=2, vocab_size=256, d_state=8, headdim=16))
    else:
        model = TransformerLM(TransformerConfig(d_model=32, n_layer=2, vocab_size=256, n_head=2, d_mlp=64))
    cfg = TrainConfig(
        steps=40,
        batch_size=16,
        lr=1e-2,
        schedule="cosine",
        warmup_steps=5,
        eval_every=20,
        eval_examples=8,
        log_every=5,
        ckpt_every=0,
        device="cpu",
        progress=False,
    )
    result = train(model, task, cfg, tmp_path / "run")
    curve = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if r["event"] == "eval"]
    assert [c["step"] for c in curve] == [20, 40]
    bar = unigram_entropy_nats(SENTENCE)  # ≈ 2.9 nats; uniform guessing is ln 256 ≈ 5.5
    assert result.losses[0] > bar  # starts above the bar ...
    assert curve[-1]["val_loss"] < 0.7 * bar, (curve, bar)  # ... and ends well below it
    assert curve[-1]["val_bpb"] == pytest.approx(curve[-1]["val_loss"] / math.log(2), rel=1e-12)


def test_cli_train_lm_saves_a_model_that_generate_loads(tmp_path, capsys, monkeypatch):
    """`ssmkit train --task lm --model transformer` end to end: the saved folder reloads to the trained
    weights, and `ssmkit generate` (plain and --interactive) prints what TransformerLM.generate gives."""
    from ssmkit.cli import main
    from ssmkit.train.checkpoint import model_state, read_checkpoint

    (tmp_path / "fox.txt").write_text(SENTENCE * 100)
    out = tmp_path / "run"
    argv = [
        "train",
        "--task",
        "lm",
        "--model",
        "transformer",
        "--data",
        str(tmp_path / "fox.txt"),
        "--d-model",
        "32",
        "--n-layer",
        "1",
        "--n-head",
        "2",
        "--seq-len",
        "16",
        "--steps",
        "4",
        "--batch-size",
        "4",
        "--eval-every",
        "2",
        "--eval-examples",
        "4",
        "--val-fraction",
        "0.1",
        "--out",
        str(out),
        "--no-progress",
    ]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "bits/byte" in printed and "transformer_lm" in printed
    assert (tmp_path / "token-cache").is_dir()  # the token file is cached next to the output
    model = TransformerLM.from_pretrained(out / "model")
    assert model.config.vocab_size == 256 and model.config.d_model == 32  # the flags, not the LM defaults
    state = model_state(read_checkpoint(out / "checkpoint.safetensors")[0])
    torch.testing.assert_close(
        model.state_dict()["embedding.weight"], state["embedding.weight"], rtol=0, atol=0
    )

    expected = model.generate(
        torch.tensor([list(b"the ")]), 12, temperature=0.8, generator=torch.Generator().manual_seed(3)
    )
    text = "the " + bytes(expected[0, 4:].tolist()).decode("utf-8", errors="replace")
    common = ["generate", str(out / "model"), "--max-new-tokens", "12", "--temperature", "0.8", "--seed", "3"]
    assert main([*common, "--prompt", "the "]) == 0
    assert capsys.readouterr().out == text + "\n"
    lines = iter(["the ", ""])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(lines))
    assert main([*common, "--interactive"]) == 0
    assert text in capsys.readouterr().out


def test_cli_train_lm_rejects_vocab_size(tmp_path, capsys):
    from ssmkit.cli import main

    (tmp_path / "t.txt").write_text(SENTENCE * 50)
    argv = ["train", "--task", "lm", "--data", str(tmp_path / "t.txt"), "--vocab-size", "300"]
    assert main([*argv, "--out", str(tmp_path / "r")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: --vocab-size: does not apply to --task lm") and "300" in err


def test_cli_train_lm_with_a_tokenizer_json(tmp_path, capsys):
    """A tokenizer.json tokenizer: ids from it, bits per byte scaled by tokens/bytes, and the tokenizer
    saved beside the model so that load_tokenizer finds it."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    from ssmkit.cli import main
    from ssmkit.data.tokenizer import JsonTokenizer, load_tokenizer

    tok = Tokenizer(models.BPE(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.train_from_iterator([SENTENCE] * 10, trainers.BpeTrainer(vocab_size=300, special_tokens=["[UNK]"]))
    tok.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "fox.txt").write_text(SENTENCE * 200)
    out = tmp_path / "run"
    argv = [
        "train",
        "--task",
        "lm",
        "--data",
        str(tmp_path / "fox.txt"),
        "--tokenizer",
        str(tmp_path / "tokenizer.json"),
        "--model",
        "transformer",
        "--n-head",
        "2",
        "--d-model",
        "16",
        "--n-layer",
        "1",
        "--seq-len",
        "8",
        "--steps",
        "2",
        "--batch-size",
        "2",
        "--eval-examples",
        "2",
        "--val-fraction",
        "0.1",
        "--out",
        str(out),
        "--no-progress",
    ]
    assert main(argv) == 0
    capsys.readouterr()
    loaded = load_tokenizer(out / "model")
    assert isinstance(loaded, JsonTokenizer) and loaded.vocab_size == tok.get_vocab_size()
    assert TransformerLM.from_pretrained(out / "model").config.vocab_size == tok.get_vocab_size()
    curve = __import__("json").loads((out / "val_bpb.json").read_text())
    ids = tok.encode(SENTENCE * 20).ids  # the validation text is 20 sentences
    ratio = len(ids) / len((SENTENCE * 20).encode())
    assert curve[-1]["val_bpb"] == pytest.approx(curve[-1]["val_loss"] / math.log(2) * ratio, rel=1e-9)


@pytest.mark.parametrize("kind", ["mamba", "mamba2", "transformer"])
def test_cli_eval_lm_checkpoint_streams_and_matches_a_full_forward(tmp_path, capsys, kind):
    """`ssmkit eval` on an LM run's checkpoint: the loss at each length (48 tokens streamed through the
    state / KV cache in chunks of 16) equals one full forward's mean cross-entropy over the same windows,
    and bits/byte = loss / ln 2 for byte tokens."""
    import json

    import torch.nn.functional as F

    from ssmkit.cli import main
    from ssmkit.train.build import build_task, load_trained

    (tmp_path / "fox.txt").write_text(SENTENCE * 100)
    out = tmp_path / "run"
    extra = {"transformer": ["--n-head", "2"], "mamba2": ["--headdim", "16", "--d-state", "8"]}.get(kind, [])
    argv = ["train", "--task", "lm", "--model", kind, "--data", str(tmp_path / "fox.txt"), "--d-model", "32"]
    argv += ["--n-layer", "1", "--seq-len", "16", "--steps", "3", "--batch-size", "4", "--eval-every", "0"]
    argv += ["--eval-examples", "4", "--val-fraction", "0.2", "--out", str(out), "--no-progress", *extra]
    assert main(argv) == 0
    ckpt = out / "checkpoint.safetensors"
    assert main(["eval", str(ckpt), "--lengths", "16,48", "--examples", "5", "--chunk-size", "16"]) == 0
    assert "bits/byte" in capsys.readouterr().out
    rows = {r["length"]: r for r in json.loads((out / "eval.json").read_text())["rows"]}
    model, header = load_trained(ckpt)
    task = build_task(header["task"])
    for length in (16, 48):
        data = task.validation_set(length, 5)
        with torch.no_grad():
            logits = model(data.inputs).double()  # (n, l, V) in one pass
        ref = F.cross_entropy(logits.flatten(0, 1), data.targets.flatten()).item()
        assert rows[length]["examples"] == 5
        assert rows[length]["loss"] == pytest.approx(ref, rel=1e-5)
        assert rows[length]["bpb"] == pytest.approx(ref / math.log(2), rel=1e-5)
    assert (out / "eval.png").is_file() and "bpb" in (out / "eval.csv").read_text().splitlines()[0]
    capsys.readouterr()
    assert main(["eval", str(ckpt), "--task", "copying"]) == 1
    assert "language model" in capsys.readouterr().err
