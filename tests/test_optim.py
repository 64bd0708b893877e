"""param_groups: SSM tags (lower lr, no decay), mamba-ssm's _no_weight_decay, biases/norms, tied weights."""

from __future__ import annotations

import pytest
import torch

from ssmkit.models.sequence import SequenceModel, SequenceModelConfig
from ssmkit.train.optim import param_groups


def group_of(groups, name):
    hits = [g for g in groups if name in g["names"]]
    assert len(hits) == 1, name
    return hits[0]


@pytest.mark.parametrize("arch,layer", [("none", "s4d"), ("h3", "s4"), ("mamba", "s6")])
def test_groups(arch, layer):
    model = SequenceModel(
        SequenceModelConfig(vocab_size=13, d_model=8, n_layer=2, arch=arch, layer=layer, d_state=4)
    )
    groups = param_groups(model, weight_decay=0.1, lr=1e-3, ssm_lr=1e-4)
    names = [n for g in groups for n in g["names"]]
    assert len(names) == len(set(names)) == len(list(model.parameters()))  # tied head counted once
    assert sum(len(g["params"]) for g in groups) == len(names)
    emb = group_of(groups, "embedding.weight")
    assert (emb["lr"], emb["weight_decay"]) == (1e-3, 0.1)
    norm = group_of(groups, "layers.0.norm.weight")
    assert (norm["lr"], norm["weight_decay"]) == (1e-3, 0.0)
    ssm_names = {
        "s4d": ["layers.0.mixer.ssm.log_dt", "layers.0.mixer.ssm.A_log_re", "layers.1.mixer.ssm.B"],
        "s4": ["layers.0.mixer.ssm.Lambda_im", "layers.1.mixer.ssm.P", "layers.1.mixer.ssm.log_dt"],
        "s6": ["layers.0.mixer.A_log", "layers.0.mixer.D", "layers.1.mixer.dt_proj.bias"],
    }[layer]
    for n in ssm_names:
        g = group_of(groups, n)
        assert (g["lr"], g["weight_decay"]) == (1e-4, 0.0), n
    proj = next(n for n in names if n.endswith("out_proj.weight"))
    assert group_of(groups, proj)["weight_decay"] == 0.1
    opt = torch.optim.AdamW(groups)
    model(torch.randint(0, 13, (2, 6))).sum().backward()
    opt.step()


def test_untagged_rules_and_overrides():
    lin = torch.nn.Linear(3, 3)
    lin.weight._no_weight_decay = True
    groups = param_groups(lin, weight_decay=0.5, lr=2e-3)
    assert len(groups) == 1 and groups[0]["weight_decay"] == 0.0 and len(groups[0]["params"]) == 2
    lin.weight._ssm_optim = {"lr": 7e-5}
    groups = param_groups(lin, weight_decay=0.5, lr=2e-3, ssm_lr=1e-4)
    g = group_of(groups, "weight")
    assert (g["lr"], g["weight_decay"]) == (7e-5, 0.0)
    lin.weight._ssm_optim = {"momentum": 1}
    with pytest.raises(ValueError, match="_ssm_optim"):
        param_groups(lin, 0.1, 1e-3)
    with pytest.raises(ValueError, match="lr"):
        param_groups(lin, 0.1, 0.0)
    with pytest.raises(ValueError, match="weight_decay"):
        param_groups(lin, -1.0, 1e-3)
