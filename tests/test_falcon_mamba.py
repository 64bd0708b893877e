"""Falcon-Mamba (Mamba-1 with weightless RMS norms on δ, B and C) against transformers'
FalconMambaForCausalLM, the independent reference: weights both ways through files after perturbing
every parameter; logits to 1e-5 relative in float32; cached decoding == full forward; greedy generation
== repeated full forwards of the transformers model; ``ssmkit convert`` keeps it a Falcon-Mamba folder."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import json

import pytest
import torch
from parity import perturb, rel_diff

from ssmkit import MambaConfig, MambaLM
from ssmkit.models.load import load_model

transformers = pytest.importorskip("transformers")

REL_TOL = 1e-5
CASES = [
    (
        "defaults",
        dict(d_model=32, n_layer=2, vocab_size=96, mixer_rms_eps=1e-6),
        dict(hidden_size=32, num_hidden_layers=2, vocab_size=96),
    ),
    (
        "eps_untied_odd",
        dict(d_model=37, n_layer=2, vocab_size=96, d_state=7, dt_rank=5, mixer_rms_eps=1e-3,
             tie_embeddings=False),
        dict(hidden_size=37, num_hidden_layers=2, vocab_size=96, state_size=7, time_step_rank=5,
             mixer_rms_eps=1e-3, tie_word_embeddings=False),
    ),
]  # fmt: skip
IDS = [c[0] for c in CASES]


def _greedy_by_full_forwards(model, ids, steps, vocab):
    seq = ids
    with torch.no_grad():
        for _ in range(steps):
            seq = torch.cat(
                [seq, model(seq, use_cache=False).logits[:, -1, :vocab].argmax(-1, keepdim=True)], 1
            )
    return seq


@pytest.mark.parametrize("name,ours_kwargs,hf_kwargs", CASES, ids=IDS)
def test_ours_to_transformers(name, ours_kwargs, hf_kwargs, tmp_path):
    torch.manual_seed(0)
    ours = MambaLM(MambaConfig(**ours_kwargs)).eval()
    perturb(ours, 1)
    ours.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == "falcon_mamba"
    theirs = transformers.FalconMambaForCausalLM.from_pretrained(tmp_path).eval()
    for key, value in hf_kwargs.items():
        assert getattr(theirs.config, key) == value, key
    ids = torch.randint(0, 96, (2, 13), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = theirs(ids, use_cache=False).logits
        assert rel_diff(ours(ids), expected) <= REL_TOL
    out = ours.generate(ids[:, :4], 8, temperature=0)
    torch.testing.assert_close(out, _greedy_by_full_forwards(theirs, ids[:, :4], 8, 96))


@pytest.mark.parametrize("name,ours_kwargs,hf_kwargs", CASES, ids=IDS)
def test_transformers_to_ours(name, ours_kwargs, hf_kwargs, tmp_path):
    torch.manual_seed(3)
    cfg = transformers.FalconMambaConfig(**hf_kwargs, eos_token_id=None, pad_token_id=None, bos_token_id=None)
    theirs = transformers.FalconMambaForCausalLM(cfg).eval()
    perturb(theirs, 4)
    theirs.save_pretrained(tmp_path)
    ours = load_model(tmp_path).eval()
    assert ours.config.mixer_rms_eps == ours_kwargs["mixer_rms_eps"]
    ids = torch.randint(0, 96, (2, 11), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        expected = theirs(ids, use_cache=False).logits
        assert rel_diff(ours(ids), expected) <= REL_TOL
        cache, parts = ours.new_cache(2), []
        for s, e in ((0, 4), (4, 5), (5, 11)):
            parts.append(ours(ids[:, s:e], cache=cache))
        assert rel_diff(torch.cat(parts, 1), expected) <= REL_TOL


def test_the_norms_matter_and_mamba_ssm_format_is_refused(tmp_path):
    torch.manual_seed(6)
    falcon = MambaLM(MambaConfig(d_model=16, n_layer=1, vocab_size=32, mixer_rms_eps=1e-6)).eval()
    plain = MambaLM(MambaConfig(d_model=16, n_layer=1, vocab_size=32)).eval()
    plain.load_state_dict(falcon.state_dict())  # same state dict, different computation
    ids = torch.randint(0, 32, (1, 6))
    with torch.no_grad():
        assert not torch.allclose(falcon(ids), plain(ids), atol=1e-3)
    with pytest.raises(ValueError, match="Falcon-Mamba has no mamba-ssm format"):
        falcon.save_pretrained(tmp_path / "x", format="mamba-ssm")
