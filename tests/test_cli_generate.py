"""`ssmkit generate` and `ssmkit convert`, called in-process through ssmkit.cli.main."""

import json

import pytest
import torch

from ssmkit import MambaConfig, MambaLM
from ssmkit.cli import main
from ssmkit.data.tokenizer import ByteTokenizer, JsonTokenizer, load_tokenizer


@pytest.fixture(scope="module")
def byte_model_dir(tmp_path_factory):
    torch.manual_seed(0)
    model = MambaLM(MambaConfig(d_model=32, n_layer=2, vocab_size=256)).eval()
    path = tmp_path_factory.mktemp("byte_model")
    model.save_pretrained(path)
    return path


def run_cli(capsys, argv) -> str:
    assert main(argv) == 0
    return capsys.readouterr().out


SAMPLING = [
    "--temperature",
    "0.9",
    "--top-k",
    "50",
    "--top-p",
    "0.95",
    "--min-p",
    "0.02",
    "--repetition-penalty",
    "1.1",
]


def test_generate_matches_library_for_fixed_seed(byte_model_dir, capsys):
    prompt = "Hello, Mamba"
    out = run_cli(
        capsys,
        [
            "generate",
            str(byte_model_dir),
            "--prompt",
            prompt,
            "--max-new-tokens",
            "16",
            "--seed",
            "3",
            *SAMPLING,
        ],
    )
    model = MambaLM.from_pretrained(byte_model_dir).eval()
    ids = torch.tensor([list(prompt.encode())])
    expected_ids = model.generate(
        ids,
        16,
        temperature=0.9,
        top_k=50,
        top_p=0.95,
        min_p=0.02,
        repetition_penalty=1.1,
        generator=torch.Generator().manual_seed(3),
    )
    expected = bytes(expected_ids[0].tolist()).decode("utf-8", errors="replace")
    assert out == expected + "\n"
    # --stream prints the same text
    streamed = run_cli(
        capsys,
        [
            "generate",
            str(byte_model_dir),
            "--prompt",
            prompt,
            "--max-new-tokens",
            "16",
            "--seed",
            "3",
            "--stream",
            *SAMPLING,
        ],
    )
    assert streamed == out


def test_greedy_generate(byte_model_dir, capsys):
    out = run_cli(
        capsys,
        ["generate", str(byte_model_dir), "--prompt", "abc", "--max-new-tokens", "8", "--temperature", "0"],
    )
    model = MambaLM.from_pretrained(byte_model_dir)
    ids = model.generate(torch.tensor([[97, 98, 99]]), 8, temperature=0)
    assert out == bytes(ids[0].tolist()).decode("utf-8", errors="replace") + "\n"


def test_generate_with_tokenizer_json(tmp_path, capsys):
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {w: i for i, w in enumerate(["<eos>", "the", "cat", "sat", "on", "mat", "a", "dog"])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<eos>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<eos>"}))
    torch.manual_seed(1)
    MambaLM(MambaConfig(d_model=16, n_layer=1, vocab_size=8)).save_pretrained(tmp_path)

    loaded = load_tokenizer(tmp_path)
    assert isinstance(loaded, JsonTokenizer) and loaded.eos_token_id == 0
    assert loaded.encode("the cat sat") == [1, 2, 3]
    out = run_cli(
        capsys, ["generate", str(tmp_path), "--prompt", "the cat", "--max-new-tokens", "5", "--seed", "0"]
    )
    model = MambaLM.from_pretrained(tmp_path)
    ids = model.generate(  # the CLI decodes greedily unless asked to sample
        torch.tensor([[1, 2]]), 5, temperature=0, eos_token_id=0, generator=torch.Generator().manual_seed(0)
    )
    assert out == "the cat" + loaded.decode(ids[0, 2:].tolist()) + "\n"


def test_byte_tokenizer():
    tok = ByteTokenizer()
    assert tok.encode("é!") == [0xC3, 0xA9, 0x21] and tok.decode([0xC3, 0xA9, 0x21]) == "é!"
    with pytest.raises(ValueError, match="256"):
        tok.decode([300])


def test_convert_cli(byte_model_dir, tmp_path, capsys):
    out = run_cli(capsys, ["convert", str(byte_model_dir), str(tmp_path / "ssm"), "--to", "mamba-ssm"])
    assert "mamba-ssm" in out
    assert (tmp_path / "ssm" / "pytorch_model.bin").is_file()
    a, b = (
        MambaLM.from_pretrained(byte_model_dir).state_dict(),
        MambaLM.from_pretrained(tmp_path / "ssm").state_dict(),
    )
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)


def test_generate_rejects_oversized_tokenizer(tmp_path, capsys):
    MambaLM(MambaConfig(d_model=8, n_layer=1, vocab_size=64)).save_pretrained(tmp_path)  # bytes need 256
    assert main(["generate", str(tmp_path), "--prompt", "x"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "256 tokens" in err and err.count("\n") == 1


def _greedy_text(model, prompt: str, n: int) -> str:
    ids = torch.tensor([list(prompt.encode())])
    out = model.generate(ids, n, temperature=0)
    return ByteTokenizer().decode(out[0, ids.shape[1] :].tolist())


@pytest.fixture
def keep_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)  # --threads sets the process's torch threads


def test_several_prompts_stop_strings_and_dtypes(byte_model_dir, capsys, keep_threads):
    """Several --prompt flags print each prompt's own greedy continuation (as alone, in order); --stop cuts
    the text before the stop string; --dtype bfloat16 / int8 decode what the library gives for the cast /
    quantized model; --threads and --device are taken."""
    from ssmkit import quantize

    model = MambaLM.from_pretrained(byte_model_dir).eval()
    prompts = ["ab", "Hello there"]
    alone = [_greedy_text(model, p, 12) for p in prompts]
    base = ["generate", str(byte_model_dir), "--max-new-tokens", "12", "--threads", "1", "--device", "cpu"]
    out = run_cli(capsys, [*base, "--prompt", prompts[0], "--prompt", prompts[1]])
    assert out == f"{prompts[0]}{alone[0]}\n\n{prompts[1]}{alone[1]}\n"
    stop = alone[1][5:7]  # two characters from the middle of the second continuation
    cut = [a[: a.find(stop)] if stop in a else a for a in alone]
    out = run_cli(capsys, [*base, "--prompt", prompts[0], "--prompt", prompts[1], "--stop", stop])
    assert out == f"{prompts[0]}{cut[0]}\n\n{prompts[1]}{cut[1]}\n"
    streamed = run_cli(capsys, [*base, "--prompt", prompts[1], "--stop", stop, "--stream"])
    assert streamed == f"{prompts[1]}{cut[1]}\n"
    bf16 = _greedy_text(MambaLM.from_pretrained(byte_model_dir).to(torch.bfloat16).eval(), prompts[1], 12)
    assert run_cli(capsys, [*base, "--prompt", prompts[1], "--dtype", "bfloat16"]) == prompts[1] + bf16 + "\n"
    q = quantize(MambaLM.from_pretrained(byte_model_dir).eval(), "int8")
    q8 = _greedy_text(q, prompts[1], 12)
    assert run_cli(capsys, [*base, "--prompt", prompts[1], "--dtype", "int8"]) == prompts[1] + q8 + "\n"


@pytest.mark.parametrize(
    "extra, match",
    [
        (["--prompt", "a", "--prompt", "b", "--stream"], "--stream prints one continuation"),
        (["--prompt", "a", "--stop", ""], "--stop must be a non-empty string"),
        (["--prompt", "a", "--interactive"], "leave out --prompt"),
        (["--prompt", "a", "--device", "cuda:7"], "--device"),
    ],
)
def test_generate_flag_errors_are_one_line(byte_model_dir, capsys, extra, match):
    assert main(["generate", str(byte_model_dir), *extra]) == 1
    err = capsys.readouterr().err
    assert match in err and err.count("\n") == 1
