"""Checkpoint I/O: HF and mamba-ssm formats, conversion, errors by key name, atomic writes, pickle safety."""

import json
import os
import pickle

import pytest
import torch
from safetensors.torch import load_file, save_file

from ssmkit import MambaConfig, MambaLM
from ssmkit.models import checkpoint


def make(**kw):
    torch.manual_seed(0)
    base = dict(d_model=16, n_layer=2, vocab_size=60, d_state=4)
    base.update(kw)
    model = MambaLM(MambaConfig(**base)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def assert_same_weights(a: MambaLM, b: MambaLM):
    sa, sb = a.state_dict(), b.state_dict()
    assert sorted(sa) == sorted(sb)
    for k in sa:
        torch.testing.assert_close(sa[k], sb[k], rtol=0, atol=0, msg=k)


@pytest.mark.parametrize("tie", [True, False])
def test_hf_round_trip_and_file_layout(tmp_path, tie):
    model = make(tie_embeddings=tie, bias=True)
    model.save_pretrained(tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["config.json", "model.safetensors"]
    tensors = load_file(tmp_path / "model.safetensors")
    assert "backbone.embeddings.weight" in tensors and "backbone.embedding.weight" not in tensors
    assert ("lm_head.weight" in tensors) == (not tie)
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["hidden_size"] == 16 and cfg["vocab_size"] == 64 and cfg["tie_word_embeddings"] == tie
    assert cfg["use_bias"] is True and cfg["intermediate_size"] == 32 and cfg["time_step_rank"] == 1
    loaded = MambaLM.from_pretrained(tmp_path)
    assert_same_weights(model, loaded)
    assert (loaded.lm_head.weight is loaded.backbone.embedding.weight) == tie
    assert loaded.config.padded_vocab_size == 64


def test_mamba_ssm_round_trip(tmp_path):
    model = make(dt_rank=3, conv_bias=False)
    model.save_pretrained(tmp_path, format="mamba-ssm")
    assert sorted(os.listdir(tmp_path)) == ["config.json", "pytorch_model.bin"]
    sd = torch.load(tmp_path / "pytorch_model.bin", weights_only=True)
    assert "backbone.embedding.weight" in sd and "lm_head.weight" in sd  # mamba-ssm keeps both keys
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["d_model"] == 16 and cfg["n_layer"] == 2 and cfg["vocab_size"] == 60
    assert cfg["ssm_cfg"]["dt_rank"] == 3 and cfg["ssm_cfg"]["conv_bias"] is False
    loaded = MambaLM.from_pretrained(tmp_path)
    assert loaded.config == model.config
    assert_same_weights(model, loaded)


def test_convert_both_ways_is_lossless(tmp_path):
    model = make(tie_embeddings=False)
    model.save_pretrained(tmp_path / "a", format="mamba-ssm")
    checkpoint.convert_checkpoint(tmp_path / "a", tmp_path / "b", to="hf")
    checkpoint.convert_checkpoint(tmp_path / "b", tmp_path / "c", to="mamba-ssm")
    for sub in ("b", "c"):
        assert_same_weights(model, MambaLM.from_pretrained(tmp_path / sub))
    with pytest.raises(ValueError, match="differ"):
        checkpoint.convert_checkpoint(tmp_path / "a", tmp_path / "a")


def test_sharded_safetensors_index(tmp_path):
    model = make()
    model.save_pretrained(tmp_path / "one")
    tensors = load_file(tmp_path / "one" / "model.safetensors")
    keys = sorted(tensors)
    shard = tmp_path / "sharded"
    shard.mkdir()
    weight_map = {}
    for i, part in enumerate([keys[: len(keys) // 2], keys[len(keys) // 2 :]]):
        name = f"model-0000{i + 1}-of-00002.safetensors"
        save_file({k: tensors[k] for k in part}, shard / name)
        weight_map.update({k: name for k in part})
    (shard / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    (shard / "config.json").write_text((tmp_path / "one" / "config.json").read_text())
    assert_same_weights(model, MambaLM.from_pretrained(shard))


def _edit_hf(tmp_path, edit):
    make().save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    edit(tensors)
    save_file(tensors, tmp_path / "model.safetensors")


def test_missing_key_is_named(tmp_path):
    _edit_hf(tmp_path, lambda t: t.pop("backbone.layers.1.mixer.D"))
    with pytest.raises(ValueError, match=r"missing keys \['backbone.layers.1.mixer.D'\]"):
        MambaLM.from_pretrained(tmp_path)


def test_misshaped_and_unexpected_keys_are_named_together(tmp_path):
    def edit(t):
        t["backbone.layers.0.mixer.A_log"] = torch.zeros(32, 5)
        t["backbone.layers.0.mixer.bogus"] = torch.zeros(3)

    _edit_hf(tmp_path, edit)
    with pytest.raises(ValueError) as err:
        MambaLM.from_pretrained(tmp_path)
    msg = str(err.value)
    assert "backbone.layers.0.mixer.A_log: expected (32, 4), got (32, 5)" in msg
    assert "unexpected keys ['backbone.layers.0.mixer.bogus']" in msg


def test_tied_head_that_differs_is_rejected(tmp_path):
    model = make()
    model.save_pretrained(tmp_path, format="mamba-ssm")
    sd = torch.load(tmp_path / "pytorch_model.bin", weights_only=True)
    sd["lm_head.weight"] = sd["lm_head.weight"] + 1
    torch.save(sd, tmp_path / "pytorch_model.bin")
    with pytest.raises(ValueError, match="lm_head.weight differs"):
        MambaLM.from_pretrained(tmp_path)


def test_pickle_is_read_with_weights_only(tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    make().save_pretrained(tmp_path, format="mamba-ssm")
    with open(tmp_path / "pytorch_model.bin", "wb") as f:
        pickle.dump({"backbone.embedding.weight": Evil()}, f, protocol=2)
    with pytest.raises(ValueError, match="pytorch_model.bin is not a plain tensor state dict") as err:
        MambaLM.from_pretrained(tmp_path)
    assert not marker.exists()
    # torch's own message advises weights_only=False, which would run the file's code: never shown
    assert "weights_only" not in str(err.value) and err.value.__suppress_context__


def test_unknown_config_fields_are_errors_naming_file_and_key(tmp_path):
    """A key ssmkit neither maps nor deliberately ignores may change what the weights mean: refused."""
    make().save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["mystery_knob"] = 1
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"config.json: unknown keys \['mystery_knob'\]"):
        MambaLM.from_pretrained(tmp_path)

    ssm = tmp_path / "ssm"
    make().save_pretrained(ssm, format="mamba-ssm")
    cfg = json.loads((ssm / "config.json").read_text())
    cfg["ssm_cfg"]["odd_option"] = True
    (ssm / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"ssm/config.json: unknown ssm_cfg keys \['odd_option'\]"):
        MambaLM.from_pretrained(ssm)
    cfg["ssm_cfg"].pop("odd_option")
    cfg["odd_top_level"] = 0
    (ssm / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"unknown keys \['odd_top_level'\]"):
        MambaLM.from_pretrained(ssm)


def test_generic_transformers_keys_are_accepted_and_ignored(tmp_path):
    """Keys every transformers PretrainedConfig may write (4.x generation defaults included) load."""
    model = make()
    model.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg.update(
        id2label={"0": "LABEL_0"}, label2id={"LABEL_0": 0}, max_length=20, num_beams=1, top_k=50,
        torch_dtype="float32", _name_or_path="x", use_mambapy=False, chunk_size_feed_forward=0,
    )  # fmt: skip
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    assert_same_weights(model, MambaLM.from_pretrained(tmp_path))


@pytest.mark.parametrize(
    "change,match",
    [
        ({"d_intermediate": 64}, r"missing keys \['backbone.layers.0.norm2.weight'"),  # a hybrid: its weights
        ({"attn_layer_idx": [1]}, "attn_cfg needs num_heads"),
        (
            {"attn_layer_idx": [1], "attn_cfg": {"num_heads": 2, "causal": True, "d_conv": 4}},
            "d_conv=4 is not",
        ),
        ({"rms_norm": False}, "rms_norm"),
        ({"ssm_cfg": {"layer": "Mamba3"}}, "ssm_cfg.layer 'Mamba3' is not a mamba-ssm layer"),
    ],
)
def test_unsupported_mamba_ssm_configs(tmp_path, change, match):
    make().save_pretrained(tmp_path, format="mamba-ssm")
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg.update(change)
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=match):
        MambaLM.from_pretrained(tmp_path)


def test_hf_config_consistency_checks():
    good = checkpoint.config_to_hf(MambaConfig(d_model=16, n_layer=1, vocab_size=64))
    assert checkpoint.config_from_hf(good) == MambaConfig(d_model=16, n_layer=1, vocab_size=64)
    explicit = checkpoint.config_from_hf({**good, "time_step_rank": 3})
    assert explicit.dt_rank == 3
    with pytest.raises(ValueError, match="intermediate_size"):
        checkpoint.config_from_hf({**good, "intermediate_size": 33})
    # transformers builds the mixer from intermediate_size, whatever expand says
    assert checkpoint.config_from_hf({**good, "expand": 16, "intermediate_size": 48}).d_inner == 48
    with pytest.raises(ValueError, match="hidden_act"):
        checkpoint.config_from_hf({**good, "hidden_act": "gelu"})
    with pytest.raises(ValueError, match="num_hidden_layers"):
        checkpoint.config_from_hf({k: v for k, v in good.items() if k != "num_hidden_layers"})


def test_no_files_on_failed_save(tmp_path, monkeypatch):
    model = make()
    bad = dict(model.state_dict())
    bad.pop("backbone.norm_f.weight")
    with pytest.raises(ValueError, match="norm_f"):
        checkpoint.save_checkpoint(tmp_path / "x", model.config, bad)
    assert not (tmp_path / "x").exists()

    # a crash while writing leaves neither the target nor a temporary file behind
    import safetensors.torch

    def boom(tensors, path, metadata=None):
        with open(path, "wb") as f:
            f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", boom)
    with pytest.raises(OSError, match="disk full"):
        model.save_pretrained(tmp_path / "y")
    assert os.listdir(tmp_path / "y") == []


def test_missing_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        MambaLM.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(checkpoint.config_to_hf(make().config)))
    with pytest.raises(FileNotFoundError, match="no weights"):
        MambaLM.from_pretrained(tmp_path)


def test_released_style_configs_load_without_warnings(tmp_path):
    """Config layouts of the released checkpoints (state-spaces/mamba-*-hf and state-spaces/mamba-*) map
    without warnings."""
    model = make(vocab_size=64)
    hf_dir, ssm_dir = tmp_path / "hf", tmp_path / "ssm"
    model.save_pretrained(hf_dir)
    model.save_pretrained(ssm_dir, format="mamba-ssm")
    hf_released = {  # state-spaces/mamba-*-hf layout, legacy mamba-ssm keys included
        "architectures": ["MambaForCausalLM"], "bos_token_id": 0, "conv_kernel": 4, "d_inner": 32,
        "d_model": 16, "eos_token_id": 0, "expand": 2, "fused_add_norm": True, "hidden_act": "silu",
        "hidden_size": 16, "initializer_range": 0.1, "intermediate_size": 32, "layer_norm_epsilon": 1e-05,
        "model_type": "mamba", "n_layer": 2, "num_hidden_layers": 2, "pad_token_id": 0,
        "pad_vocab_size_multiple": 8, "rescale_prenorm_residual": False, "residual_in_fp32": True,
        "rms_norm": True, "ssm_cfg": {}, "state_size": 4, "time_step_floor": 0.0001,
        "time_step_init_scheme": "random", "time_step_max": 0.1, "time_step_min": 0.001, "time_step_rank": 1,
        "time_step_scale": 1.0, "torch_dtype": "float32", "transformers_version": "4.39.0.dev0",
        "use_bias": False, "use_cache": True, "use_conv_bias": True, "vocab_size": 64,
    }  # fmt: skip
    ssm_released = {  # state-spaces/mamba-* layout (d_state etc. default in ssm_cfg)
        "d_model": 16, "n_layer": 2, "vocab_size": 64, "ssm_cfg": {"d_state": 4}, "rms_norm": True,
        "residual_in_fp32": True, "fused_add_norm": True, "pad_vocab_size_multiple": 8,
    }  # fmt: skip
    (hf_dir / "config.json").write_text(json.dumps(hf_released))
    (ssm_dir / "config.json").write_text(json.dumps(ssm_released))
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for folder in (hf_dir, ssm_dir):
            loaded = MambaLM.from_pretrained(folder)
            assert loaded.config == model.config
            assert_same_weights(model, loaded)
