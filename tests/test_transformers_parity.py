"""Parity of ssmkit.MambaLM with transformers' MambaForCausalLM (the independent reference).

Weights travel both ways through files: ours -> save_pretrained -> transformers.from_pretrained, and
transformers.save_pretrained -> MambaLM.from_pretrained. Logits must agree to 1e-5 relative (max |Δ| /
max |logit|) in float32 and greedy generation of 20 tokens must be identical. Models are built from
configs with random weights; nothing is downloaded (HF_HUB_OFFLINE=1).

The ``SSMKIT_MAMBA_130M`` test reproduces transformers' CPU integration values for
state-spaces/mamba-130m-hf (its tests/models/mamba integration test) from a local copy, and is skipped
otherwise.
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest
import torch
from parity import perturb, rel_diff

from ssmkit import MambaConfig, MambaLM

transformers = pytest.importorskip("transformers")

REL_TOL = 1e-5
GEN_TOKENS = 20

# (name, our MambaConfig kwargs, transformers MambaConfig kwargs describing the same model)
CASES = [
    (
        "defaults",
        dict(d_model=32, n_layer=2, vocab_size=96),
        dict(hidden_size=32, num_hidden_layers=2, vocab_size=96),
    ),
    (
        "bias",
        dict(d_model=32, n_layer=2, vocab_size=100, bias=True),  # vocab padded to 104
        dict(hidden_size=32, num_hidden_layers=2, vocab_size=104, use_bias=True),
    ),
    (
        "no_conv_bias",
        dict(d_model=32, n_layer=2, vocab_size=96, conv_bias=False, d_conv=3),
        dict(hidden_size=32, num_hidden_layers=2, vocab_size=96, use_conv_bias=False, conv_kernel=3),
    ),
    (
        "odd_dmodel_dt_rank",
        dict(d_model=37, n_layer=2, vocab_size=96, dt_rank=5, d_state=7),
        dict(hidden_size=37, num_hidden_layers=2, vocab_size=96, time_step_rank=5, state_size=7),
    ),
    (
        "untied",
        dict(d_model=32, n_layer=2, vocab_size=96, tie_embeddings=False),
        dict(hidden_size=32, num_hidden_layers=2, vocab_size=96, tie_word_embeddings=False),
    ),
]
IDS = [c[0] for c in CASES]


def _hf_model(hf_kwargs: dict, seed: int):
    torch.manual_seed(seed)
    cfg = transformers.MambaConfig(**hf_kwargs, eos_token_id=None, pad_token_id=None, bos_token_id=None)
    model = transformers.MambaForCausalLM(cfg).eval()
    perturb(model, seed + 1)
    return model


def _hf_greedy(model, ids: torch.Tensor, suppress: list[int]) -> torch.Tensor:
    return model.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=GEN_TOKENS,
        do_sample=False,
        suppress_tokens=suppress or None,
        eos_token_id=None,
        pad_token_id=0,
    )


@pytest.mark.parametrize("name,ours_kwargs,hf_kwargs", CASES, ids=IDS)
def test_ours_to_transformers(name, ours_kwargs, hf_kwargs, tmp_path):
    torch.manual_seed(0)
    ours = MambaLM(MambaConfig(**ours_kwargs)).eval()
    perturb(ours, 1)
    ours.save_pretrained(tmp_path)
    theirs = transformers.MambaForCausalLM.from_pretrained(tmp_path).eval()
    # the saved config reads back in transformers as the model we meant
    for key, value in hf_kwargs.items():
        assert getattr(theirs.config, key) == value, key

    ids = torch.randint(0, ours.config.vocab_size, (2, 13), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = theirs(ids).logits  # (b, l, V_pad)
        actual = ours(ids)
    assert actual.shape == expected.shape
    assert rel_diff(actual, expected) <= REL_TOL

    # greedy: transformers samples over the padded vocabulary, we over the real one -> suppress the pad ids
    pad_ids = list(range(ours.config.vocab_size, ours.config.padded_vocab_size))
    torch.testing.assert_close(
        ours.generate(ids, GEN_TOKENS, temperature=0), _hf_greedy(theirs, ids, pad_ids), rtol=0, atol=0
    )


@pytest.mark.parametrize("name,ours_kwargs,hf_kwargs", CASES, ids=IDS)
def test_transformers_to_ours(name, ours_kwargs, hf_kwargs, tmp_path):
    theirs = _hf_model(hf_kwargs, seed=3)
    theirs.save_pretrained(tmp_path)
    ours = MambaLM.from_pretrained(tmp_path).eval()
    cfg = ours.config
    expected_cfg = MambaConfig(**ours_kwargs)
    for field in ("d_model", "n_layer", "d_state", "d_conv", "expand", "conv_bias", "bias", "tie_embeddings"):
        assert getattr(cfg, field) == getattr(expected_cfg, field), field
    assert cfg.resolved_dt_rank == expected_cfg.resolved_dt_rank
    assert cfg.padded_vocab_size == hf_kwargs["vocab_size"]
    if not cfg.tie_embeddings:
        assert ours.lm_head.weight.data_ptr() != ours.backbone.embedding.weight.data_ptr()
        torch.testing.assert_close(ours.lm_head.weight, theirs.lm_head.weight, rtol=0, atol=0)

    ids = torch.randint(0, cfg.vocab_size, (2, 11), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        expected = theirs(ids).logits
        actual = ours(ids)
    assert rel_diff(actual, expected) <= REL_TOL
    torch.testing.assert_close(
        ours.generate(ids, GEN_TOKENS, temperature=0), _hf_greedy(theirs, ids, []), rtol=0, atol=0
    )


def test_cached_decoding_matches_transformers_full_forward():
    """Our one-token-at-a-time cache path against transformers' full (uncached) forward."""
    theirs = _hf_model(CASES[3][2], seed=5)
    ours = MambaLM(MambaConfig(**CASES[3][1])).eval()
    sd = {k.replace("embeddings.", "embedding."): v for k, v in theirs.state_dict().items()}
    ours.load_state_dict(sd, strict=True)
    ids = torch.randint(0, 96, (1, 9), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        expected = theirs(ids, use_cache=False).logits
        cache = ours.new_cache(1)
        actual = torch.cat([ours(ids[:, t : t + 1], cache=cache) for t in range(ids.shape[1])], dim=1)
    assert rel_diff(actual, expected) <= REL_TOL


# ------------------------------------------------------------------------------ mamba-130m integration
HF_130M_LOGITS = [
    -55.6909, -69.7903, -49.8981, -51.7581, -57.6544, -57.9368, -56.9591, -57.9033, -54.6787, -55.9261,
    -55.3011, -58.0765, -60.5642, -47.0176, -52.0344, -49.7836, -55.9463, -57.8957, -56.7627, -57.1080,
    -57.3434, -58.3015, -57.7875, -58.7760, -59.6037, -59.0665, -58.7087, -52.9293, -53.4654, -57.3466,
    -56.9294, -55.7314, -53.3141, -55.8171, -56.9879, -56.9121, -56.2139, -54.7198, -56.4134, -57.4825,
]  # fmt: skip


@pytest.mark.skipif(not os.environ.get("SSMKIT_MAMBA_130M"), reason="SSMKIT_MAMBA_130M not set")
def test_mamba_130m_integration_values():
    from ssmkit.data.tokenizer import load_tokenizer

    path = os.environ["SSMKIT_MAMBA_130M"]
    model = MambaLM.from_pretrained(path).eval()
    tok = load_tokenizer(path)
    ids = torch.tensor([tok.encode("Hey how are you doing?")])
    with torch.no_grad():
        logits = model(ids)
    torch.testing.assert_close(logits[0, 0, :40], torch.tensor(HF_130M_LOGITS), rtol=1e-3, atol=1e-3)
    out = model.generate(ids, 10, temperature=0)
    assert tok.decode(out[0].tolist()) == "Hey how are you doing?\n\nI'm so glad you're here."
