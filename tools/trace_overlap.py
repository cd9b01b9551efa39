#!/usr/bin/env python3
"""How much the modules of a decoupled run overlap, from `staleprop train --trace` timelines.

Reads Chrome-trace JSON files (one thread per module, an "X" event per module stage, timed
with device events; the ops of --trace-ops are left out) and prints, per file, as a Markdown table row:
  - the span of the trace and each module's busy share of it;
  - the share of the span during which exactly 0, 1, 2, ... modules were busy;
  - the concurrency: the modules' summed busy time over the span. 1.0 means the modules take
    turns (the locked pipeline); K means all K run at once all the time.

    python3 tools/trace_overlap.py trace-resnet56-bp-K4.json trace-resnet56-fdg-K4.json

`--skip NAME` (repeatable) leaves out the stages whose name starts with NAME: `--skip step`
shows the overlap without the optimizer steps (which a locked module runs beside the next
work of the module below it). The stage names are staleprop's: "fwd", "bwd", "fwd+loss+bwd"
and "step" (units captured or replayed with --graphs keep their step inside "bwd" or
"fwd+loss+bwd").

`--stages` prints instead, for each module of each trace, the milliseconds it spent in each
kind of stage (the name before " b<batch>") and idle within the trace's span: where a locked
module's time goes, and how much of it is the optimizer step.
"""
import json
import sys


def stage_events(path, skip=()):
    """(thread names by tid, the stages' "X" events whose names do not start with any of skip).
    The ops that --trace-ops adds (category "op", nested in the stages or between them) are not
    stages and are left out."""
    try:
        with open(path) as f:
            events = json.load(f)["traceEvents"]
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as e:
        raise SystemExit(f"{path}: not a readable Chrome trace ({type(e).__name__}: {e})")
    names = {e["tid"]: e["args"]["name"] for e in events if e.get("ph") == "M" and e.get("name") == "thread_name"}
    kept = [e for e in events if e.get("ph") == "X" and e.get("cat") != "op"
            and not any(e.get("name", "").startswith(p) for p in skip)]
    return names, kept


def intervals_of(events):
    spans = {}
    for e in events:
        spans.setdefault(e["tid"], []).append((float(e["ts"]), float(e["ts"]) + float(e["dur"])))
    return {tid: sorted(iv) for tid, iv in spans.items()}


def module_intervals(path, skip=()):
    names, events = stage_events(path, skip)
    return intervals_of(events), names


STAGE_ORDER = ["fwd", "fwd+loss+bwd", "bwd", "step"]


def stage_table(paths, skip):
    """Each module's milliseconds per kind of stage, and idle within the trace's span."""
    per_trace, kinds = [], set()
    for path in paths:
        names, events = stage_events(path, skip)
        span, busy, _ = overlap(intervals_of(events))
        if span <= 0:
            print(f"{path}: no module stages in the trace", file=sys.stderr)
            return 1
        ms = {tid: {} for tid in names}  # every module, also one left without stages
        for e in events:
            kind = e.get("name", "").rsplit(" b", 1)[0]
            kinds.add(kind)
            ms.setdefault(e["tid"], {}).setdefault(kind, 0.0)
            ms[e["tid"]][kind] += float(e["dur"]) / 1e3
            busy.setdefault(e["tid"], 0.0)
        per_trace.append((path, names, span, busy, ms))
    order = [k for k in STAGE_ORDER if k in kinds] + sorted(kinds - set(STAGE_ORDER))
    head = ["trace", "module"] + [f"{k} ms" for k in order] + ["idle ms"]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for path, names, span, busy, ms in per_trace:
        for tid in sorted(ms):
            cells = [f"{ms[tid].get(k, 0.0):.1f}" for k in order] + [f"{(span - busy.get(tid, 0.0)) / 1e3:.1f}"]
            print(f"| {path} | {names.get(tid, tid)} | " + " | ".join(cells) + " |")
    return 0


def overlap(intervals):
    """Returns (span, busy per module, time with exactly n modules busy for n = 0..K)."""
    edges = []
    busy = {}
    for tid, ivs in intervals.items():
        merged = []
        for start, end in ivs:  # a module's own stages never overlap, but merge to be safe
            if merged and start <= merged[-1][1]:
                merged[-1][1] = max(merged[-1][1], end)
            else:
                merged.append([start, end])
        busy[tid] = sum(end - start for start, end in merged)
        for start, end in merged:
            edges += [(start, 1), (end, -1)]
    if not edges:
        return 0.0, busy, [0.0]
    edges.sort()
    first, last = edges[0][0], edges[-1][0]
    levels = [0.0] * (len(intervals) + 1)
    active, at = 0, first
    for t, step in edges:
        levels[active] += t - at
        active += step
        at = t
    return last - first, busy, levels


def main(args):
    paths, skip, stages = [], [], False
    while args:
        a = args.pop(0)
        if a == "--stages":
            stages = True
        elif a == "--skip":
            if not args:
                print("--skip needs a stage name", file=sys.stderr)
                return 2
            skip.append(args.pop(0))
        elif a.startswith("--skip="):
            skip.append(a[len("--skip="):])
        elif a in ("-h", "--help"):
            print(__doc__.strip())
            return 0
        elif a.startswith("-") and a != "-":
            print(f"unknown option {a!r} (--skip NAME, --stages, --help)", file=sys.stderr)
            return 2
        else:
            paths.append(a)
    if not paths:
        print(__doc__.strip(), file=sys.stderr)
        return 2
    if stages:
        return stage_table(paths, skip)
    rows = []
    width = 0
    for path in paths:
        intervals, names = module_intervals(path, skip)
        span, busy, levels = overlap(intervals)
        if span <= 0:
            print(f"{path}: no module stages in the trace", file=sys.stderr)
            return 1
        # Every module of the trace, also one whose stages --skip left out (busy 0).
        modules = sorted(set(names) | set(busy))
        width = max(width, len(modules) + 1)
        shares = "/".join(f"{100 * busy.get(t, 0.0) / span:.0f}" for t in modules)
        rows.append((path, span, shares, [100 * x / span for x in levels], sum(busy.values()) / span))
    head = ["trace", "span ms", "busy % per module"] + [f"{n} busy %" for n in range(width)] + ["concurrency"]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for path, span, shares, levels, conc in rows:
        levels += [0.0] * (width - len(levels))
        print(f"| {path} | {span / 1e3:.1f} | {shares} | " + " | ".join(f"{x:.0f}" for x in levels) + f" | {conc:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
