"""Loading a model folder that is wrong in one way: each is one ValueError / FileNotFoundError whose one
line names the file and the cause. Every bad file is built here, in tmp_path, from a good folder."""

import ast
import json
import os
import pickle
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from ssmkit import MambaConfig, MambaLM, TransformerLM
from ssmkit.models.load import load_model, model_type_of
from ssmkit.models.transformer_lm import TransformerConfig

SRC = Path(__file__).resolve().parents[1] / "src" / "ssmkit"


def mamba(seed: int = 0) -> MambaLM:
    torch.manual_seed(seed)
    model = MambaLM(MambaConfig(d_model=16, n_layer=2, vocab_size=64, d_state=4))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))  # off the structured init
    return model


def same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sorted(sa) == sorted(sb)
    for k in sa:
        torch.testing.assert_close(sa[k], sb[k], rtol=0, atol=0, msg=k)


@pytest.fixture
def hf_dir(tmp_path) -> Path:
    mamba().save_pretrained(tmp_path / "hf")
    return tmp_path / "hf"


@pytest.fixture
def ssm_dir(tmp_path) -> Path:
    mamba().save_pretrained(tmp_path / "ssm", format="mamba-ssm")
    return tmp_path / "ssm"


def one_line_error(exc_type, path, *fragments):
    """Load ``path`` both ways (MambaLM.from_pretrained and load_model); both must raise ``exc_type`` whose
    message is one line containing every fragment."""
    for load in (MambaLM.from_pretrained, load_model):
        with pytest.raises(exc_type) as err:
            load(path)
        msg = str(err.value)
        assert "\n" not in msg, msg
        for fragment in fragments:
            assert fragment in msg, (fragment, msg)


# ---------------------------------------------------------------------------- weights files
def test_truncated_safetensors_names_the_file(hf_dir):
    data = (hf_dir / "model.safetensors").read_bytes()
    (hf_dir / "model.safetensors").write_bytes(data[: len(data) // 2])
    one_line_error(ValueError, hf_dir, str(hf_dir / "model.safetensors"), "truncated")


def test_empty_safetensors_names_the_file(hf_dir):
    (hf_dir / "model.safetensors").write_bytes(b"")
    one_line_error(ValueError, hf_dir, str(hf_dir / "model.safetensors"), "empty")


def test_truncated_transformer_weights_name_the_file(tmp_path):
    torch.manual_seed(0)
    TransformerLM(TransformerConfig(d_model=16, n_layer=1, vocab_size=32, n_head=2)).save_pretrained(tmp_path)
    data = (tmp_path / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(data[:-10])
    with pytest.raises(ValueError, match="model.safetensors is not a readable safetensors file"):
        load_model(tmp_path)


def test_transformer_folder_errors_with_shards_and_dtypes(tmp_path):
    """A TransformerLM folder: an index naming a missing shard, no weights at all, and a config dtype that
    is not a model dtype are each one line naming the file."""
    torch.manual_seed(0)
    TransformerLM(TransformerConfig(d_model=16, n_layer=1, vocab_size=32, n_head=2)).save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "dtype": "int4"}))
    one_line_error_any(ValueError, tmp_path, "config.json: dtype must be one of", "'int4'")
    (tmp_path / "config.json").write_text(json.dumps(config))
    (tmp_path / "model.safetensors").unlink()
    one_line_error_any(FileNotFoundError, tmp_path, "model.safetensors not found")
    index = {"weight_map": {"embedding.weight": "model-00001-of-00002.safetensors"}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    one_line_error_any(FileNotFoundError, tmp_path, "lists shard 'model-00001-of-00002.safetensors'")


def one_line_error_any(exc_type, path, *fragments):
    """``load_model(path)`` and ``TransformerLM.from_pretrained(path)`` raise ``exc_type``, one line with
    every fragment."""
    for load in (TransformerLM.from_pretrained, load_model):
        with pytest.raises(exc_type) as err:
            load(path)
        msg = str(err.value)
        assert "\n" not in msg and all(f in msg for f in fragments), msg


@pytest.mark.parametrize(
    "content,fragment",
    [
        ({"model": {"w": torch.zeros(2)}}, "key 'model' holds a dict"),  # a training checkpoint, nested
        ([torch.zeros(2)], "holds a list"),
        ({"backbone.embedding.weight": 3}, "holds a int"),
    ],
)
def test_pickle_that_is_not_a_flat_tensor_dict(ssm_dir, content, fragment):
    torch.save(content, ssm_dir / "pytorch_model.bin")
    one_line_error(ValueError, ssm_dir, "pytorch_model.bin is not a plain tensor state dict", fragment)


def test_pickle_with_objects_is_refused_without_torchs_advice(ssm_dir, tmp_path):
    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return (os.makedirs, (str(marker),))

    with open(ssm_dir / "pytorch_model.bin", "wb") as fh:
        pickle.dump({"backbone.embedding.weight": Payload()}, fh, protocol=2)
    with pytest.raises(ValueError) as err:
        MambaLM.from_pretrained(ssm_dir)
    msg = str(err.value)
    assert "not a plain tensor state dict (it needs os.makedirs)" in msg  # names what it asked for
    assert "weights_only" not in msg and err.value.__suppress_context__  # torch's advice is never shown
    assert not marker.exists()


def test_damaged_and_empty_pickles(ssm_dir):
    data = (ssm_dir / "pytorch_model.bin").read_bytes()
    (ssm_dir / "pytorch_model.bin").write_bytes(data[: len(data) // 3])
    one_line_error(ValueError, ssm_dir, "pytorch_model.bin is not a readable PyTorch checkpoint")
    (ssm_dir / "pytorch_model.bin").write_bytes(b"")
    one_line_error(ValueError, ssm_dir, "pytorch_model.bin is empty")


# ---------------------------------------------------------------------------- config.json
@pytest.mark.parametrize(
    "raw,fragment",
    [
        (b"", "config.json is empty"),
        (b"   \n", "config.json is empty"),
        (b'{"hidden_size": 16,', "config.json is not valid JSON"),
        (b'{"hidden_size": "\xff\xfe"}', "config.json is not UTF-8 text"),
        (b"[1, 2, 3]", "config.json holds a JSON list"),
        (b'"mamba"', "config.json holds a JSON str"),
    ],
)
def test_unreadable_config_json(hf_dir, raw, fragment):
    (hf_dir / "config.json").write_bytes(raw)
    one_line_error(ValueError, hf_dir, fragment, str(hf_dir))


@pytest.mark.parametrize(
    "key,value,fragment",
    [
        ("hidden_size", "16", "hidden_size must be of type int, got '16'"),
        ("num_hidden_layers", 2.5, "num_hidden_layers must be of type int"),
        ("use_bias", "no", "use_bias must be of type bool"),
        ("hidden_size", 0, "hidden_size must be a positive int"),
        ("layer_norm_epsilon", None, "layer_norm_epsilon must be of type float"),
        ("model_type", 7, "model_type must be a string"),
    ],
)
def test_hf_config_values_of_the_wrong_type_name_file_and_key(hf_dir, key, value, fragment):
    cfg = json.loads((hf_dir / "config.json").read_text())
    cfg[key] = value
    (hf_dir / "config.json").write_text(json.dumps(cfg))
    one_line_error(ValueError, hf_dir, str(hf_dir / "config.json"), fragment)


@pytest.mark.parametrize(
    "edit,fragment",
    [
        (lambda c: c.update(d_model="16"), "d_model must be of type int"),
        (lambda c: c.update(ssm_cfg=[1]), "ssm_cfg must be a JSON object"),
        (lambda c: c["ssm_cfg"].update(d_state="4"), "d_state must be of type int"),
        (lambda c: c.update(tie_embeddings=1), "tie_embeddings must be of type bool"),
    ],
)
def test_mamba_ssm_config_values_of_the_wrong_type(ssm_dir, edit, fragment):
    cfg = json.loads((ssm_dir / "config.json").read_text())
    edit(cfg)
    (ssm_dir / "config.json").write_text(json.dumps(cfg))
    one_line_error(ValueError, ssm_dir, str(ssm_dir / "config.json"), fragment)


def test_mamba_config_from_dict_is_strict():
    cfg = MambaConfig(d_model=16, n_layer=1, vocab_size=64)
    assert MambaConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match=r"run.json: unknown keys \['frobnicate'\]"):
        MambaConfig.from_dict({**cfg.to_dict(), "frobnicate": 3}, where="run.json")
    with pytest.raises(ValueError, match="d_state must be of type int"):
        MambaConfig.from_dict({**cfg.to_dict(), "d_state": "4"})


# ---------------------------------------------------------------------------- sharded folders
def _shard(folder: Path, weight_map_of) -> Path:
    """``folder`` as a two-shard safetensors folder whose index maps to ``weight_map_of(names)``."""
    tensors = load_file(folder / "model.safetensors")
    (folder / "model.safetensors").unlink()
    keys = sorted(tensors)
    names = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    for name, part in zip(names, [keys[: len(keys) // 2], keys[len(keys) // 2 :]]):
        save_file({k: tensors[k] for k in part}, folder / name)
    weight_map = {k: names[0] if k in keys[: len(keys) // 2] else names[1] for k in keys}
    index = folder / "model.safetensors.index.json"
    index.write_text(json.dumps(weight_map_of(weight_map)))
    return index


def test_index_without_weight_map(hf_dir):
    index = _shard(hf_dir, lambda wm: {"metadata": {"total_size": 1}})
    one_line_error(ValueError, hf_dir, str(index), "has no 'weight_map'")


def test_index_that_is_not_json(hf_dir):
    index = _shard(hf_dir, lambda wm: {})
    index.write_text("{not json")
    one_line_error(ValueError, hf_dir, str(index), "is not valid JSON")


def test_index_naming_a_missing_shard(hf_dir):
    index = _shard(hf_dir, lambda wm: {"weight_map": {**wm, "backbone.norm_f.weight": "model-3.safetensors"}})
    one_line_error(FileNotFoundError, hf_dir, str(index), "'model-3.safetensors'")


@pytest.mark.parametrize("where", ["parent", "absolute", "nested-parent"])
def test_shard_paths_outside_the_folder_are_refused(hf_dir, tmp_path, where):
    """A shard outside the model folder is never opened, even when it exists and holds valid tensors."""
    outside = tmp_path / "outside.safetensors"
    name = {"parent": "../outside.safetensors", "absolute": str(outside), "nested-parent": "a/../../x"}[where]

    def redirect(wm):
        first = sorted(wm)[0]
        save_file({first: load_file(hf_dir / wm[first])[first]}, outside)
        return {"weight_map": {**wm, first: name}}

    index = _shard(hf_dir, redirect)
    fragment = "is absolute" if where == "absolute" else "leaves the model folder"
    one_line_error(ValueError, hf_dir, str(index), repr(name), fragment)


def test_sharded_pickles_load(ssm_dir, tmp_path):
    """Sharded pytorch_model.bin folders still load (the index is read through the same checks)."""
    model = MambaLM.from_pretrained(ssm_dir)
    sd = torch.load(ssm_dir / "pytorch_model.bin", weights_only=True)
    (ssm_dir / "pytorch_model.bin").unlink()
    keys = sorted(sd)
    wm = {}
    for i, part in enumerate([keys[:5], keys[5:]]):
        name = f"pytorch_model-0000{i + 1}-of-00002.bin"
        torch.save({k: sd[k] for k in part}, ssm_dir / name)
        wm.update({k: name for k in part})
    (ssm_dir / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": wm}))
    same_weights(model, MambaLM.from_pretrained(ssm_dir))


# ---------------------------------------------------------------------------- model type first
LLAMA = {  # the config.json transformers writes for a (tiny) LlamaForCausalLM
    "architectures": ["LlamaForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
    "bos_token_id": 1, "eos_token_id": 2, "head_dim": 4, "hidden_act": "silu", "hidden_size": 16,
    "initializer_range": 0.02, "intermediate_size": 44, "max_position_embeddings": 128, "mlp_bias": False,
    "model_type": "llama", "num_attention_heads": 4, "num_hidden_layers": 2, "num_key_value_heads": 4,
    "pretraining_tp": 1, "rms_norm_eps": 1e-06, "rope_scaling": None, "rope_theta": 10000.0,
    "tie_word_embeddings": False, "torch_dtype": "float32", "transformers_version": "4.46.0",
    "use_cache": True, "vocab_size": 64,
}  # fmt: skip
MAMBA2_HF = {  # transformers' Mamba2ForCausalLM
    "architectures": ["Mamba2ForCausalLM"], "model_type": "mamba2", "hidden_size": 64, "num_heads": 2,
    "head_dim": 64, "n_groups": 1, "state_size": 16, "num_hidden_layers": 2, "vocab_size": 64,
    "expand": 2, "conv_kernel": 4, "chunk_size": 256, "use_bias": False, "use_conv_bias": True,
}  # fmt: skip
MAMBA2_SSM = {  # mamba-ssm's MambaLMHeadModel with Mamba-2 mixers
    "d_model": 64, "d_intermediate": 0, "n_layer": 2, "vocab_size": 64,
    "ssm_cfg": {"layer": "Mamba2", "d_state": 16}, "attn_layer_idx": [], "attn_cfg": {}, "rms_norm": True,
    "residual_in_fp32": True, "fused_add_norm": True, "pad_vocab_size_multiple": 8, "tie_embeddings": True,
}  # fmt: skip


@pytest.mark.parametrize("config,found", [(LLAMA, "llama")], ids=["llama"])
def test_other_model_types_are_one_line_naming_found_and_supported(hf_dir, config, found):
    """The weights stay the Mamba folder's; only the model type is checked, so no key dump can appear."""
    (hf_dir / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError) as err:
        load_model(hf_dir)
    msg = str(err.value)
    assert "\n" not in msg and len(msg) < 400, msg
    assert f"model type {found!r} is not supported" in msg
    assert "'mamba'" in msg and "'mamba2'" in msg and "'ssmkit-transformer'" in msg  # the supported types
    assert "missing" not in msg and "unexpected" not in msg
    with pytest.raises(ValueError, match=f"model type {found!r} is not a Mamba model") as err:
        MambaLM.from_pretrained(hf_dir)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("config", [MAMBA2_HF, MAMBA2_SSM], ids=["hf", "ssm"])
def test_a_mamba2_config_over_mamba1_weights_names_the_mismatch_in_one_line(hf_dir, config):
    """Mamba-2 is a supported type: its config is read as one, and Mamba-1 weights do not fit it."""
    (hf_dir / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="does not match the config") as err:
        load_model(hf_dir)
    assert "\n" not in str(err.value)


def test_config_without_any_model_type(hf_dir):
    (hf_dir / "config.json").write_text(json.dumps({"vocab_size": 64}))
    one_line_error(ValueError, hf_dir, "has no 'model_type'")


def test_load_model_dispatches_on_model_type(hf_dir, ssm_dir, tmp_path):
    ref = mamba()
    for folder in (hf_dir, ssm_dir):
        assert model_type_of(folder) == "mamba"
        loaded = load_model(folder)
        assert type(loaded) is MambaLM
        same_weights(ref, loaded)
    torch.manual_seed(3)
    tf = TransformerLM(TransformerConfig(d_model=16, n_layer=1, vocab_size=32, n_head=2))
    tf.save_pretrained(tmp_path / "tf")
    loaded = load_model(tmp_path / "tf")
    assert type(loaded) is TransformerLM and model_type_of(tmp_path / "tf") == "ssmkit-transformer"
    same_weights(tf, loaded)


# ---------------------------------------------------------------------------- not a model folder
def test_missing_folder_and_file_instead_of_folder(tmp_path, hf_dir):
    one_line_error(FileNotFoundError, tmp_path / "nope", "model folder", "does not exist")
    one_line_error(NotADirectoryError, hf_dir / "model.safetensors", "is a file, expected a model folder")


def test_training_run_folder_points_at_its_model_folder(tmp_path):
    run = tmp_path / "run"
    mamba().save_pretrained(run / "model")
    (run / "checkpoint.safetensors").write_bytes(b"")
    one_line_error(FileNotFoundError, run, "no config.json", f"pass its model folder {run / 'model'}")
    (run / "model").rename(tmp_path / "elsewhere")
    one_line_error(FileNotFoundError, run, "training checkpoint", "ssmkit eval")


def test_checkpoint_module_imports_no_model_class():
    """mamba_lm imports checkpoint (in from_pretrained); checkpoint (or what it imports) importing a model
    back would be a circle. Only models/load.py imports both model classes."""
    for name in ("checkpoint.py", "folder.py", "config.py"):
        imported = set()
        for node in ast.walk(ast.parse((SRC / "models" / name).read_text())):  # module- and function-level
            if isinstance(node, ast.ImportFrom) and node.module:
                imported.add(node.module)
                imported.update(f"{node.module}.{a.name}" for a in node.names)
            elif isinstance(node, ast.Import):
                imported.update(a.name for a in node.names)
        forbidden = {"ssmkit.models.mamba_lm", "ssmkit.models.transformer_lm", "ssmkit.models.load", "ssmkit"}
        assert not imported & forbidden, (name, imported & forbidden)
        assert not any(m.startswith("ssmkit.cli") for m in imported), name
