"""Peak memory of loading a sharded safetensors checkpoint: ``MambaLM.from_pretrained`` on a ~1B-parameter
bfloat16 model (random weights, d_model 2048, 36 layers, vocabulary 50280, untied head) written as
``--shards`` files with a ``model.safetensors.index.json``, as the Hub's large checkpoints are.

The load runs in a fresh child process (``python -c``), whose peak resident set size (``VmHWM`` of
/proc/self/status: the high-water mark of this process image only — ``ru_maxrss`` would carry the RSS of
the parent it was forked from) is reported beside the weights' bytes and the RSS of the
interpreter with torch and ssmkit imported and nothing loaded — the floor. A loader that holds the file's
tensors and the model's copy of them at once peaks near floor + 2 × weights; one that streams tensor by
tensor near floor + 1 × weights.

    python benchmarks/bench_load_memory.py                     # writes the folder once into /tmp, ~4 GB
    python benchmarks/bench_load_memory.py --folder DIR --layers 12
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

PEAK = """
{load}
print([int(x.split()[1]) * 1024 for x in open("/proc/self/status") if x.startswith("VmHWM:")][0])
"""


def write_folder(folder: Path, layers: int, shards: int) -> int:
    """A random bfloat16 MambaLM saved as ``shards`` safetensors files + index; returns its parameters."""
    import torch
    from safetensors.torch import save_file

    from ssmkit import MambaConfig, MambaLM
    from ssmkit.models.checkpoint import config_to_hf

    config = MambaConfig(d_model=2048, n_layer=layers, vocab_size=50280, tie_embeddings=False)
    torch.manual_seed(0)
    with torch.device("meta"):
        shapes = {k: (v.shape, v.dtype) for k, v in MambaLM(config).state_dict().items()}
    folder.mkdir(parents=True, exist_ok=True)
    names = list(shapes)
    per = -(-len(names) // shards)
    weight_map, total = {}, 0
    for i in range(shards):
        file = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = {}
        for k in names[i * per : (i + 1) * per]:
            shape, dtype = shapes[k]
            t = (
                torch.randn(shape, dtype=torch.float32) * 0.02
                if dtype.is_floating_point
                else torch.zeros(shape)
            )
            key = "backbone.embeddings.weight" if k == "backbone.embedding.weight" else k
            part[key] = t.to(torch.bfloat16)
            weight_map[key] = file
            total += t.numel()
        save_file(part, str(folder / file), metadata={"format": "pt"})
    hf = config_to_hf(config) | {"dtype": "bfloat16"}
    (folder / "config.json").write_text(json.dumps(hf))
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": weight_map})
    )
    return total


def peak_rss(load: str) -> int:
    """Peak RSS in bytes of a child interpreter that runs ``load``."""
    out = subprocess.run(
        [sys.executable, "-c", PEAK.format(load=load)], capture_output=True, text=True, check=True
    )
    return int(out.stdout.strip().splitlines()[-1])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--folder", type=Path, default=Path("/tmp/ssmkit-1b-bf16"))
    ap.add_argument("--layers", type=int, default=36, help="36 layers of d_model 2048: 1.05B parameters")
    ap.add_argument("--shards", type=int, default=3)
    args = ap.parse_args()
    if not (args.folder / "model.safetensors.index.json").is_file():
        n = write_folder(args.folder, args.layers, args.shards)
        print(f"wrote {n / 1e9:.2f}B parameters to {args.folder}", file=sys.stderr)
    weights = sum(p.stat().st_size for p in args.folder.glob("*.safetensors"))
    floor = peak_rss("import torch, ssmkit")
    peak = peak_rss(f"import torch, ssmkit; m = ssmkit.MambaLM.from_pretrained({str(args.folder)!r})")
    print(f"weights on disk: {weights / 2**30:.2f} GiB in {args.shards} shards")
    print(f"peak RSS, import only: {floor / 2**30:.2f} GiB")
    print(
        f"peak RSS, from_pretrained: {peak / 2**30:.2f} GiB"
        f" = floor + {(peak - floor) / weights:.2f} × weights"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
