"""Whole-model benchmark: ssmkit's MambaLM against the CPU Mamba language models people use today.

The mamba-130m shape (d_model 768, 24 layers, vocab 50280, d_state 16, expand 2, d_conv 4), batch 1,
float32, random weights (no download), 2 threads per case by default:

    ours (cpu)        ssmkit.MambaLM, selective scan on the fused C++ kernel (SSMKIT_SCAN_BACKEND=cpu)
    ours (chunked)    ssmkit.MambaLM, selective scan on the pure-PyTorch chunked backend
    transformers      transformers' MambaForCausalLM built from a MambaConfig (its slow path on CPU:
                      a Python loop over time, use_mambapy=False)
    mambapy           mambapy.lm.LM(mambapy.mamba.MambaConfig) (its pscan; untied LM head, as mambapy has)

Metrics, for every length in --lengths (default 512 and 2048):
    forward        tokens/s of ``model(ids)`` (all logits) under ``torch.no_grad()``
    training step  tokens/s of forward + next-token cross-entropy + backward + AdamW step (fused=True,
                   the same optimiser for every implementation) + zero_grad
    peak RSS       the case's process high-water mark (VmHWM: weights, optimiser state, activations)

Every (implementation, mode, length) case runs in its own subprocess — so its peak memory is its own
and a peer that runs for minutes or exhausts memory cannot hang the benchmark: one warm-up run, then
up to --repeats timed runs (--peer-repeats for the peers), medians reported, within a wall-clock
budget per case (--budget). A case whose first timed run does not finish within the budget is reported
as "> budget"; a case whose RSS passes --mem-cap-gb is killed and reported as "OOM (> cap)". With
--jobs N, N cases run at once, each pinned to its own --threads cores (use only with ≥ N·threads idle
cores; the default 1 runs the cases one after another).

    python benchmarks/bench_model.py                         # the full table (takes tens of minutes)
    python benchmarks/bench_model.py --lengths 2048 --impls ours-cpu transformers
    python benchmarks/bench_model.py --quick                 # tiny smoke run (seconds)
    python benchmarks/bench_model.py --profile --lengths 2048 --impls ours-cpu
                                                             # where our forward and training step spend time
"""

from __future__ import annotations

import argparse
import collections
import functools
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time

IMPLS = ("ours-cpu", "ours-chunked", "transformers", "mambapy")
LABELS = {
    "ours-cpu": "ours (cpu)",
    "ours-chunked": "ours (chunked)",
    "transformers": "transformers MambaForCausalLM",
    "mambapy": "mambapy",
}
MODES = ("forward", "train")
SHAPE = dict(d_model=768, n_layer=24, vocab_size=50280)
QUICK_SHAPE = dict(d_model=64, n_layer=2, vocab_size=1000)


# ---------------------------------------------------------------------------------------- the models
def build_model(impl: str, shape: dict):
    """The implementation's language model (float32, random init) and a function ids -> logits."""
    d, n_layer, vocab = shape["d_model"], shape["n_layer"], shape["vocab_size"]
    if impl in ("ours-cpu", "ours-chunked"):
        from ssmkit import MambaConfig, MambaLM

        model = MambaLM(MambaConfig(d_model=d, n_layer=n_layer, vocab_size=vocab))
        return model, model
    if impl == "transformers":
        from transformers import MambaConfig, MambaForCausalLM

        cfg = MambaConfig(
            vocab_size=vocab,
            hidden_size=d,
            num_hidden_layers=n_layer,
            state_size=16,
            expand=2,
            conv_kernel=4,
            use_mambapy=False,
        )
        model = MambaForCausalLM(cfg)
        return model, lambda ids: model(ids, use_cache=False).logits
    if impl == "mambapy":
        return _mambapy_lm(shape)
    raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")


def _mambapy_lm(shape: dict):
    """mambapy's language model: ``mambapy.lm.LM``'s forward (embedding -> mambapy.mamba.Mamba -> RMSNorm ->
    untied LM head, its default llama2.c-style init), rebuilt here from ``mambapy.mamba`` because
    ``mambapy.lm`` also imports its Mamba-2 module, which needs ``einops`` (not installed here)."""
    import torch
    from mambapy.mamba import Mamba, MambaConfig, RMSNorm
    from torch import nn

    d, vocab = shape["d_model"], shape["vocab_size"]
    vocab += (-vocab) % 8  # pad_vocab_size_multiple=8, as LM(..., pad_vocab_size_multiple=8)
    cfg = MambaConfig(d_model=d, n_layers=shape["n_layer"])

    class LM(nn.Module):
        def __init__(self):
            super().__init__()
            self.config = cfg
            self.embedding = nn.Embedding(vocab, d, padding_idx=0)
            self.mamba = Mamba(cfg)
            self.norm_f = RMSNorm(d, cfg.rms_norm_eps, cfg.mup)
            self.lm_head = nn.Linear(d, vocab, bias=False)
            for m in self.modules():  # LM._init_weights
                if isinstance(m, (nn.Linear, nn.Embedding)):
                    nn.init.normal_(m.weight, mean=0.0, std=cfg.base_std)
                if isinstance(m, nn.Linear) and m.bias is not None:
                    nn.init.zeros_(m.bias)
            for name, p in self.named_parameters():  # then LM's out_proj rescale
                if name.endswith("mixer.out_proj.weight"):
                    nn.init.normal_(p, mean=0.0, std=cfg.base_std / (2 * cfg.n_layers) ** 0.5)

        def forward(self, tokens: torch.Tensor) -> torch.Tensor:
            x = self.embedding(tokens)  # (b, l, d)
            return self.lm_head(self.norm_f(self.mamba(x)))  # (b, l, V)

    model = LM()
    return model, model


def _rss_status() -> dict:
    """VmRSS and VmHWM of this process in bytes (Linux /proc)."""
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(("VmRSS:", "VmHWM:")):
                key, value, _unit = line.split()
                out[key[:-1]] = int(value) * 1024
    return out


_T0 = time.perf_counter()


def _emit(record: dict) -> None:
    """One line the driver parses; ``t`` = seconds since this worker started (to bound an unfinished run)."""
    print("RESULT " + json.dumps({**record, "t": time.perf_counter() - _T0}), flush=True)


def worker(impl: str, mode: str, length: int, repeats: int, threads: int, quick: bool, seed: int) -> None:
    """One case in this process: warm-up, then timed runs; every run is printed at once (a killed worker
    still leaves the runs it finished)."""
    if impl in ("ours-cpu", "ours-chunked"):
        os.environ["SSMKIT_SCAN_BACKEND"] = impl.split("-")[1]
    import torch
    import torch.nn.functional as F

    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    shape = QUICK_SHAPE if quick else SHAPE
    model, logits_of = build_model(impl, shape)
    ids = torch.randint(0, shape["vocab_size"], (1, length))  # (1, l)
    if mode == "forward":
        model.eval()

        def run() -> None:
            with torch.no_grad():
                logits_of(ids)

    else:
        model.train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)

        def run() -> None:
            logits = logits_of(ids)  # (1, l, V)
            loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

    from ssmkit.utils import count_parameters

    n_params = count_parameters(model)
    _emit({"event": "built", "rss": _rss_status()["VmRSS"], "params": n_params})
    t0 = time.perf_counter()
    run()
    _emit({"event": "warmup", "seconds": time.perf_counter() - t0, **_rss_status()})
    for _ in range(repeats):
        t0 = time.perf_counter()
        run()
        _emit({"event": "run", "seconds": time.perf_counter() - t0, **_rss_status()})
    _emit({"event": "done", **_rss_status()})


# ---------------------------------------------------------------------------------------- the driver
def _child_rss(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


@functools.cache
def _can_pin() -> bool:
    """Whether ``taskset`` exists and may set CPU affinity here (some sandboxes refuse)."""
    if not shutil.which("taskset"):
        return False
    return subprocess.run(["taskset", "-c", "0", "true"], capture_output=True).returncode == 0


def run_case(impl, mode, length, args, cores: list[int] | None) -> dict:
    """Run one case in a subprocess within the time budget and memory cap; parse what it printed."""
    repeats = args.repeats if impl.startswith("ours") else args.peer_repeats
    budget = args.ours_budget if impl.startswith("ours") else args.budget
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", impl, mode, str(length)]
    cmd += ["--repeats", str(repeats), "--threads", str(args.threads), "--seed", str(args.seed)]
    if args.quick:
        cmd.append("--quick")
    if cores is not None and _can_pin():
        cmd = ["taskset", "-c", ",".join(map(str, cores))] + cmd
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", OMP_NUM_THREADS=str(args.threads))
    start = time.perf_counter()
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, start_new_session=True
    )
    lines: list[str] = []
    err: list[str] = []
    readers = [
        threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True),
        threading.Thread(target=lambda: err.extend(proc.stderr), daemon=True),
    ]
    for t in readers:
        t.start()
    killed = None
    peak_seen = 0
    while proc.poll() is None:
        rss = _child_rss(proc.pid)
        peak_seen = max(peak_seen, rss)
        if args.mem_cap_gb and rss > args.mem_cap_gb * 2**30:
            killed = "oom"
        elif time.perf_counter() - start > budget:
            killed = "budget"
        if killed:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            break
        time.sleep(0.1)
    for t in readers:
        t.join(timeout=5)
    records = [json.loads(ln[7:]) for ln in lines if ln.startswith("RESULT ")]
    runs = [r["seconds"] for r in records if r["event"] == "run"]
    hwm = max([r.get("VmHWM", 0) for r in records] + [peak_seen])
    res = {
        "impl": impl,
        "mode": mode,
        "length": length,
        "runs": runs,
        "warmup_s": next((r["seconds"] for r in records if r["event"] == "warmup"), None),
        "peak_rss": hwm,
        "wall_s": time.perf_counter() - start,
        "status": "ok",
    }
    if killed == "oom":
        res["status"] = f"OOM (> {args.mem_cap_gb:g} GB)"
    elif killed == "budget" and not runs:
        # the step in flight when the budget ran out had run at least this long (a warm-up step counts)
        done_t = [r["t"] for r in records if r["event"] in ("built", "warmup")]
        res["unfinished_s"] = res["wall_s"] - max(done_t) if done_t else None  # None: not even built
        res["status"] = f"> {budget:g} s"
    elif killed == "budget":
        res["status"] = f"ok ({len(runs)} of {repeats} runs within the budget)"
    elif proc.returncode != 0:
        text = "".join(err)
        oom = "out of memory" in text.lower() or "memoryerror" in text.lower() or proc.returncode == -9
        last = text.strip().splitlines()[-1][:200] if text.strip() else ""
        res["status"] = "OOM" if oom else f"failed (exit {proc.returncode}: {last})"
    return res


def run_all(args) -> list[dict]:
    cases = [(i, m, n) for i in args.impls for m in args.modes for n in args.lengths]
    # Longest first, so parallel jobs pack well: training before forward, long before short, peers first.
    cases.sort(key=lambda c: (c[1] != "train", -c[2], c[0].startswith("ours")))
    results: list[dict] = []
    lock = threading.Lock()
    free = collections.deque(
        [list(range(j * args.threads, (j + 1) * args.threads)) for j in range(args.jobs)]
        if args.jobs > 1
        else [None]
    )
    queue = collections.deque(cases)

    def loop() -> None:
        with lock:
            cores = free.popleft()
        while True:
            with lock:
                if not queue:
                    return
                case = queue.popleft()
            res = run_case(*case, args, cores)
            with lock:
                results.append(res)
                print(f"# {format_row(res)}", file=sys.stderr, flush=True)
                if args.json:  # after every case, so an interrupted run keeps what it measured
                    write_json(args.json, {"args": vars(args), "results": results})

    threads = [threading.Thread(target=loop) for _ in range(max(1, args.jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


# ---------------------------------------------------------------------------------------- reporting
def write_json(path: str, obj: dict) -> None:
    from ssmkit.utils import atomic_write_text

    atomic_write_text(path, json.dumps(obj, indent=1))


def median(res: dict) -> float | None:
    return statistics.median(res["runs"]) if res["runs"] else None


def format_row(res: dict) -> str:
    med = median(res)
    speed = f"{res['length'] / med:.1f} tok/s" if med else res["status"]
    return f"{LABELS[res['impl']]} {res['mode']} l={res['length']}: {speed} ({len(res['runs'])} runs)"


def table(results: list[dict], args) -> str:
    by = {(r["impl"], r["mode"], r["length"]): r for r in results}
    head = "| implementation | mode | l | median time | tokens/s | runs | peak RSS | ours (cpu) speed-up |"
    lines = [head, "|---|---|---|---|---|---|---|---|"]
    for mode in args.modes:
        for length in args.lengths:
            ref = by.get(("ours-cpu", mode, length))
            ref_med = median(ref) if ref else None
            for impl in args.impls:
                r = by.get((impl, mode, length))
                if r is None:
                    continue
                med = median(r)
                if med is not None:
                    time_s, tps = (
                        (f"{med:.2f} s" if med >= 1 else f"{1e3 * med:.1f} ms"),
                        f"{length / med:.1f}",
                    )
                    note = "" if r["status"] == "ok" else f" ({r['status']})"
                elif r.get("unfinished_s"):
                    time_s, tps, note = f"> {r['unfinished_s']:.0f} s (one step, unfinished)", "—", ""
                else:
                    time_s, tps, note = r["status"], "—", ""
                if impl == "ours-cpu" or ref_med is None:
                    ratio = "1×" if impl == "ours-cpu" and ref_med else "—"
                elif med is not None:
                    ratio = f"{med / ref_med:.1f}×"
                elif r["status"].startswith(">") and r.get("unfinished_s"):
                    ratio = f"> {r['unfinished_s'] / ref_med:.1f}×"
                else:
                    ratio = "—"
                n = f"{len(r['runs'])}{note}"
                rss = f"{r['peak_rss'] / 2**30:.2f} GiB"
                mode_name = "forward" if mode == "forward" else "training step"
                lines.append(
                    f"| {LABELS[impl]} | {mode_name} | {length} | {time_s} | {tps} | {n} | {rss} | {ratio} |"
                )
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------- profile
def _classify(ev, shape: dict) -> str:
    """The model part an op belongs to: the nearest ancestor (or itself) that a rule recognises."""
    d, vocab = shape["d_model"], shape["vocab_size"]
    d_inner, dt_rank = 2 * d, -(-d // 16)
    node = ev
    while node is not None:
        name = node.name
        dims = {x for s in (node.input_shapes or []) if isinstance(s, list) for x in s}
        if "CausalConv1dSiLU" in name or name in ("aten::convolution", "aten::convolution_backward"):
            return "conv1d + SiLU"
        if "SelectiveScan" in name:
            return "selective scan"
        if name.startswith("Optimizer.step"):
            return "AdamW step"
        if name.startswith("Optimizer.zero_grad"):
            return "zero_grad"
        if "embedding" in name.lower():
            return "embedding (+ backward)"
        if "log_softmax" in name or "nll_loss" in name or "cross_entropy" in name:
            return "loss (log-softmax + NLL)"
        if "AccumulateGrad" in name and vocab in dims:
            return "embedding (+ backward)"
        if name in ("aten::mm", "aten::addmm", "aten::bmm", "aten::matmul", "aten::linear"):
            if vocab in dims or (vocab + (-vocab) % 8) in dims:
                return "lm_head"
            if 2 * d_inner in dims:
                return "in_proj"
            if dt_rank + 32 in dims:
                return "x_proj"
            if dt_rank in dims:
                return "dt_proj"
            if d_inner in dims and d in dims:
                return "out_proj"
        node = node.cpu_parent
    dims = {x for s in (ev.input_shapes or []) if isinstance(s, list) for x in s}
    if ev.input_shapes and any(isinstance(s, list) and len(s) == 3 and s[-1] == d for s in ev.input_shapes):
        return "RMSNorms, residual adds, casts"
    return "other (autograd engine, small ops)"


def profile(args) -> str:
    """torch.profiler over one forward and one training step of ours (cpu) at each length."""
    os.environ["SSMKIT_SCAN_BACKEND"] = "cpu"
    import torch
    import torch.nn.functional as F
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    shape = QUICK_SHAPE if args.quick else SHAPE
    model, _ = build_model("ours-cpu", shape)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    out = []
    for length in args.lengths:
        ids = torch.randint(0, shape["vocab_size"], (1, length))  # (1, l)

        def fwd(ids=ids) -> None:
            with torch.no_grad():
                model(ids)

        def train(ids=ids) -> None:
            logits = model(ids)
            loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        for mode, fn in (("forward", fwd), ("training step", train)):
            fn()  # warm-up
            with torch_profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
                t0 = time.perf_counter()
                fn()
                wall = time.perf_counter() - t0
            shares: collections.Counter = collections.Counter()
            for ev in prof.events():
                shares[_classify(ev, shape)] += ev.self_cpu_time_total
            total = sum(shares.values())
            out.append(
                f"\n{mode}, l = {length}: {wall:.2f} s wall under the profiler ({length / wall:.1f} tok/s)\n"
            )
            out.append("| part | time | share |\n|---|---|---|")
            for part, us in shares.most_common():
                out.append(f"| {part} | {us / 1e6:.3f} s | {100 * us / total:.1f}% |")
    return "\n".join(out)


# ---------------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lengths", type=int, nargs="+", default=[512, 2048])
    p.add_argument("--impls", nargs="+", choices=IMPLS, default=list(IMPLS))
    p.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    p.add_argument("--repeats", type=int, default=5, help="timed runs of ours after one warm-up")
    p.add_argument("--peer-repeats", type=int, default=3, help="timed runs of each peer after one warm-up")
    p.add_argument(
        "--budget", type=float, default=240.0, help="wall-clock seconds per peer case (incl. warm-up)"
    )
    p.add_argument("--ours-budget", type=float, default=1200.0, help="wall-clock seconds per case of ours")
    p.add_argument(
        "--mem-cap-gb", type=float, default=16.0, help="kill a case whose RSS passes this (0: no cap)"
    )
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--jobs", type=int, default=1, help="cases run at once, each pinned to --threads cores")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="tiny model (d_model 64, 2 layers), l = 64, 2 runs")
    p.add_argument("--profile", action="store_true", help="profile ours (cpu) instead of benchmarking")
    p.add_argument("--json", help="also write the raw results here")
    p.add_argument("--worker", nargs=3, metavar=("IMPL", "MODE", "L"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick:
        if args.lengths == [512, 2048]:
            args.lengths = [64]
        args.repeats = min(args.repeats, 2)
        args.peer_repeats = min(args.peer_repeats, 2)
    if args.worker:
        impl, mode, length = args.worker
        worker(impl, mode, int(length), args.repeats, args.threads, args.quick, args.seed)
        return
    if args.profile:
        print(profile(args))
        return
    import torch

    print(
        f"# bench_model: {'quick ' if args.quick else ''}shape {QUICK_SHAPE if args.quick else SHAPE}, "
        f"batch 1, float32, {args.threads} threads/case, jobs {args.jobs}, torch {torch.__version__}, "
        f"{os.cpu_count()} CPUs",
        file=sys.stderr,
        flush=True,
    )
    if any(i.startswith("ours") for i in args.impls):  # build the C++ kernels once, before the timed cases
        from ssmkit.layers import conv
        from ssmkit.scan import cpu

        for name, reason in (("scan", cpu.unavailable_reason()), ("conv", conv.unavailable_reason())):
            print(f"# {name} C++ kernel: {reason or 'built'}", file=sys.stderr, flush=True)
    results = run_all(args)
    print(table(results, args))


if __name__ == "__main__":
    main()
