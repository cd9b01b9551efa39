#!/usr/bin/env python3
"""tools/trace_overlap.py: usage `test_trace_overlap.py STALEPROP`.

On a hand-made trace whose answer is known, the busy shares, the time at each level of
concurrency and the concurrency must come out exactly, with and without some stages, and so
must each module's time per kind of stage and idle (--stages); on real CPU-emulation traces of
ResNet-20 over two modules, the locked pipeline (bp) must show the modules taking turns and
fdg's modules overlapping more.
"""
import json
import os
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
SCRIPT = os.path.join(HERE, "..", "..", "tools", "trace_overlap.py")
sys.path.insert(0, HERE)
from test_accuracy_table import check, write_cifar  # noqa: E402


def table_rows(*paths, skip=(), stages=False):
    args = [a for name in skip for a in ("--skip", name)] + (["--stages"] if stages else [])
    p = subprocess.run([sys.executable, SCRIPT, *args, *paths], capture_output=True, text=True)
    check(p.returncode == 0, "trace_overlap succeeds", p.stdout + p.stderr)
    rows = [l for l in p.stdout.splitlines() if l.startswith("| ") and not l.startswith("| trace")]
    return [[c.strip() for c in r.strip("|").split("|")] for r in rows]


def main():
    staleprop = os.path.abspath(sys.argv[1])
    with tempfile.TemporaryDirectory() as tmp:
        # Module 1 busy 0-10 and 20-30 ms, module 2 busy 5-25 ms (timestamps in microseconds).
        made = os.path.join(tmp, "made.json")
        ev = [{"name": "thread_name", "ph": "M", "pid": 1, "tid": t, "args": {"name": f"module {t}"}} for t in (1, 2)]
        for tid, name, ts, dur in [(1, "fwd b0", 0, 10000), (1, "step b0", 20000, 10000), (2, "bwd b0", 5000, 20000)]:
            ev.append({"name": name, "ph": "X", "pid": 1, "tid": tid, "ts": ts, "dur": dur})
        # Ops of --trace-ops (category "op"), inside a stage and between stages: not stages.
        for tid, ts, dur in [(1, 1000, 2000), (1, 12000, 3000), (2, 26000, 1000)]:
            ev.append({"name": "copy", "cat": "op", "ph": "X", "pid": 1, "tid": tid, "ts": ts, "dur": dur})
        with open(made, "w") as f:
            json.dump({"traceEvents": ev}, f)
        (row,) = table_rows(made)
        check(row[1:] == ["30.0", "67/67", "0", "67", "33", "1.33"], f"the hand-made trace: {row}")
        # --skip=NAME is --skip NAME; an unknown option and a file that is no trace are refused, named.
        p = subprocess.run([sys.executable, SCRIPT, "--skip=step", made], capture_output=True, text=True)
        check(p.returncode == 0 and "| 25.0 | 40/80 |" in p.stdout, "--skip=step: the span and shares without the step",
              p.stdout + p.stderr)
        p = subprocess.run([sys.executable, SCRIPT, "--stage", made], capture_output=True, text=True)
        check(p.returncode == 2 and "unknown option '--stage'" in p.stderr, "an unknown option", p.stdout + p.stderr)
        bad = os.path.join(tmp, "bad.json")
        with open(bad, "w") as f:
            f.write("{")
        p = subprocess.run([sys.executable, SCRIPT, bad], capture_output=True, text=True)
        check(p.returncode != 0 and "bad.json: not a readable Chrome trace" in p.stderr and "Traceback" not in p.stderr,
              "a file that is no trace", p.stdout + p.stderr)
        # Per module and kind of stage: fwd, bwd, step, then idle within the 30 ms span.
        rows = table_rows(made, stages=True)
        check([r[1:] for r in rows] == [["module 1", "10.0", "0.0", "10.0", "10.0"],
                                         ["module 2", "0.0", "20.0", "0.0", "10.0"]], f"the stage table: {rows}")
        # A module left without stages is all idle.
        rows = table_rows(made, stages=True, skip=["bwd"])
        check([r[1:] for r in rows] == [["module 1", "10.0", "10.0", "10.0"], ["module 2", "0.0", "0.0", "30.0"]],
              f"the stage table without bwd: {rows}")
        # And in the overlap table: busy 0, and a column for two modules busy at once.
        (row,) = table_rows(made, skip=["bwd"])
        check(row[1:] == ["30.0", "67/0", "33", "67", "0", "0.67"], f"the hand-made trace without bwd: {row}")
        (row,) = table_rows(made, skip=["step"])
        check(row[1:] == ["25.0", "40/80", "0", "80", "20", "1.20"], f"the hand-made trace without steps: {row}")

        data = os.path.join(tmp, "data")
        write_cifar(data)
        traces = []
        for method in ("bp", "fdg"):
            trace = os.path.join(tmp, f"{method}.json")
            p = subprocess.run([staleprop, "train", "--model", "resnet20", "--method", method, "--split", "2",
                                "--data", data, "--train-limit", "192", "--test-limit", "32", "--batch-size", "32",
                                "--threads", "2", "--progress", "none", "--trace", trace],
                               capture_output=True, text=True)
            check(p.returncode == 0, f"the {method} run", p.stdout + p.stderr)
            traces.append(trace)
        bp, fdg = table_rows(*traces)
        for row in (bp, fdg):
            levels = [float(x) for x in row[3:6]]
            check(abs(sum(levels) - 100) <= 2, f"the levels cover the span: {row}")
            check(1.0 <= float(row[6]) + 0.02 and float(row[6]) <= 2.0, f"concurrency within 1..K: {row}")
        # The locked modules overlap only where module 2's optimizer step runs beside module 1's
        # backward (0-1% of the span here). Timed by how fast a thread records an event, that
        # share grows when the machine is loaded, so it is bounded loosely; without the steps,
        # the stages are ordered by the queues' events (each ends before its message is marked
        # ready), and no overlap at all is left, however loaded the machine.
        check(float(bp[5]) <= 10, f"the locked pipeline's modules take turns: {bp}")
        check(float(fdg[5]) > float(bp[5]) + 20, f"the decoupled modules overlap more than the locked ones: {fdg}")
        bp_alone, fdg_alone = table_rows(*traces, skip=["step"])
        check(float(bp_alone[5]) == 0 and float(bp_alone[6]) <= 1.0, f"without the steps, bp's modules never overlap: {bp_alone}")
        check(float(fdg_alone[5]) > 20, f"without the steps, fdg's modules still overlap: {fdg_alone}")
    print("trace_overlap: all checks passed")


if __name__ == "__main__":
    main()
