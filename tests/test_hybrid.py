"""Hybrid Mamba + attention language models (mamba-ssm's ``attn_layer_idx`` / ``attn_cfg`` /
``d_intermediate``) against a float64 re-statement of mamba-ssm's block written here.

mamba-ssm cannot run on this CPU (its package needs CUDA to build), so the reference is its definitions
re-stated in plain loops: ``Block`` (h += mixer(RMSNorm(h)); h += GatedMLP(RMSNorm₂(h))), ``MHA``
(in_proj = [q, k, v] with h_kv key/value heads, flash-attn's non-interleaved rotary on the first
rotary_emb_dim features of each head, causal softmax, out_proj) and ``GatedMLP`` (fc2(a ⊙ SiLU(g))).
The Mamba / Mamba-2 mixers inside are ssmkit's own, which their own tests check against transformers.
Weights are perturbed off their init; the checkpoint goes through mamba-ssm's format and back.
"""

import json
import math

import pytest
import torch
import torch.nn.functional as F

from ssmkit import MambaLM
from ssmkit.models.config import Mamba2Config, MambaConfig
from ssmkit.models.load import load_model

ATTN = {"num_heads": 4, "num_heads_kv": 2, "head_dim": 6, "rotary_emb_dim": 4, "causal": True}
CASES = {
    "mamba1_gqa_rotary_mlp": (MambaConfig, dict(d_state=4), [1], ATTN, 40),
    "mamba2_two_attn_no_mlp": (Mamba2Config, dict(d_state=8, headdim=8, chunk_size=4), [0, 2],
                               {"num_heads": 2, "causal": True, "qkv_proj_bias": False}, 0),
}  # fmt: skip


def build(name):
    cls, extra, attn_idx, attn_cfg, d_int = CASES[name]
    cfg = cls(d_model=24, n_layer=3, vocab_size=50, attn_layer_idx=attn_idx, attn_cfg=attn_cfg,
              d_intermediate=d_int, **extra)  # fmt: skip
    torch.manual_seed(0)
    model = MambaLM(cfg).double().eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return model


def rms(x, w, eps):
    return x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def mha_reference(sd, p, x, cfg, d_model):
    """mamba-ssm's MHA.forward without a cache, as loops in float64. x (b, l, d) -> (b, l, d)."""
    h, hkv = cfg["num_heads"], cfg.get("num_heads_kv") or cfg["num_heads"]
    e = cfg.get("head_dim") or d_model // h
    r = cfg.get("rotary_emb_dim", 0)
    qkv = x @ sd[p + "in_proj.weight"].T
    if p + "in_proj.bias" in sd:
        qkv = qkv + sd[p + "in_proj.bias"]
    b, l, _ = x.shape
    out = torch.zeros(b, l, h * e, dtype=torch.float64)
    theta = torch.tensor([10000.0 ** (-2 * i / r) for i in range(r // 2)], dtype=torch.float64) if r else None
    for bi in range(b):
        for hi in range(h):
            g = hi // (h // hkv)
            q = qkv[bi, :, hi * e : (hi + 1) * e].clone()
            k = qkv[bi, :, h * e + g * e : h * e + (g + 1) * e].clone()
            v = qkv[bi, :, (h + hkv) * e + g * e : (h + hkv) * e + (g + 1) * e]
            if r:
                for m in range(l):
                    rot = torch.polar(torch.ones(r // 2, dtype=torch.float64), m * theta)
                    for t in (q, k):
                        z = torch.complex(t[m, : r // 2], t[m, r // 2 : r]) * rot
                        t[m, : r // 2], t[m, r // 2 : r] = z.real, z.imag
            for m in range(l):
                w = torch.softmax(torch.stack([q[m] @ k[n] / math.sqrt(e) for n in range(m + 1)]), 0)
                out[bi, m, hi * e : (hi + 1) * e] = (w[:, None] * v[: m + 1]).sum(0)
    y = out @ sd[p + "out_proj.weight"].T
    return y + sd[p + "out_proj.bias"] if p + "out_proj.bias" in sd else y


def reference_logits(model, ids):
    cfg, sd = model.config, {k: v.detach() for k, v in model.state_dict().items()}
    h = sd["backbone.embedding.weight"][ids]  # (b, l, d)
    for i, block in enumerate(model.backbone.layers):
        p = f"backbone.layers.{i}."
        x = rms(h, sd[p + "norm.weight"], cfg.norm_eps)
        if i in cfg.attn_layer_idx:
            h = h + mha_reference(sd, p + "mixer.", x, cfg.attn_cfg, cfg.d_model)
        else:
            h = h + block.mixer(x)  # ssmkit's mixer (checked against transformers elsewhere)
        if cfg.d_intermediate:
            a, g = (rms(h, sd[p + "norm2.weight"], cfg.norm_eps) @ sd[p + "mlp.fc1.weight"].T).chunk(2, -1)
            h = h + (a * F.silu(g)) @ sd[p + "mlp.fc2.weight"].T
    return rms(h, sd["backbone.norm_f.weight"], cfg.norm_eps) @ sd["lm_head.weight"].T


@pytest.mark.parametrize("name", list(CASES))
def test_hybrid_matches_the_restated_blocks_and_streams(name, tmp_path):
    model = build(name)
    ids = torch.randint(0, 50, (2, 9), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = reference_logits(model, ids)
        torch.testing.assert_close(model(ids), expected, rtol=1e-9, atol=1e-9)
        cache, parts, start = model.new_cache(2), [], 0
        for n in (3, 1, 1, 4):  # prefill, two single tokens, a chunk: across Mamba and attention layers
            parts.append(model(ids[:, start : start + n], cache=cache))
            start += n
        torch.testing.assert_close(torch.cat(parts, 1), expected, rtol=1e-9, atol=1e-9)


def test_state_dict_keys_are_mamba_ssms_and_the_folder_round_trips(tmp_path):
    model = build("mamba1_gqa_rotary_mlp").float()
    keys = set(model.state_dict())
    attn = {
        f"backbone.layers.1.mixer.{n}"
        for n in ("in_proj.weight", "in_proj.bias", "out_proj.weight", "out_proj.bias")
    }
    mlp = {
        f"backbone.layers.{i}.{n}"
        for i in range(3)
        for n in ("norm2.weight", "mlp.fc1.weight", "mlp.fc2.weight")
    }
    assert attn <= keys and mlp <= keys
    assert model.state_dict()["backbone.layers.1.mixer.in_proj.weight"].shape == (6 * (4 + 2 * 2), 24)
    assert model.state_dict()["backbone.layers.0.mlp.fc1.weight"].shape == (2 * 128, 24)  # 40 -> 128
    model.save_pretrained(tmp_path / "m", format="mamba-ssm")
    saved = json.loads((tmp_path / "m" / "config.json").read_text())
    assert saved["attn_layer_idx"] == [1] and saved["attn_cfg"] == ATTN and saved["d_intermediate"] == 40
    again = load_model(tmp_path / "m")
    ids = torch.randint(0, 50, (1, 7))
    with torch.no_grad():
        torch.testing.assert_close(again(ids), model(ids), rtol=0, atol=0)
    with pytest.raises(ValueError, match="no model with mamba-ssm's hybrid layout"):
        model.save_pretrained(tmp_path / "hf", format="hf")


def test_bad_hybrid_configs():
    with pytest.raises(ValueError, match=r"attn_layer_idx must be a list of layer indices in \[0, 2\)"):
        MambaConfig(
            d_model=8, n_layer=2, vocab_size=10, attn_layer_idx=[2], attn_cfg={"num_heads": 2, "causal": True}
        )
    with pytest.raises(ValueError, match="must say causal: true"):
        MambaConfig(d_model=8, n_layer=2, vocab_size=10, attn_layer_idx=[0], attn_cfg={"num_heads": 2})
    with pytest.raises(ValueError, match="unknown keys"):
        MambaConfig(
            d_model=8, n_layer=2, vocab_size=10, attn_layer_idx=[0], attn_cfg={"num_heads": 2, "x": 1}
        )
