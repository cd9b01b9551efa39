#!/usr/bin/env python3
"""The decoupled-training accuracy table: models x methods x K, beside FDG's published errors.

Trains each cell (model, method, K) with `staleprop train` and keeps its metrics under OUT, so
the table can be filled over several short GPU sessions: `run` skips the cells whose metrics
already end at the requested epoch count and trains the others in one `staleprop sweep`, up to
--parallel at once (they share the GPU, which one small model leaves partly idle). Each cell
checkpoints every epoch under --state; a cell that the time budget stops at an epoch boundary
resumes there on the next call, bit for bit as if it had not stopped. `table` turns whatever is
there (with --also DIR, other folders' cells too, each row naming its device) into Markdown.

    tools/accuracy_table.py run --staleprop build-gpu/tools/staleprop --out runs/r56 \\
        --models resnet56 --splits 1,2,3,4 --methods bp,ddg,fdg --epochs 30 --budget 540 --parallel 7 \\
        -- --device cuda --precision bf16 --lr 0.1 --schedule cosine --weight-decay 5e-4 --nesterov
    tools/accuracy_table.py table --out runs/r56 > table.md

Cells: `bp` runs at K = 1 only (every method is plain backprop at K = 1, bit for bit, and the
locked pipeline computes plain backprop at any K), `ddg` and `fdg` at each K >= 2 of --splits,
with FDG's published cut points (`--split-at fdg`; a model and K without them refuse the whole
sweep before any cell trains, as staleprop sweep checks every job first). The fdg cells shrink by the factor FDG
published its figure with for that model and K (ResNet-56: 0.5, 0.2 and 0.3 at K = 2, 3 and 4),
else 0.5, unless --shrink gives one for all; the ddg cells do not shrink (Huo et al.'s DDG has
no such factor), unless --ddg-shrink says otherwise. The table gives each cell's factor.
Arguments after `--` go to every `staleprop train` call unchanged (device, precision, recipe).
Each cell writes NAME.jsonl (the metrics), NAME.log (the output) and NAME.cmd (the command) under
OUT, and NAME.safetensors (its last epoch's checkpoint) under --state. A cell named twice (in
--models, --splits or --methods) runs once; a choice that leaves no cell is refused. `run` exits 1
where the sweep failed (it refused the cells, or one ended in an error), else 0 (the budget
stopping cells, to resume later, is no failure). `table` shows every cell under OUT (and --also);
--models, --splits and --methods, where given, choose its rows. Its peak MiB is a cell's largest
epoch's peak of tensors in use; its img/s the mean over epochs.
"""
import argparse
import os
import shlex
import sys

from resumable_runs import (add_run_options, epochs_of, existing_dir, flags_of, read_epochs, read_records,
                            split_argv, train_resumable)

# Test error (%) on CIFAR-10 in FDG's repository (Zhuang et al., arXiv 1906.09108; github.com/
# ZHUANGHP/FDG, README): 300 epochs, lr 0.1 divided by 10 at epochs 150, 225 and 275, momentum
# 0.9, weight decay 5e-4, batch 128, the median of 3 runs. With the shrink factor each fdg figure
# was published with (None: no factor); bp is their rerun; ddg is Huo et al.'s figure they quote.
PUBLISHED = {
    ("resnet20", "bp", 1): (7.78, None), ("resnet20", "fdg", 2): (7.23, 0.2),
    ("resnet56", "bp", 1): (6.19, None), ("resnet56", "ddg", 2): (6.89, None),
    ("resnet56", "fdg", 2): (5.90, 0.5), ("resnet56", "fdg", 3): (6.08, 0.2), ("resnet56", "fdg", 4): (6.14, 0.3),
    ("resnet110", "bp", 1): (5.79, None), ("resnet110", "ddg", 2): (6.59, None), ("resnet110", "fdg", 2): (5.73, 0.5),
    ("resnet18", "bp", 1): (4.87, None), ("resnet18", "fdg", 2): (4.79, 0.8),
}


def shrink_of(model, method, k, fdg_shrink, ddg_shrink):
    """The shrink factor of a cell: --shrink (or FDG's published one, else 0.5) for fdg,
    --ddg-shrink (default 1: none) for ddg, none for bp."""
    if method == "fdg":
        if fdg_shrink is not None:
            return fdg_shrink
        published = PUBLISHED.get((model, method, k))
        return published[1] if published and published[1] is not None else 0.5
    return ddg_shrink if method == "ddg" else 1.0


def unique(values):
    """The values in order, each once (a cell named twice would be two jobs writing one file)."""
    return list(dict.fromkeys(values))


def cells(models, splits, methods):
    for model in unique(models):
        for k in unique(splits):
            for method in unique(methods):
                if (k == 1) == (method == "bp"):
                    yield model, method, k


def cell_name(model, method, k):
    return f"{model}-{method}-K{k}"


def run(args, extra):
    """Trains the unfinished cells (tools/resumable_runs.py): in one `staleprop sweep`, up to
    --parallel at once, each resuming from the checkpoint of its last finished epoch."""
    if not os.access(args.staleprop, os.X_OK) or os.path.isdir(args.staleprop):
        raise SystemExit(f"accuracy_table.py run: --staleprop {args.staleprop}: not an executable file")
    todo = list(cells(args.models, args.splits, args.methods))
    if not todo:
        raise SystemExit("accuracy_table.py run: no cells: bp runs at K = 1 only, ddg and fdg at K >= 2 only "
                         f"(--splits {','.join(map(str, args.splits))}, --methods {','.join(args.methods)})")
    runs = []
    for model, method, k in todo:
        words = ["--model", model, "--method", method, "--split", str(k), "--epochs", str(args.epochs)]
        if k > 1:
            words += ["--split-at", "fdg"]
            shrink = shrink_of(model, method, k, args.shrink, args.ddg_shrink)
            if shrink != 1.0:
                words += ["--shrink", str(shrink)]
        # staleprop takes the last --epochs: one after `--` sizes the cell.
        runs.append((cell_name(model, method, k), words + extra, epochs_of(words + extra)))
    return train_resumable(runs, args.out, args.state or args.out, args.staleprop, args.budget, args.grace,
                           args.parallel)


def run_device(path):
    """The devices named by the start records of a cell's metrics, each once in order (staleprop's
    "NVIDIA H200 (sm_90, 139.8 GiB)" as "NVIDIA H200"; a cell resumed on another GPU names both),
    or None where the file has none."""
    devices = []
    for event in read_records(path):
        if event.get("event") == "start" and event.get("device"):
            name = event["device"].split(" (")[0]
            if name not in devices:
                devices.append(name)
    return ", ".join(devices) or None


def table(args):
    rows = []
    folders = []  # each once, however spelt (a folder twice listed every cell twice)
    for folder in [args.out] + (args.also or []):
        if os.path.realpath(folder) not in map(os.path.realpath, folders):
            folders.append(folder)
    for folder, entry in ((d, e) for d in folders for e in sorted(os.listdir(d))):
        if not entry.endswith(".jsonl") or not os.path.isfile(os.path.join(folder, entry)):
            continue
        name = entry[:-len(".jsonl")]
        try:
            model, method, k = name.rsplit("-", 2)
            k = int(k.lstrip("K"))
        except ValueError:
            continue
        # --models, --splits and --methods, where given, choose the rows.
        if ((args.models and model not in args.models) or (args.splits and k not in args.splits) or
                (args.methods and method not in args.methods)):
            continue
        epochs = read_epochs(os.path.join(folder, entry))
        if not epochs:
            continue
        last = epochs[-1]
        cmd_path = os.path.join(folder, name + ".cmd")
        words = shlex.split(open(cmd_path).read()) if os.path.exists(cmd_path) else []
        wanted = epochs_of(words) if words else None
        beta = float(flags_of(words)[1].get("--shrink") or 1.0) if words else None  # the last --shrink counts
        busy = "/".join(f"{m['busy_pct']:.0f}" for m in last.get("modules", [])) or "–"
        # Cells trained beside others (sweep --parallel) share the GPU: their img/s is their share
        # (their peak of tensors in use stays their own).
        shared = max(e.get("max_concurrent_runs", 1) for e in epochs)
        rows.append({
            "model": model, "method": method, "k": k,
            "epochs": f"{last['epoch']}" + (f" of {wanted}" if wanted and wanted != last["epoch"] else ""),
            "error": 100 * (1 - last["test_acc"]), "best": 100 * (1 - max(e["test_acc"] for e in epochs)),
            "ips": sum(e["images_per_s"] for e in epochs) / len(epochs), "busy": busy, "shared": shared,
            "peak": max(e.get("peak_allocated_bytes", 0) for e in epochs) / 2**20,  # the run's largest epoch
            "beta": beta, "published": PUBLISHED.get((model, method, k)),
            "where": run_device(os.path.join(folder, entry)) or folder,
        })
    order = {"bp": 0, "ddg": 1, "fdg": 2}
    rows.sort(key=lambda r: (r["model"], r["k"], order.get(r["method"], 9)))
    # Cells from several folders (--also: other sessions' devices) say where each ran.
    several = len(folders) > 1
    out = ["| model | method | K | β | epochs | test error % (last) | best | img/s | busy % per module | "
           "peak MiB | FDG's published error % (its β) |" + (" device (or folder) |" if several else ""),
           "|---|---|---|---|---|---|---|---|---|---|---|" + ("---|" if several else "")]
    for r in rows:
        pub = "–"
        if r["published"] is not None:
            err, b = r["published"]
            pub = f"{err:.2f}" + (f" (β = {b:g})" if b is not None else "")
        beta = f"{r['beta']:g}" if r["beta"] is not None else "?"
        shared = f" (up to {r['shared']} at once)" if r["shared"] > 1 else ""
        peak = f"{r['peak']:,.0f}"
        out.append(f"| {r['model']} | {r['method']} | {r['k']} | {beta} | {r['epochs']} | {r['error']:.2f} | "
                   f"{r['best']:.2f} | {r['ips']:,.0f}{shared} | {r['busy']} | {peak} | {pub} |" +
                   (f" {r['where']} |" if several else ""))
    if not rows:
        print(f"{', '.join(folders)}: no cells (no MODEL-METHOD-KN.jsonl with epoch records)", file=sys.stderr)
        return 1
    print("\n".join(out))
    return 0


def main():
    argv, extra = split_argv(sys.argv[1:])
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("verb", choices=["run", "table"])
    add_run_options(ap, "cells")
    ap.add_argument("--models", default=None, type=lambda s: s.split(","),
                    help="models, comma-separated (run: the cells to train, default resnet56; table: the rows "
                         "shown, default all)")
    ap.add_argument("--splits", default=None, type=lambda s: [int(k) for k in s.split(",")],
                    help="module counts K, comma-separated; K = 1 is the bp row (run: default 1,2,3,4; table: "
                         "the rows shown, default all)")
    ap.add_argument("--methods", default=None, type=lambda s: s.split(","),
                    help="methods, comma-separated: bp (K = 1), ddg and fdg (K >= 2) (run: default bp,ddg,fdg; "
                         "table: the rows shown, default all)")
    ap.add_argument("--epochs", type=int, default=30,
                    help="epochs of every cell (default %(default)s; tools/gpu_accuracy.sh passes 160)")
    ap.add_argument("--shrink", type=float, default=None,
                    help="shrink factor of every fdg cell (default: the one FDG published the cell's figure with, "
                         "else 0.5)")
    ap.add_argument("--ddg-shrink", type=float, default=1.0,
                    help="shrink factor of the ddg cells (default 1: none, as Huo et al.'s DDG)")
    ap.add_argument("--also", action="append", metavar="DIR",
                    help="table: another directory of cells (another session's or device's), repeatable; the "
                         "table then says where each cell ran")
    args = ap.parse_args(argv)
    if args.verb == "run":
        args.models = args.models or ["resnet56"]
        args.splits = args.splits or [1, 2, 3, 4]
        args.methods = args.methods or ["bp", "ddg", "fdg"]
    for method in args.methods or []:
        if method not in ("bp", "ddg", "fdg"):
            ap.error(f"unknown method {method!r} (bp, ddg, fdg)")
    if args.verb == "table":
        existing_dir(ap, args.out, "--out")
        for folder in args.also or []:
            existing_dir(ap, folder, "--also")
    elif args.also:
        ap.error("--also is for table only")
    return run(args, extra) if args.verb == "run" else table(args)


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        sys.exit(130)
