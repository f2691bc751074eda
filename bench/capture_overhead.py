"""Training-step overhead of rayattr.capture on a GPT-2-shaped model (random init).

Runs plain training steps and steps under GradientCapture in alternating rounds within one
process, and prints steps/s for both and the overhead. Defaults are a small CPU-friendly
shape; --full is the 124M GPT-2 shape, batch 16 x 512 tokens, bf16, r_a = r_s = 32.

    python bench/capture_overhead.py            # small, CPU
    python bench/capture_overhead.py --full     # on a GPU
    python bench/capture_overhead.py --adamw-vs-sgd --n-layer 4 --n-embd 256 --batch 8 --rank 16

--adamw-vs-sgd times four steps in alternating rounds: SGD without and with capture (raw rows),
AdamW without and with capture of raw and update rows, the update rows with the step's own P
(factors kept until the optimizer's step, P from v's row and column sums after it, as the
recorder does), and prints each optimizer's overhead and AdamW's against SGD's.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from transformers import GPT2Config, GPT2LMHeadModel

from rayattr.capture import GradientCapture, ProjectionSpec, per_sample_loss


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--full", action="store_true", help="124M GPT-2, 16x512, bf16, rank 32 (overrides shape flags)")
    p.add_argument("--n-layer", type=int, default=2)
    p.add_argument("--n-embd", type=int, default=128)
    p.add_argument("--n-head", type=int, default=4)
    p.add_argument("--vocab", type=int, default=2048)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--rank", type=int, default=32, help="r_a = r_s")
    p.add_argument("--precision", choices=["fp32", "bf16", "autocast"], default="fp32",
                   help="bf16: weights and activations in bf16 (as DeepSpeed bf16); autocast: fp32 weights, bf16 autocast")
    p.add_argument("--layers", nargs="*", default=None, help="fnmatch patterns (default: every Linear/Conv1D)")
    p.add_argument("--steps", type=int, default=5, help="steps per timed round")
    p.add_argument("--rounds", type=int, default=4, help="alternating (plain, capture) rounds")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--background", action="store_true", help="run the backward-side capture on a worker thread")
    p.add_argument("--profile", action="store_true", help="also print the top kernels of captured steps")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--adamw-vs-sgd", action="store_true", help="capture overhead under AdamW (update rows) and SGD")
    args = p.parse_args()
    if args.full:
        args.n_layer, args.n_embd, args.n_head, args.vocab = 12, 768, 12, 50257
        args.batch, args.seq, args.rank, args.precision = 16, 512, 32, "bf16"
    return args


def main() -> None:
    args = parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=args.vocab, n_positions=max(1024, args.seq), n_embd=args.n_embd,
        n_layer=args.n_layer, n_head=args.n_head, use_cache=False,
    )
    model = GPT2LMHeadModel(config).to(device)
    if args.precision == "bf16":
        model = model.to(torch.bfloat16)
    model.train()
    if args.adamw_vs_sgd:
        return adamw_vs_sgd(args, model, device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    ids = torch.randint(0, args.vocab, (args.batch, args.seq), device=device)
    cap = GradientCapture(model, projection=ProjectionSpec(rank=args.rank, seed=0), layers=args.layers,
                          loss_scale=1.0 / args.batch, background=args.background)

    def step() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.precision == "autocast"):
            logits = model(ids).logits
        losses = per_sample_loss(logits[:, :-1], ids[:, 1:])
        losses.mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    def captured_step() -> None:
        with cap:
            step()
        grads = cap.gradients()  # what a rank actor would hand to the store
        assert grads and all(g.shape[0] == args.batch for g in grads.values())

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    def timed(fn) -> float:
        sync()
        t0 = time.perf_counter()
        for _ in range(args.steps):
            fn()
        sync()
        return time.perf_counter() - t0

    for _ in range(args.warmup):
        step()
        captured_step()
    plain, captured = [], []
    for _ in range(args.rounds):  # alternate so drift (clocks, caches) hits both alike
        plain.append(timed(step))
        captured.append(timed(captured_step))

    dims = cap.layer_dims()
    n_params = sum(p.numel() for p in model.parameters())
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"device: {name}; torch {torch.__version__}; threads {torch.get_num_threads()}")
    print(f"model: GPT-2 {n_params / 1e6:.1f}M params, {args.n_layer} layers, d={args.n_embd}, vocab={args.vocab}; "
          f"batch {args.batch}x{args.seq}; {args.precision}")
    print(f"capture: {len(dims)} layers, r_a=r_s={args.rank}, {sum(dims.values())} floats/sample, "
          f"{'background thread' if args.background else 'inline hooks'}")
    n = args.steps * args.rounds
    base_rate, cap_rate = n / sum(plain), n / sum(captured)
    per_round = [100 * (c / p - 1) for p, c in zip(plain, captured)]
    print(f"steps/s without capture: {base_rate:.3f}  ({base_rate * args.batch:.1f} seq/s)")
    print(f"steps/s with capture:    {cap_rate:.3f}  ({cap_rate * args.batch:.1f} seq/s)")
    print(f"overhead: {100 * (base_rate / cap_rate - 1):.2f} %  (per round: "
          + ", ".join(f"{o:.1f}" for o in per_round) + f"; median {statistics.median(per_round):.2f} %)")

    if args.profile:
        profile_difference(step, captured_step, sync, device)


def adamw_vs_sgd(args, model, device) -> None:
    """Capture overhead (hooks on ÷ off) with SGD's raw rows and with AdamW's raw and update
    rows, four kinds of step in alternating rounds within this one process."""
    from types import SimpleNamespace

    from rayattr.optim.spec import OptimizerSpec
    from rayattr.optim.adam_state import read_preconditioners

    ids = torch.randint(0, args.vocab, (args.batch, args.seq), device=device)
    proj = ProjectionSpec(rank=args.rank, seed=0)
    sgd = torch.optim.SGD(model.parameters(), lr=1e-4)
    adamw = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), eps=1e-8)
    spec = OptimizerSpec("adamw", lr=1e-4, beta1=0.9, beta2=0.95, eps=1e-8)
    owner = SimpleNamespace(module=model, optimizer=adamw)
    raw = GradientCapture(model, projection=proj, layers=args.layers, loss_scale=1.0 / args.batch)
    deferred = GradientCapture(model, projection=proj, layers=args.layers, loss_scale=1.0 / args.batch,
                               defer_updates=True)
    layers = deferred.layer_names()

    def step(opt) -> None:
        losses = per_sample_loss(model(ids).logits[:, :-1], ids[:, 1:])
        losses.mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    def sgd_captured() -> None:
        with raw:
            step(sgd)
        assert all(g.shape[0] == args.batch for g in raw.gradients().values())

    def adamw_captured() -> None:
        with deferred:
            step(adamw)
        pre, _ = read_preconditioners(owner, layers, spec)  # v_t after the step, from its row/column sums
        deferred.finish_updates(pre)
        grads, updates = deferred.gradients(), deferred.updates()
        assert all(u.shape[0] == args.batch for u in updates.values()) and len(grads) == len(updates)

    kinds = {"SGD": lambda: step(sgd), "SGD + capture": sgd_captured,
             "AdamW": lambda: step(adamw), "AdamW + capture": adamw_captured}
    for _ in range(args.warmup):
        for fn in kinds.values():
            fn()
    seconds = {k: [] for k in kinds}
    for _ in range(args.rounds):  # alternate so the machine's load hits all four alike
        for k, fn in kinds.items():
            t0 = time.perf_counter()
            for _ in range(args.steps):
                fn()
            seconds[k].append(time.perf_counter() - t0)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"device: {device}; torch {torch.__version__}; threads {torch.get_num_threads()}; "
          f"load average {' '.join(f'{x:.1f}' for x in __import__('os').getloadavg())}")
    print(f"model: GPT-2 {n_params / 1e6:.1f}M params, {args.n_layer} layers, d={args.n_embd}; "
          f"batch {args.batch}x{args.seq}; capture rank {args.rank}, {len(layers)} layers")
    for k, s in seconds.items():
        print(f"{k:<16} {1e3 * sum(s) / (args.steps * args.rounds):8.1f} ms/step  (median round "
              f"{1e3 * statistics.median(s) / args.steps:.1f})")
    med = {k: statistics.median(s) for k, s in seconds.items()}
    o_sgd, o_adamw = med["SGD + capture"] / med["SGD"], med["AdamW + capture"] / med["AdamW"]
    per_round = [(a / b) / (c / d) for a, b, c, d in zip(seconds["AdamW + capture"], seconds["AdamW"],
                                                        seconds["SGD + capture"], seconds["SGD"])]
    print(f"capture overhead (hooks on / off, median rounds): SGD {o_sgd:.3f}x, AdamW {o_adamw:.3f}x; "
          f"AdamW's / SGD's {o_adamw / o_sgd:.3f} (per round: {', '.join(f'{r:.2f}' for r in per_round)})")
    print(f"AdamW + capture / SGD + capture: {med['AdamW + capture'] / med['SGD + capture']:.3f}x; "
          f"update-row factors kept per step: {deferred_bytes_of(model, deferred, ids) / 1e6:.1f} MB")


def deferred_bytes_of(model, cap, ids) -> int:
    """The factors a step's update rows keep until the optimizer's step (one more forward/backward)."""
    with cap:
        model(ids).logits.float().sum().backward()
    held = cap.deferred_bytes()
    cap.finish_updates(None)
    model.zero_grad(set_to_none=True)
    return held


def profile_difference(step, captured_step, sync, device, steps: int = 3, top: int = 20) -> None:
    """Per-op device time per step, plain vs captured, sorted by what capture adds."""
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    attr = "self_device_time_total" if cuda else "self_cpu_time_total"
    tables, cpu_totals = [], []
    for fn in (step, captured_step):
        sync()
        with profile(activities=activities) as prof:
            for _ in range(steps):
                fn()
            sync()
        events = prof.key_averages()
        tables.append({e.key: getattr(e, attr) / steps / 1e3 for e in events})
        cpu_totals.append(sum(e.self_cpu_time_total for e in events) / steps / 1e3)
    plain, captured = tables
    print(f"profiled CPU time per step: plain {cpu_totals[0]:.1f} ms, captured {cpu_totals[1]:.1f} ms")
    print(f"profiled {'device' if cuda else 'CPU'} time per step: plain {sum(plain.values()):.1f} ms, "
          f"captured {sum(captured.values()):.1f} ms")
    rows = sorted(set(plain) | set(captured), key=lambda k: plain.get(k, 0) - captured.get(k, 0))
    print(f"{'op / kernel':70s} {'plain ms':>9s} {'capt ms':>9s} {'delta':>8s}")
    for key in rows[:top]:
        p, c = plain.get(key, 0.0), captured.get(key, 0.0)
        print(f"{key[:70]:70s} {p:9.3f} {c:9.3f} {c - p:8.3f}")

if __name__ == "__main__":
    main()
