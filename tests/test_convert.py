"""`ssmkit convert` onto an existing folder: refused unless --force, and with it nothing stale survives
(the old weights of the other format would otherwise be what loading the folder returns)."""

import json

import pytest
import torch

from ssmkit import MambaConfig, MambaLM
from ssmkit.cli import main
from ssmkit.models import checkpoint


def model(seed: int, **kw) -> MambaLM:
    torch.manual_seed(seed)
    m = MambaLM(MambaConfig(**{"d_model": 16, "n_layer": 1, "vocab_size": 64, "d_state": 4, **kw}))
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return m


def same_weights(a: MambaLM, b: MambaLM) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sorted(sa) == sorted(sb)
    for k in sa:
        torch.testing.assert_close(sa[k], sb[k], rtol=0, atol=0, msg=k)


@pytest.mark.parametrize("to,other", [("mamba-ssm", "hf"), ("hf", "mamba-ssm")])
def test_non_empty_destination_is_refused_without_force(tmp_path, capsys, to, other):
    new, old = model(1), model(2)
    new.save_pretrained(tmp_path / "src", format=other)
    old.save_pretrained(tmp_path / "dst", format=other)
    before = sorted(p.name for p in (tmp_path / "dst").iterdir())
    assert main(["convert", str(tmp_path / "src"), str(tmp_path / "dst"), "--to", to]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: destination ") and "is not empty" in err and "--force" in err
    assert err.count("\n") == 1
    assert sorted(p.name for p in (tmp_path / "dst").iterdir()) == before  # untouched
    same_weights(old, MambaLM.from_pretrained(tmp_path / "dst"))


@pytest.mark.parametrize("to,other", [("mamba-ssm", "hf"), ("hf", "mamba-ssm")])
def test_force_replaces_the_other_formats_weights(tmp_path, capsys, to, other):
    """The old folder holds the other format's weights, a stale sharded index and a stale tokenizer."""
    new, old = model(1, tie_embeddings=False), model(2)
    new.save_pretrained(tmp_path / "src", format=other)
    dst = tmp_path / "dst"
    old.save_pretrained(dst, format=other)
    old.save_pretrained(tmp_path / "dst-other", format=to)
    for f in (tmp_path / "dst-other").iterdir():
        if f.name != "config.json":
            f.rename(dst / f.name)  # both formats' weights of the OLD model
    shard = "model-00001-of-00001.safetensors" if to == "mamba-ssm" else "pytorch_model-00001-of-00001.bin"
    (dst / shard).write_bytes(b"stale")
    index = "model.safetensors.index.json" if to == "mamba-ssm" else "pytorch_model.bin.index.json"
    (dst / index).write_text(json.dumps({"weight_map": {"x": shard}}))
    (dst / "tokenizer.json").write_text("{}")  # the old model's tokenizer; src has none
    (dst / "README.md").write_text("kept")  # not a model file

    assert main(["convert", str(tmp_path / "src"), str(dst), "--to", to, "--force"]) == 0
    capsys.readouterr()
    names = sorted(p.name for p in dst.iterdir())
    weights = "pytorch_model.bin" if to == "mamba-ssm" else "model.safetensors"
    assert names == sorted(["README.md", "config.json", weights])
    same_weights(new, MambaLM.from_pretrained(dst))


def test_convert_copies_the_tokenizer_files(tmp_path):
    model(1).save_pretrained(tmp_path / "src")
    (tmp_path / "src" / "tokenizer.json").write_text('{"version": "1.0"}')
    (tmp_path / "src" / "tokenizer_config.json").write_text('{"eos_token": "<eos>"}')
    checkpoint.convert_checkpoint(tmp_path / "src", tmp_path / "dst", to="mamba-ssm")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (tmp_path / "dst" / name).read_text() == (tmp_path / "src" / name).read_text()


def test_failed_conversion_leaves_the_destination_alone(tmp_path):
    """A source that cannot be written in the target format is refused before anything is removed."""
    model(1, norm_eps=1e-6).save_pretrained(tmp_path / "src")  # mamba-ssm fixes eps at 1e-5
    old = model(2)
    old.save_pretrained(tmp_path / "dst")
    with pytest.raises(ValueError, match="norm_eps"):
        checkpoint.convert_checkpoint(tmp_path / "src", tmp_path / "dst", to="mamba-ssm", force=True)
    assert sorted(p.name for p in (tmp_path / "dst").iterdir()) == ["config.json", "model.safetensors"]
    same_weights(old, MambaLM.from_pretrained(tmp_path / "dst"))


def test_destination_that_is_a_file(tmp_path, capsys):
    model(1).save_pretrained(tmp_path / "src")
    (tmp_path / "file").write_text("x")
    assert main(["convert", str(tmp_path / "src"), str(tmp_path / "file")]) == 1
    assert "is a file, expected a folder" in capsys.readouterr().err


def test_convert_of_a_transformer_folder_says_what_convert_does(tmp_path, capsys):
    from ssmkit import TransformerLM
    from ssmkit.models.transformer_lm import TransformerConfig

    TransformerLM(TransformerConfig(d_model=16, n_layer=1, vocab_size=32, n_head=2)).save_pretrained(tmp_path)
    assert main(["convert", str(tmp_path), str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert (
        "'ssmkit-transformer'" in err
        and "converts Mamba-1 and Mamba-2 checkpoints" in err
        and err.count("\n") == 1
    )
