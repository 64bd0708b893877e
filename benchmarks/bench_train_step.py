"""Training-step time and streamed-forward throughput of the Table 1 / Table 11 model (docs/benchmarks.md).

    python benchmarks/bench_train_step.py                 # 1 and 2 threads, batch 16, medians
    python benchmarks/bench_train_step.py --arch mamba2   # the same with the Mamba-2 (SSD) block
    PYTHONPATH=OLD_CHECKOUT/src python benchmarks/bench_train_step.py   # the same for another version

The model is ``SequenceModel(arch=mamba, layer=s6)`` (or ``arch=mamba2, layer=ssd``), 2 layers, d_model
64 (66 496 parameters), on default-size Selective Copying (L = 256 + 16 markers); one step is forward,
masked cross-entropy, backward and AdamW, as in ``ssmkit.train``. The streamed forward runs (b, 8192)
tokens through the recurrent state, as ``ssmkit eval`` does for long sequences. Prints one line per
setting.
"""

from __future__ import annotations

import argparse

import torch

from ssmkit.bench.machine import median_time
from ssmkit.tasks.base import masked_loss_sums
from ssmkit.train.build import build_model, build_task, sequence_model_spec, task_spec
from ssmkit.utils import parse_list


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", default="1,2", help="comma-separated torch thread counts")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--repeats", type=int, default=30)
    p.add_argument("--arch", choices=("mamba", "mamba2"), default="mamba", help="mamba2: the SSD block")
    args = p.parse_args()
    layer = "ssd" if args.arch == "mamba2" else "s6"
    spec = sequence_model_spec(vocab_size=16, d_model=64, n_layer=2, arch=args.arch, layer=layer, d_state=16)
    torch.manual_seed(0)
    model = build_model(spec)
    task = build_task(task_spec("selective-copying", 256, 16))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    step_no = [0]

    def train_step():
        batch = task.train_batch(step_no[0], args.batch_size)
        step_no[0] += 1
        loss_sum, _, n = masked_loss_sums(model(batch.inputs), batch.targets)
        opt.zero_grad(set_to_none=True)
        (loss_sum / n).backward()
        opt.step()

    ids = torch.randint(0, 15, (16, 8192))

    @torch.no_grad()
    def streamed_forward():
        model(ids, cache=model.new_cache(ids.shape[0]))

    for th in parse_list(args.threads, int, "--threads"):
        torch.set_num_threads(th)
        step = median_time(train_step, args.repeats, warmup=3)
        fwd = median_time(streamed_forward, max(3, args.repeats // 10), warmup=1)
        print(
            f"threads {th}: train step (batch {args.batch_size}) {1e3 * step:.1f} ms · "
            f"streamed forward (16 × 8192) {ids.numel() / fwd / 1e3:.0f} K tokens/s",
            flush=True,
        )


if __name__ == "__main__":
    main()
