"""MambaLM with Mamba-2 mixers against transformers' Mamba2ForCausalLM (the independent reference), and its
checkpoints in both formats.

Weights travel both ways through files: ours -> save_pretrained -> transformers.from_pretrained, and
transformers.save_pretrained -> MambaLM.from_pretrained, after every parameter is perturbed off its init.
Logits must agree to 1e-5 relative (max |Δ| / max |logit|) in float32; greedy generation must give the
tokens of repeated full forwards of the transformers model; cached decoding in uneven chunks equals the
full forward. Models are built from configs with random weights; nothing is downloaded.
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest
import torch
from parity import perturb, rel_diff

from ssmkit import MambaLM
from ssmkit.models.config import Mamba2Config
from ssmkit.models.load import load_model

transformers = pytest.importorskip("transformers")

REL_TOL = 1e-5

# (name, our Mamba2Config kwargs, transformers Mamba2Config kwargs describing the same model)
CASES = [
    (
        "one_group",
        dict(d_model=32, n_layer=2, vocab_size=96, d_state=16, headdim=16, chunk_size=8),
        dict(hidden_size=32, num_hidden_layers=2, vocab_size=96, state_size=16, head_dim=16, num_heads=4,
             n_groups=1, chunk_size=8, tie_word_embeddings=True),
    ),
    (
        "groups_untied_odd_vocab_conv3",  # vocab 101 padded to 104; chunk 5 does not divide l
        dict(d_model=32, n_layer=2, vocab_size=101, d_state=8, headdim=8, ngroups=2, d_conv=3, chunk_size=5,
             tie_embeddings=False, bias=True),
        dict(hidden_size=32, num_hidden_layers=2, vocab_size=104, state_size=8, head_dim=8, num_heads=8,
             n_groups=2, conv_kernel=3, chunk_size=5, tie_word_embeddings=False, use_bias=True),
    ),
    (
        "groups_per_head_dt_limit",
        dict(d_model=24, n_layer=3, vocab_size=64, d_state=4, headdim=4, ngroups=4, chunk_size=16,
             dt_limit=(0.01, 0.5), conv_bias=False, norm_eps=1e-6),
        dict(hidden_size=24, num_hidden_layers=3, vocab_size=64, state_size=4, head_dim=4, num_heads=12,
             n_groups=4, chunk_size=16, time_step_limit=(0.01, 0.5), use_conv_bias=False,
             layer_norm_epsilon=1e-6, tie_word_embeddings=True),
    ),
]  # fmt: skip
IDS = [c[0] for c in CASES]


def _hf_model(hf_kwargs: dict, seed: int):
    torch.manual_seed(seed)
    cfg = transformers.Mamba2Config(**hf_kwargs, eos_token_id=None, pad_token_id=None, bos_token_id=None)
    model = transformers.Mamba2ForCausalLM(cfg).eval()
    perturb(model, seed + 1)
    return model


def _hf_greedy_by_full_forwards(model, ids: torch.Tensor, steps: int, vocab: int) -> torch.Tensor:
    """Greedy decoding with transformers' model, one full (uncached) forward per token, real vocab only."""
    seq = ids
    with torch.no_grad():
        for _ in range(steps):
            nxt = model(seq, use_cache=False).logits[:, -1, :vocab].argmax(-1, keepdim=True)
            seq = torch.cat([seq, nxt], 1)
    return seq


@pytest.mark.parametrize("name,ours_kwargs,hf_kwargs", CASES, ids=IDS)
def test_ours_to_transformers(name, ours_kwargs, hf_kwargs, tmp_path):
    torch.manual_seed(0)
    ours = MambaLM(Mamba2Config(**ours_kwargs)).eval()
    perturb(ours, 1)
    ours.save_pretrained(tmp_path)
    theirs = transformers.Mamba2ForCausalLM.from_pretrained(tmp_path).eval()
    for key, value in hf_kwargs.items():  # the saved config reads back as the model we meant
        got = getattr(theirs.config, key)
        assert (tuple(got) if isinstance(got, list) else got) == value, key

    ids = torch.randint(0, ours.config.vocab_size, (2, 13), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = theirs(ids, use_cache=False).logits  # (b, l, V_pad)
        actual = ours(ids)
    assert actual.shape == expected.shape
    assert rel_diff(actual, expected) <= REL_TOL
    out = ours.generate(ids[:, :5], 8, temperature=0)
    torch.testing.assert_close(
        out, _hf_greedy_by_full_forwards(theirs, ids[:, :5], 8, ours.config.vocab_size)
    )


@pytest.mark.parametrize("name,ours_kwargs,hf_kwargs", CASES, ids=IDS)
def test_transformers_to_ours(name, ours_kwargs, hf_kwargs, tmp_path):
    theirs = _hf_model(hf_kwargs, seed=3)
    theirs.save_pretrained(tmp_path)
    ours = MambaLM.from_pretrained(tmp_path).eval()
    assert isinstance(ours.config, Mamba2Config)
    expected_cfg = Mamba2Config(**ours_kwargs)
    for field in ("d_model", "n_layer", "d_state", "d_conv", "expand", "headdim", "ngroups", "chunk_size",
                  "dt_limit", "conv_bias", "bias", "norm_eps", "tie_embeddings"):  # fmt: skip
        assert getattr(ours.config, field) == getattr(expected_cfg, field), field
    assert ours.config.padded_vocab_size == hf_kwargs["vocab_size"]

    ids = torch.randint(0, ours.config.vocab_size, (2, 11), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        expected = theirs(ids, use_cache=False).logits
        actual = ours(ids)
        assert rel_diff(actual, expected) <= REL_TOL
        cache, parts, start = ours.new_cache(2), [], 0
        for n in (4, 1, 1, 5):  # prefill, two one-token steps, a chunk
            parts.append(ours(ids[:, start : start + n], cache=cache))
            start += n
    assert rel_diff(torch.cat(parts, 1), expected) <= REL_TOL


def test_mamba_ssm_format_round_trip_and_convert(tmp_path):
    from ssmkit.cli import main

    torch.manual_seed(5)
    cfg = Mamba2Config(d_model=32, n_layer=2, vocab_size=50, d_state=8, headdim=8, ngroups=2, chunk_size=4)
    ours = MambaLM(cfg).eval()
    perturb(ours, 6)
    ours.save_pretrained(tmp_path / "ssm", format="mamba-ssm")
    import json

    saved = json.loads((tmp_path / "ssm" / "config.json").read_text())
    assert saved["ssm_cfg"]["layer"] == "Mamba2" and "model_type" not in saved  # mamba-ssm's layout
    again = load_model(tmp_path / "ssm")
    assert again.config == cfg
    ids = torch.randint(0, 50, (1, 9), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        torch.testing.assert_close(again(ids), ours(ids), rtol=0, atol=0)
    assert main(["convert", str(tmp_path / "ssm"), str(tmp_path / "hf"), "--to", "hf"]) == 0
    theirs = transformers.Mamba2ForCausalLM.from_pretrained(tmp_path / "hf").eval()
    with torch.no_grad():
        assert rel_diff(ours(ids), theirs(ids, use_cache=False).logits) <= REL_TOL


def test_config_checks():
    with pytest.raises(ValueError, match="multiple of headdim"):
        Mamba2Config(d_model=10, n_layer=1, vocab_size=10, headdim=8)
    with pytest.raises(ValueError, match="multiple of ngroups"):
        Mamba2Config(d_model=32, n_layer=1, vocab_size=10, headdim=16, ngroups=3)
    with pytest.raises(ValueError, match="dt_limit"):
        Mamba2Config(d_model=32, n_layer=1, vocab_size=10, headdim=16, dt_limit=(0.5, 0.1))
