#!/usr/bin/env python3
"""The decoupled-training accuracy table: models x methods x K, beside FDG's published errors.

Trains each cell (model, method, K) with `staleprop train` and keeps its metrics under OUT, so
the table can be filled over several short GPU sessions: `run` skips the cells whose metrics
already end at the requested epoch count and trains the others in one `staleprop sweep`, up to
--parallel at once (they share the GPU, which one small model leaves partly idle). Each cell
checkpoints every epoch under --state; a cell that the time budget stops at an epoch boundary
resumes there on the next call, bit for bit as if it had not stopped. `table` turns whatever is
there into Markdown.

    tools/accuracy_table.py run --staleprop build-gpu/tools/staleprop --out runs/r56 \\
        --models resnet56 --splits 1,2,3,4 --methods bp,ddg,fdg --epochs 30 --budget 540 --parallel 7 \\
        -- --device cuda --precision bf16 --lr 0.1 --schedule cosine --weight-decay 5e-4 --nesterov
    tools/accuracy_table.py table --out runs/r56 > table.md

Cells: `bp` runs at K = 1 only (every method is plain backprop at K = 1, bit for bit, and the
locked pipeline computes plain backprop at any K), `ddg` and `fdg` at each K >= 2 of --splits,
with FDG's published cut points (`--split-at fdg`) and the shrink factor --shrink (FDG: 0.5).
Arguments after `--` go to every `staleprop train` call unchanged (device, precision, recipe).
Each cell writes NAME.jsonl (the metrics), NAME.log (the output) and NAME.cmd (the command) under
OUT, and NAME.safetensors (its last epoch's checkpoint) under --state.
"""
import argparse
import os
import shlex
import sys

from resumable_runs import add_run_options, epochs_of, read_epochs, split_argv, train_resumable

# Test error (%) reported by FDG (Zhuang et al., arXiv 1906.09108) for ResNet-56 on CIFAR-10:
# 300 epochs, shrink factor 0.5. Only the figures the project's issue quotes.
PUBLISHED_ERROR = {("resnet56", "bp", 1): 6.19, ("resnet56", "fdg", 2): 5.90, ("resnet56", "fdg", 3): 6.08,
                   ("resnet56", "fdg", 4): 6.14}


def cells(models, splits, methods):
    for model in models:
        for k in splits:
            for method in methods:
                if (k == 1) == (method == "bp"):
                    yield model, method, k


def cell_name(model, method, k):
    return f"{model}-{method}-K{k}"


def run(args, extra):
    """Trains the unfinished cells (tools/resumable_runs.py): in one `staleprop sweep`, up to
    --parallel at once, each resuming from the checkpoint of its last finished epoch."""
    runs = []
    for model, method, k in cells(args.models, args.splits, args.methods):
        words = ["--model", model, "--method", method, "--split", str(k), "--epochs", str(args.epochs)]
        if k > 1:
            words += ["--split-at", "fdg", "--shrink", str(args.shrink)]
        runs.append((cell_name(model, method, k), words + extra, args.epochs))
    return train_resumable(runs, args.out, args.state or args.out, args.staleprop, args.budget, args.grace,
                           args.parallel)


def table(args):
    rows = []
    for entry in sorted(os.listdir(args.out)):
        if not entry.endswith(".jsonl"):
            continue
        name = entry[:-len(".jsonl")]
        try:
            model, method, k = name.rsplit("-", 2)
            k = int(k.lstrip("K"))
        except ValueError:
            continue
        epochs = read_epochs(os.path.join(args.out, entry))
        if not epochs:
            continue
        last = epochs[-1]
        cmd_path = os.path.join(args.out, name + ".cmd")
        wanted = epochs_of(shlex.split(open(cmd_path).read())) if os.path.exists(cmd_path) else None
        busy = "/".join(f"{m['busy_pct']:.0f}" for m in last.get("modules", [])) or "–"
        # Cells trained beside others (sweep --parallel) share the GPU: their img/s is their share
        # (their peak of tensors in use stays their own).
        shared = max(e.get("max_concurrent_runs", 1) for e in epochs)
        rows.append({
            "model": model, "method": method, "k": k,
            "epochs": f"{last['epoch']}" + (f" of {wanted}" if wanted and wanted != last["epoch"] else ""),
            "error": 100 * (1 - last["test_acc"]), "best": 100 * (1 - max(e["test_acc"] for e in epochs)),
            "ips": sum(e["images_per_s"] for e in epochs) / len(epochs), "busy": busy, "shared": shared,
            "peak": last.get("peak_allocated_bytes", 0) / 2**20,
            "published": PUBLISHED_ERROR.get((model, method, k)),
        })
    order = {"bp": 0, "ddg": 1, "fdg": 2}
    rows.sort(key=lambda r: (r["model"], r["k"], order.get(r["method"], 9)))
    out = ["| model | method | K | epochs | test error % (last) | best | img/s | busy % per module | "
           "peak MiB | FDG's published error % |",
           "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        pub = f"{r['published']:.2f}" if r["published"] is not None else "–"
        shared = f" (up to {r['shared']} at once)" if r["shared"] > 1 else ""
        peak = f"{r['peak']:,.0f}"
        out.append(f"| {r['model']} | {r['method']} | {r['k']} | {r['epochs']} | {r['error']:.2f} | {r['best']:.2f} | "
                   f"{r['ips']:,.0f}{shared} | {r['busy']} | {peak} | {pub} |")
    print("\n".join(out))
    return 0 if rows else 1


def main():
    argv, extra = split_argv(sys.argv[1:])
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("verb", choices=["run", "table"])
    add_run_options(ap, "cells")
    ap.add_argument("--models", default="resnet56", type=lambda s: s.split(","))
    ap.add_argument("--splits", default="1,2,3,4", type=lambda s: [int(k) for k in s.split(",")])
    ap.add_argument("--methods", default="bp,ddg,fdg", type=lambda s: s.split(","))
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--shrink", type=float, default=0.5, help="shrink factor of the decoupled cells (FDG: 0.5)")
    args = ap.parse_args(argv)
    for method in args.methods:
        if method not in ("bp", "ddg", "fdg"):
            ap.error(f"unknown method {method!r} (bp, ddg, fdg)")
    return run(args, extra) if args.verb == "run" else table(args)


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        sys.exit(130)
