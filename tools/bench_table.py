#!/usr/bin/env python3
"""Markdown tables from benchmark output, for the results files under bench/results/.

  kernels A.json B.json ...
      Google Benchmark JSON files of bench/bench_gpu_kernels (e.g. one per main loop, or the
      data gradient direct and on the transposed filter). One row per benchmark (the median
      of its repetitions where the file has aggregates), one column group per file: our rate
      (TFLOP/s or GB/s) and its ratio to the vendor kernel (vs_vendor) or to the copy
      (vs_copy) measured in the same run. The column heading is the file's main-loop,
      data-gradient and TMA settings (its JSON context), else its name (with the folders that
      tell files of one name apart). A benchmark run once, in a file with repeated ones, gives
      its one run. With
      several files, two last columns give the last file's rate against the first's (ours:
      last rate / first rate), and the same for the vendor kernel or the copy timed beside it
      (its own median rate, vendor_TFLOP/s or copy_GB/s; in files without it, ours / ratio). A
      GB/s row's ratio also gives, in brackets, vs_copy_peak (our rate over the copy's at 1 GiB,
      the bandwidth ceiling) where the file has it: a same-size copy of a small op is bound by
      latency, so vs_copy flatters it. cuDNN's rate for one layer varied by up to 1.9x between runs
      of one H100 session while ours moved by 3% at most (bench/results/nvidia-h100/
      2026-11-27-summary.md), so a ratio of ratios would carry the vendor's drift.

  train F.jsonl ...
      JSON lines of `staleprop bench --json` (other lines, such as bench/pytorch_baseline.py's,
      are skipped, with a note on stderr). One row per configuration (model, batch, precision,
      kernels, method, modules, and its variant: shrink factor, --recompute, --weight-stash,
      main loop and kernel switches), one column group per way of running it: op by op,
      --graphs (planned arenas) and --graphs --graph-memory bump. Images/s and peak allocated
      MiB each, and the graphs' gain and memory against op by op. Lines without graph_memory
      (written before planned arenas existed) count as bump. Of repeated rounds of one cell the
      fastest counts, its cell saying of how many and the slowest (as in pytorch below).

  ops F.jsonl ...
      JSON lines of `staleprop bench --profile-ops N --json`. One column group per profiled
      run (model, batch, precision, kernels, method and, over several modules, K), one row per
      op: its device time per step and its share of the summed op time; then, per run, the wall
      time per profiled step and the time the device certainly waited for the host (wall minus
      op time, meaningful on one stream). Files holding no op profile are refused, saying so.

  pytorch F.jsonl ...
      JSON lines of `staleprop bench --json` and of bench/pytorch_baseline.py, mixed. One row per
      staleprop run of plain backprop over one module (the backprop trainer, or --method bp over
      one module; model, batch, precision, kernels, --graphs and its variant; with runs of
      several devices, the device), beside PyTorch eager on the same device (the same GPU model,
      the whole name: an H200 NVL is not an H200; on the CPU the same thread count), model and
      batch: its
      best rate in the same precision (fp32 without TF32, or bf16 autocast), in whichever
      layout (NCHW or channels_last) ran faster, named, and our ratio to it; then PyTorch's best
      in any setting (TF32 and the other precision included) and our ratio to that; then both
      peaks of allocated memory (PyTorch's of its same-precision best), and the file of our run
      (runs alike but for settings their lines do not record stay apart by file). Where a setting
      ran more than once (rounds of one session), each side's fastest line counts, and the cell
      says of how many and the slowest: PyTorch's rate moved by up to 33% between rounds. Other
      lines (the pipelined methods, bench/pytorch_cifar_train.py's epochs) are skipped with a note.

  A file that cannot be read or parsed is refused, naming it.

    python3 tools/bench_table.py kernels gpu-out/dgrad-direct.json gpu-out/dgrad-wt.json
    python3 tools/bench_table.py train gpu-out/graphs.jsonl
    python3 tools/bench_table.py ops gpu-out/op-profile.jsonl
    python3 tools/bench_table.py pytorch gpu-out/throughput.jsonl gpu-out/pytorch.jsonl
"""
import json
import os
import re
import sys


def read_json(path):
    """One JSON document, or an error naming the file."""
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise SystemExit(f"bench_table: {path}: {e}")


def read_lines(path):
    """The JSON objects of a JSON-lines file (other lines skipped), or an error naming the file."""
    try:
        with open(path) as f:
            return [json.loads(line) for line in f if line.strip().startswith("{")]
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise SystemExit(f"bench_table: {path}: {e}")


def strip_name(name):
    """The benchmark's name without the repetition and aggregate suffixes."""
    return re.sub(r"/repeats:\d+.*$", "", re.sub(r"/manual_time.*$", "", name))


# bench_gpu_kernels' switch contexts ("yes" when on, or a mode number, 0 off) and how a table's
# column names them (with the mode where there is one).
SWITCH_LABELS = [
    ("dgrad_by_stride_class", "stride classes"),
    ("dgrad_class_direct", "classes into dx"),
    ("dgrad_transposed_filter", "transposed filter"),
    ("conv_tma", "TMA convolutions"),
    ("tma_wide_tile", "wide TMA tile"),
    ("tma_wide_by_shape", "wide tile by shape"),
    ("tma_cluster", "clusters of two"),
    ("conv_small_c", "direct stem"),
    ("bn_persistent", "persistent BN"),
    ("programmatic_launch", "PDL"),
    ("tma_persistent", "persistent TMA"),
    ("conv_halo", "halo convolutions"),
    ("halo_resident", "resident halo filter"),
    ("tma_l2_prefetch", "TMA L2 prefetch"),
]


def kernel_rows(path):
    """{name: (rate, unit, ratio, ratio to the copy's peak or None, the twin's rate or None)} of one
    bench_gpu_kernels JSON, and its label."""
    doc = read_json(path)
    benches = doc.get("benchmarks", []) if isinstance(doc, dict) else []
    medians = [b for b in benches if b.get("aggregate_name") == "median"]
    with_median = {strip_name(b["name"]) for b in medians}
    # The median of a benchmark's repetitions, else (run once) its one iteration.
    singles = [b for b in benches if b.get("run_type", "iteration") == "iteration" and
               strip_name(b["name"]) not in with_median]
    rows = {}
    for b in medians + singles:
        if "TFLOP/s" in b:
            ratio = b.get("vs_vendor")
            twin = b.get("vendor_TFLOP/s", b["TFLOP/s"] / ratio if ratio else None)
            rows[strip_name(b["name"])] = (b["TFLOP/s"], "TFLOP/s", ratio, None, twin)
        elif "GB/s" in b:
            ratio = b.get("vs_copy")
            twin = b.get("copy_GB/s", b["GB/s"] / ratio if ratio else None)
            rows[strip_name(b["name"])] = (b["GB/s"], "GB/s", ratio, b.get("vs_copy_peak"), twin)
    ctx = doc.get("context", {})
    parts = [ctx[k] for k in ("tensor_core_mainloop",) if k in ctx]
    for key, label in SWITCH_LABELS:
        value = ctx.get(key)
        if value == "yes":
            parts.append(label)
        elif value not in (None, "no", "0"):
            parts.append(f"{label} {value}")  # a mode: conv_halo 1 or 2
    label = ", ".join(parts) if parts else path.rsplit("/", 1)[-1]
    return rows, label


def fmt(v, digits):
    return "—" if v is None else f"{v:.{digits}f}"


def distinct_names(paths):
    """The shortest trailing parts of the paths that tell them apart (file names where they do)."""
    parts = [os.path.normpath(os.path.abspath(p)).split(os.sep) for p in paths]
    for n in range(1, max(len(x) for x in parts) + 1):
        names = [os.sep.join(x[-n:]) for x in parts]
        if len(set(names)) == len(names):
            return names
    return list(paths)


def kernels_table(paths):
    tables = [kernel_rows(p) for p in paths]
    if not any(rows for rows, _ in tables):  # an empty table said nothing of why
        raise SystemExit(f"bench_table kernels: no benchmark with TFLOP/s or GB/s in {', '.join(paths)}")
    names = []
    for rows, _ in tables:
        names += [n for n in rows if n not in names]
    labels = [label for _, label in tables]
    if len(set(labels)) < len(labels):  # settings alike: tell the files apart by name
        labels = distinct_names(paths)
    head = "| benchmark | " + " | ".join(f"{l}: rate | {l}: ratio" for l in labels)
    sep = "|---|" + "---|---|" * len(tables)
    if len(tables) > 1:
        head += f" | {labels[-1]} vs {labels[0]} | the vendor's (or the copy's) rate, last vs first"
        sep += "---|---|"
    out = [head + " |", sep]
    for n in names:
        cells = []
        for rows, _ in tables:
            rate, unit, ratio, peak, _ = rows.get(n, (None, "", None, None, None))
            cells += [f"{fmt(rate, 1)} {unit}".strip(), fmt(ratio, 2) + (f" (peak {peak:.2f})" if peak else "")]
        line = f"| {n} | " + " | ".join(cells)
        if len(tables) > 1:
            first, last = tables[0][0].get(n), tables[-1][0].get(n)
            both = first and last and first[0] and last[0]
            speedup = last[0] / first[0] if both else None
            twin = last[4] / first[4] if both and first[4] and last[4] else None
            line += " | " + (fmt(speedup, 2) + "x" if speedup else "—") + " | " + (fmt(twin, 2) + "x" if twin else "—")
        out.append(line + " |")
    return "\n".join(out)


def variant(r, with_device=False):
    """What sets a `staleprop bench` run apart beyond model, batch, precision, kernels, method and K
    (the cuts of K > 1 modules; with_device: the device too)."""
    parts = []
    if r.get("modules", 1) > 1 and r.get("cuts"):
        parts.append("cuts " + ",".join(str(c) for c in r["cuts"]))
    if with_device and r.get("device"):
        parts.append(r["device"])
    if r.get("shrink", 1) != 1:
        parts.append(f"β {r['shrink']:g}")
    parts += [name for key, name in (("recompute", "recompute"), ("weight_stash", "weight stash")) if r.get(key)]
    parts += [r[key] for key in ("mainloop", "kernel_switches") if r.get(key) not in (None, "", "none")]
    return ", ".join(parts) or "—"


def train_table(paths):
    runs, others = [], 0
    for p in paths:
        for r in read_lines(p):
            if all(k in r for k in ("model", "batch_size", "precision", "method", "modules")):
                runs.append(r)
            else:
                others += 1
    if others:
        print(f"bench_table.py train: {others} lines that are not staleprop bench records skipped", file=sys.stderr)
    # Lines written before planned arenas existed have no graph_memory: their graphs were bump.
    modes = [("op by op", lambda r: not r.get("graphs")),
             ("graphs, planned", lambda r: r.get("graphs") and r.get("graph_memory") == "planned"),
             ("graphs, bump", lambda r: r.get("graphs") and r.get("graph_memory", "bump") == "bump")]
    configs = {}
    # Runs of several devices in the files given stay apart, each row naming its device.
    many_devices = len({r.get("device") for r in runs}) > 1
    for r in runs:
        key = (r["model"], r["batch_size"], r["precision"], r.get("kernels", "custom"), r["method"], r["modules"],
               variant(r, many_devices))
        for mode, match in modes:
            if match(r):
                configs.setdefault(key, {}).setdefault(mode, []).append(r)
    head = ("| model | batch | precision | kernels | method | K | variant | "
            + " | ".join(f"{m}: img/s | {m}: peak MiB" for m, _ in modes)
            + " | planned vs op by op: speed, memory | bump vs op by op: speed, memory |")
    out = [head, "|---|---|---|---|---|---|---|" + "---|---|" * len(modes) + "---|---|"]
    for key, rounds in configs.items():
        cells, by_mode = [], {}
        for mode, _ in modes:
            r, note = fastest(rounds[mode]) if mode in rounds else (None, "")
            by_mode[mode] = r
            cells += [fmt(r["images_per_s"], 0) + (f" ({note})" if note else "") if r else "—",
                      fmt(r["peak_allocated_bytes"] / 2**20, 0) if r else "—"]
        base, planned, bump = (by_mode.get(m) for m, _ in modes)

        def ratio(a, b, field):
            return f"{a[field] / b[field]:.2f}x" if a and b and b[field] else "—"

        cells.append(ratio(planned, base, "images_per_s") + ", " + ratio(planned, base, "peak_allocated_bytes"))
        cells.append(ratio(bump, base, "images_per_s") + ", " + ratio(bump, base, "peak_allocated_bytes"))
        out.append("| " + " | ".join(str(k) for k in key) + " | " + " | ".join(cells) + " |")
    return "\n".join(out)


def ops_table(paths):
    runs = []
    for p in paths:
            runs += [r for r in read_lines(p) if "op_profile" in r]
    if not runs:  # an empty table said nothing of why
        raise SystemExit(f"bench_table ops: no run with an op profile in {', '.join(paths)} "
                         "(staleprop bench --profile-ops N --json FILE writes them)")
    labels, per_op, totals = [], [], []
    for r in runs:
        steps = r["profile_steps"]
        by_op = {}
        for t in r["op_profile"]:
            by_op[t["op"]] = by_op.get(t["op"], 0.0) + t["ms"] / steps
        k = f' K{r["modules"]}' if r.get("modules", 1) > 1 else ""
        labels.append(f'{r["model"]} b{r["batch_size"]} {r["precision"]} {r["kernels"]} {r["method"]}{k}')
        per_op.append(by_op)
        totals.append((sum(by_op.values()), r["profile_wall_ms"] / steps))
    ops = sorted({op for by_op in per_op for op in by_op}, key=lambda op: -max(b.get(op, 0.0) for b in per_op))
    out = ["| op | " + " | ".join(f"{l}: ms/step | {l}: share" for l in labels) + " |",
           "|---|" + "---|---|" * len(labels)]
    for op in ops:
        cells = []
        for by_op, (total, _) in zip(per_op, totals):
            ms = by_op.get(op)
            cells += [fmt(ms, 3), f"{100 * ms / total:.1f}%" if ms is not None and total else "—"]
        out.append(f"| {op} | " + " | ".join(cells) + " |")
    out.append("| **op time** | " + " | ".join(f"{fmt(t, 3)} | 100%" for t, _ in totals) + " |")
    out.append("| **wall time** | " + " | ".join(f"{fmt(w, 3)} | " for _, w in totals) + " |")
    out.append("| **device waiting for the host** | " +
               " | ".join(f"{fmt(max(w - t, 0.0), 3)} | {100 * max(w - t, 0.0) / w:.1f}% of wall" if w else "— | —"
                          for t, w in totals) + " |")
    return "\n".join(out)


def pytorch_setting(r):
    """(precision, layout) of a bench/pytorch_baseline.py record: fp32, tf32 or bf16; NCHW or channels_last."""
    precision = "bf16" if r.get("bf16") else "tf32" if r.get("tf32") else "fp32"
    return precision, "channels_last" if r.get("channels_last") else "NCHW"


def same_machine(ours, theirs, their_threads=None):
    """Whether a staleprop device string ("NVIDIA H100 80GB HBM3 (sm_90, 79.2 GiB)", "cpu (2 threads, ..)")
    and a PyTorch one ("NVIDIA H100 80GB HBM3", "cpu x86_64"; its threads where it records them) name the
    same kind of device: the same GPU model, whole (an "NVIDIA H200 NVL" is not an "NVIDIA H200"), or
    CPUs with the same thread count where both say it. A record without a device matches none."""
    if not ours or not theirs:
        return False
    if ours.startswith("cpu") or theirs.startswith("cpu"):
        if not (ours.startswith("cpu") and theirs.startswith("cpu")):
            return False
        m = re.match(r"cpu \((\d+) threads?", ours)
        return their_threads is None or m is None or int(m.group(1)) == int(their_threads)
    return ours.split(" (", 1)[0] == theirs


def fastest(runs):
    """The fastest of a setting's runs, and a note of how many ran and the slowest's rate."""
    rates = [x["images_per_s"] for x in runs]
    best = max(runs, key=lambda x: x["images_per_s"])
    return best, (f"fastest of {len(runs)}, slowest {min(rates):.0f}" if len(runs) > 1 else "")


def pytorch_table(paths):
    ours, theirs, skipped = {}, {}, 0
    names = dict(zip(paths, distinct_names(paths)))
    for p in paths:
        for r in read_lines(p):
            if r.get("framework") == "pytorch-eager":
                if not all(k in r for k in ("model", "batch_size", "images_per_s")):
                    skipped += 1  # e.g. bench/pytorch_cifar_train.py's epoch records
                    continue
                theirs.setdefault((r.get("device", ""), r.get("threads"), r["model"], r["batch_size"],
                                   pytorch_setting(r)), []).append(r)
            elif r.get("method") in ("backprop", "bp") and r.get("modules", 1) == 1 and "precision" in r:
                # Plain backprop over one module: the backprop trainer, or --method bp --split 1.
                graphs = "graphs" if r.get("graphs") else "op by op"
                # The file too: runs that differ only in settings their lines do not record
                # (gpu_session.sh's paths off, on and by default) stay apart.
                ours.setdefault((r.get("device", ""), r["model"], r["batch_size"], r["precision"],
                                 r.get("kernels", "custom"), graphs, variant(r), names[p]), []).append(r)
            else:
                skipped += 1
    if skipped:
        print(f"bench_table.py pytorch: {skipped} lines that are neither plain backprop over one module nor a "
              "PyTorch throughput record skipped", file=sys.stderr)
    several_devices = len({key[0] for key in ours}) > 1  # then each row names its own

    theirs = {key: fastest(runs) for key, runs in theirs.items()}
    out = ["| model | batch | precision | kernels | run | variant | img/s | PyTorch, same precision: img/s (layout) "
           "| ratio | PyTorch's best: img/s (setting) | ratio | peak MiB, ours / PyTorch | file |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for (device, model, batch, precision, kernels, graphs, _, source), runs in ours.items():
        r, repeats = fastest(runs)
        var = variant(r, several_devices)
        mine = [(t, setting, note) for (d, threads, m, b, setting), (t, note) in theirs.items()
                if m == model and b == batch and same_machine(device, d, threads)]
        same = [x for x in mine if x[1][0] == precision]
        best_same = max(same, key=lambda x: x[0]["images_per_s"], default=None)
        best_any = max(mine, key=lambda x: x[0]["images_per_s"], default=None)

        def cell(best):
            if not best:
                return "—", "—"
            t, (prec, layout), note = best
            return (f"{t['images_per_s']:.0f} ({prec}, {layout}{'; ' + note if note else ''})",
                    f"{r['images_per_s'] / t['images_per_s']:.2f}")

        same_cells, any_cells = cell(best_same), cell(best_any)
        theirs_mib = fmt(best_same[0]["peak_memory_bytes"] / 2**20, 0) if best_same and best_same[0].get(
            "peak_memory_bytes") else "—"
        rate = f"{r['images_per_s']:.0f}" + (f" ({repeats})" if repeats else "")
        out.append(f"| {model} | {batch} | {precision} | {kernels} | {graphs} | {var} | {rate} | "
                   f"{same_cells[0]} | {same_cells[1]} | {any_cells[0]} | {any_cells[1]} | "
                   f"{fmt(r['peak_allocated_bytes'] / 2**20, 0)} / {theirs_mib} | {source} |")
    return "\n".join(out)


def main(argv):
    tables = {"kernels": kernels_table, "train": train_table, "ops": ops_table, "pytorch": pytorch_table}
    if len(argv) >= 2 and argv[1] in ("-h", "--help"):
        sys.stdout.write(__doc__)
        return 0
    if len(argv) < 3 or argv[1] not in tables:
        sys.stderr.write(__doc__)
        return 2
    print(tables[argv[1]](argv[2:]))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
