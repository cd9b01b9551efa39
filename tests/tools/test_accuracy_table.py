#!/usr/bin/env python3
"""tools/accuracy_table.py end to end on the CPU: usage `test_accuracy_table.py STALEPROP`.

Writes a CIFAR-10 binary set of the official shape (5 training files and a test file of
10,000 records; labels 0-9, flat images), runs the table's cells for ResNet-20 at K = 1, 2, 3
with bp, ddg and fdg on 64 images for one epoch, two at once, and checks that:
  - each cell ran once: bp at K = 1 only, ddg and fdg at K = 2 and 3 with FDG's cuts, the fdg
    cells with the shrink factor given, the ddg cells with none;
  - a second run skips the finished cells, a cell whose metrics lost their epoch starts again,
    and no cell starts when the budget is spent; an --epochs after `--` sizes the cells;
  - a cell stopped after its first of two epochs resumes from its checkpoint, dropping the
    records written after it, and ends as the uninterrupted run does;
  - the Markdown table has one row per cell with its shrink factor, its busy shares, its img/s
    marked as shared with the cells beside it, its own peak memory, and FDG's published figure
    (with the factor it was published with) only where one exists; with --also, the cells of
    several folders in one table, each saying the device it ran on (else its folder).
"""
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from tooltest import check, run_script, write_cifar  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
SCRIPT = os.path.join(HERE, "..", "..", "tools", "accuracy_table.py")


def read_epochs(path):
    return [e for e in (json.loads(l) for l in open(path)) if e.get("event") == "epoch"]


def run(*args):
    return run_script(SCRIPT, *args)


def main():
    staleprop = os.path.abspath(sys.argv[1])
    with tempfile.TemporaryDirectory() as tmp:
        data, out = os.path.join(tmp, "data"), os.path.join(tmp, "runs")
        write_cifar(data)
        common = ["--staleprop", staleprop, "--out", out, "--models", "resnet20", "--splits", "1,2,3", "--methods",
                  "bp,ddg,fdg", "--epochs", "1", "--shrink", "0.5"]
        train = ["--", "--data", data, "--train-limit", "64", "--test-limit", "64", "--batch-size", "16",
                 "--threads", "2"]
        rc, log = run("run", *common, "--budget", "600", "--parallel", "2", *train)
        check(rc == 0 and "--parallel 2" in log, "the first run succeeds, two cells at once", log)
        cells = sorted(f[:-6] for f in os.listdir(out) if f.endswith(".jsonl"))
        check(cells == ["resnet20-bp-K1", "resnet20-ddg-K2", "resnet20-ddg-K3", "resnet20-fdg-K2", "resnet20-fdg-K3"],
              f"the cells run: {cells}", log)
        cmd = open(os.path.join(out, "resnet20-fdg-K2.cmd")).read()
        check("--method fdg --split 2" in cmd and "--split-at fdg --shrink 0.5" in cmd, "the K = 2 command", cmd)
        ddg_cmd = open(os.path.join(out, "resnet20-ddg-K2.cmd")).read()
        check("--split-at fdg" in ddg_cmd and "--shrink" not in ddg_cmd, "ddg shrinks by default not", ddg_cmd)
        check("--split-at" not in open(os.path.join(out, "resnet20-bp-K1.cmd")).read(), "K = 1 has no cut")

        rc, log = run("run", *common, "--budget", "600", *train)
        check(rc == 0 and log.count("skipped") == 5, "a second run skips every finished cell", log)

        # A cell whose metrics lost their epoch starts again; the others stay as they are.
        path = os.path.join(out, "resnet20-ddg-K3.jsonl")
        lines = open(path).read().splitlines()
        with open(path, "w") as f:
            f.write("\n".join(l for l in lines if json.loads(l).get("event") != "epoch") + "\n")
        rc, log = run("run", *common, "--budget", "600", *train)
        check(rc == 0 and log.count("skipped") == 4 and "resnet20-ddg-K3: test accuracy" in log and
              "resumes" not in log, "only the incomplete cell runs again, from the start", log)

        # staleprop takes the last --epochs: one after `--` sizes the cell (its end, its "done").
        late = ["--staleprop", staleprop, "--out", os.path.join(tmp, "late"), "--models", "resnet20", "--splits", "1",
                "--methods", "bp", "--epochs", "1", "--budget", "600"]
        rc, log = run("run", *late, *train, "--epochs", "2")
        check(rc == 0 and "resnet20-bp-K1: test accuracy" in log and "after 2 epochs" in log and
              [e["epoch"] for e in read_epochs(os.path.join(tmp, "late", "resnet20-bp-K1.jsonl"))] == [1, 2],
              "an --epochs after `--` trains the cell that long", log)
        rc, log = run("run", *late, *train, "--epochs", "2")
        check(rc == 0 and "resnet20-bp-K1: done (2 epochs), skipped" in log, "and then counts it done", log)

        rc, log = run("run", *common[:3], os.path.join(tmp, "empty"), *common[4:], "--budget", "0", *train)
        check(rc == 0 and log.count("not started") == 5, "no cell starts without budget", log)

        rc, table = run("table", "--out", out)
        check(rc == 0, "the table is made", table)
        rows = [l for l in table.splitlines() if l.startswith("| resnet20 ")]
        check(len(rows) == 5, "one row per cell", table)
        fdg = [r for r in rows if r.startswith("| resnet20 | fdg | 2 | 0.5 | 1 |")]
        check(len(fdg) == 1, "the fdg K = 2 row, with its shrink factor", table)
        cols = [c.strip() for c in fdg[0].strip("|").split("|")]
        check(len(cols) == 11 and cols[8].count("/") == 1, "busy shares of both modules", fdg[0])
        check(0 <= float(cols[5]) <= 100 and cols[10] == "7.23 (β = 0.2)",
              "an error in %, and FDG's figure with the factor it was published with", fdg[0])
        check(cols[7].endswith("(up to 2 at once)") and float(cols[9].replace(",", "")) > 0,
              "img/s marked as shared with the other cell, and the cell's own peak memory", fdg[0])
        ddg3 = [r for r in rows if r.startswith("| resnet20 | ddg | 3 | 1 |")]
        check(len(ddg3) == 1 and ddg3[0].rstrip().endswith("| – |"), "ddg K = 3: β 1, no published figure", table)
        rc, log = run("table", "--out", os.path.join(tmp, "empty"))
        check(rc == 1 and os.path.join(tmp, "empty") + ": no cells" in log and "Traceback" not in log,
              "an empty directory is no table, and says so", log)
        rc, log = run("table", "--out", os.path.join(tmp, "nowhere"))
        check(rc == 2 and "--out " + os.path.join(tmp, "nowhere") + ": no such directory" in log and
              "Traceback" not in log, "a missing directory is named", log)
        # FDG's figures stand beside the ResNet-56 cells they were published for: the same records
        # under those cells' names.
        r56 = os.path.join(tmp, "r56")
        os.makedirs(r56)
        for src, dst in (("resnet20-fdg-K2", "resnet56-fdg-K2"), ("resnet20-ddg-K2", "resnet56-ddg-K2"),
                         ("resnet20-bp-K1", "resnet56-bp-K1")):
            shutil.copy(os.path.join(out, src + ".jsonl"), os.path.join(r56, dst + ".jsonl"))
        rc, table = run("table", "--out", r56)
        published = {tuple(c.strip() for c in l.strip("|").split("|"))[1]: l.strip("|").split("|")[10].strip()
                     for l in table.splitlines() if l.startswith("| resnet56 ")}
        check(rc == 0 and published == {"bp": "6.19", "fdg": "5.90 (β = 0.5)", "ddg": "6.89"},
              "FDG's published errors beside bp K=1, fdg K=2 (with its β) and ddg K=2", table)
        # Cells of several folders (--also: other sessions, other devices) in one table, each row
        # saying where it ran: the device of its start record, else its folder (epoch records only).
        bare = os.path.join(tmp, "bare")
        os.makedirs(bare)
        with open(os.path.join(bare, "resnet56-fdg-K4.jsonl"), "w") as f:
            for e in read_epochs(os.path.join(out, "resnet20-fdg-K2.jsonl")):
                f.write(json.dumps(e) + "\n")
        rc, table = run("table", "--out", r56, "--also", bare)
        where = {tuple(c.strip() for c in l.strip("|").split("|"))[1:3]: l.strip("|").split("|")[11].strip()
                 for l in table.splitlines() if l.startswith("| resnet56 ")}
        check(rc == 0 and "device (or folder)" in table and
              where == {("bp", "1"): "cpu", ("ddg", "2"): "cpu", ("fdg", "2"): "cpu", ("fdg", "4"): bare},
              "the cells of both folders, with the device each ran on (the folder where unrecorded)", table)
        # A folder named twice, however spelt, lists its cells once (and alone needs no device column).
        rc, table = run("table", "--out", r56, "--also", r56 + os.sep + ".")
        check(rc == 0 and len([l for l in table.splitlines() if l.startswith("| resnet56 ")]) == 3 and
              "device (or folder)" not in table, "a folder named twice lists its cells once", table)
        # A cell resumed on another device names both, in order.
        with open(os.path.join(bare, "resnet56-ddg-K3.jsonl"), "w") as f:
            epochs = read_epochs(os.path.join(out, "resnet20-fdg-K2.jsonl"))
            for device, e in (("NVIDIA H100 80GB HBM3 (sm_90, 79.2 GiB)", epochs[0]),
                              ("NVIDIA H200 (sm_90, 139.8 GiB)", epochs[-1])):
                f.write(json.dumps({"event": "start", "device": device}) + "\n" + json.dumps(e) + "\n")
        rc, table = run("table", "--out", r56, "--also", bare)
        row = [l for l in table.splitlines() if l.startswith("| resnet56 | ddg | 3 ")]
        check(rc == 0 and len(row) == 1 and row[0].rstrip().endswith("| NVIDIA H100 80GB HBM3, NVIDIA H200 |"),
              "a cell resumed on another device names both", table)
        rc, log = run("table", "--out", r56, "--also", os.path.join(tmp, "nowhere"))
        check(rc == 2 and "--also " + os.path.join(tmp, "nowhere") + ": no such directory" in log,
              "a missing --also directory is named", log)

        # Resumption: the fdg K = 2 cell over two epochs, whole...
        two = ["--staleprop", staleprop, "--models", "resnet20", "--splits", "2", "--methods", "fdg", "--epochs",
               "2", "--shrink", "0.5", "--budget", "600"]
        whole = os.path.join(tmp, "whole")
        rc, log = run("run", "--out", whole, *two, *train)
        check(rc == 0 and "test accuracy" in log, "the two-epoch cell runs", log)
        full = read_epochs(os.path.join(whole, "resnet20-fdg-K2.jsonl"))
        # ...then as if the budget had stopped it after epoch 1: the same command's checkpoint
        # of epoch 1, and its metrics up to there plus a record written after the checkpoint.
        words = shlex.split(open(os.path.join(whole, "resnet20-fdg-K2.cmd")).read())
        parts = os.path.join(tmp, "parts")
        os.makedirs(parts)
        for flag, value in (("--checkpoint", os.path.join(parts, "c-{epoch}.safetensors")),
                            ("--metrics", os.path.join(parts, "m.jsonl")), ("--log", os.path.join(parts, "l.log"))):
            words[words.index(flag) + 1] = value
        p = subprocess.run(words, capture_output=True, text=True)
        check(p.returncode == 0, "the same command with a checkpoint per epoch", p.stdout + p.stderr)
        cut, state = os.path.join(tmp, "cut"), os.path.join(tmp, "state")
        os.makedirs(cut)
        os.makedirs(state)
        shutil.copy(os.path.join(parts, "c-1.safetensors"), os.path.join(state, "resnet20-fdg-K2.safetensors"))
        shutil.copy(os.path.join(whole, "resnet20-fdg-K2.cmd"), cut)
        with open(os.path.join(parts, "m.jsonl")) as f, open(os.path.join(cut, "resnet20-fdg-K2.jsonl"), "w") as g:
            g.writelines(l for l in f if json.loads(l).get("epoch", 1) == 1)  # the start record too
            g.write(json.dumps({"event": "step", "epoch": 2, "step": 5, "loss": 9.0}) + "\n")
        rc, log = run("run", "--out", cut, "--state", state, *two, *train)
        check(rc == 0 and "resnet20-fdg-K2: resumes after epoch 1 of 2" in log, "the cell resumes", log)
        resumed = [json.loads(l) for l in open(os.path.join(cut, "resnet20-fdg-K2.jsonl"))]
        check([e["epoch"] for e in resumed if e["event"] == "epoch"] == [1, 2] and
              all(e.get("loss") != 9.0 for e in resumed), "each epoch once, the stale record gone", resumed)
        check(resumed[-1]["test_acc"] == full[-1]["test_acc"] and resumed[-1]["loss"] == full[-1]["loss"],
              "the resumed cell ends as the whole one", f"{resumed[-1]}\n{full[-1]}")

        # The budget itself stops a long cell at an epoch boundary, and the next call resumes it.
        long = ["--staleprop", staleprop, "--out", os.path.join(tmp, "long"), "--models", "resnet20", "--splits",
                "2", "--methods", "fdg", "--epochs", "400", "--budget", "6"]
        metrics = os.path.join(tmp, "long", "resnet20-fdg-K2.jsonl")
        rc, log = run("run", *long, *train)
        check(rc == 0 and "resnet20-fdg-K2: " in log and "of 400 epochs; the next call resumes it" in log,
              "the budget stops the cell", log)
        first = [e["epoch"] for e in read_epochs(metrics)]
        rc, log = run("run", *long, *train)
        check(rc == 0 and f"resumes after epoch {first[-1]} of 400" in log, "the next call resumes it", log)
        again = [e["epoch"] for e in read_epochs(metrics)]
        check(again == list(range(1, len(again) + 1)) and len(again) > len(first), "each epoch once, more of them",
              again)
        # Flags of where files go and how the run reports are no change of recipe...
        rc, log = run("run", *long, *train, "--eval-batch-size=32", "--threads", "1")
        check(rc == 0 and "resumes after epoch" in log, "other reporting flags still resume", log)
        # ...but another recipe under the same cell starts it again rather than mixing the two.
        first_recipe = [e["epoch"] for e in read_epochs(metrics)]
        rc, log = run("run", *long, *train, "--weight-decay", "1e-4")
        check(rc == 0 and "the recipe differs from the one its checkpoint was trained with; starts again" in log,
              "a changed recipe starts the cell again", log)
        aside = os.path.join(tmp, "long", "replaced")
        check(f"had another recipe: kept in {aside}, starts again" in log and
              [e["epoch"] for e in read_epochs(os.path.join(aside, "resnet20-fdg-K2.1.jsonl"))] == first_recipe,
              "the epochs of the first recipe are kept aside, whole", log)
        renewed = [e["epoch"] for e in read_epochs(metrics)]
        check(renewed == list(range(1, len(renewed) + 1)) and "--weight-decay 1e-4" in
              open(os.path.join(tmp, "long", "resnet20-fdg-K2.cmd")).read(), "from epoch 1, on the new recipe",
              renewed)
        # A cell whose flags its run would refuse: the sweep refuses it before any run, naming the
        # cell and why.
        rc, log = run("run", *long, *train, "--cutout", "40")
        check(rc == 1 and "resnet20-fdg-K2 (line 1): --cutout must be in 0..32" in log and
              "resnet20-fdg-K2: no epoch finished (sweep exit 1); the run did not start" in log,
              "the failure is named, and the exit status says it", log)

        # No cells asked for; one cell named twice; a --staleprop that is not a program.
        rc, log = run("run", "--staleprop", staleprop, "--out", os.path.join(tmp, "none"), "--splits", "1",
                      "--methods", "fdg")
        check(rc != 0 and "no cells: bp runs at K = 1 only" in log, "a choice of no cells is refused", log)
        rc, log = run("run", "--staleprop", os.path.join(tmp, "no-such-staleprop"), "--out", os.path.join(tmp, "x"),
                      "--models", "resnet20", "--splits", "2", "--methods", "fdg")
        check(rc != 0 and "not an executable file" in log and not os.path.exists(os.path.join(tmp, "x")),
              "a missing --staleprop is named before anything is written", log)
        twice = os.path.join(tmp, "twice")
        rc, log = run("run", "--staleprop", staleprop, "--out", twice, "--models", "resnet20,resnet20", "--splits",
                      "2,2", "--methods", "fdg,fdg", "--epochs", "1", "--budget", "600", *train)
        check(rc == 0 and log.count("resnet20-fdg-K2: test accuracy") == 1, "a cell named twice trains once", log)

        # table: --models, --splits and --methods choose the rows; the peak is the run's largest epoch's.
        rc, table = run("table", "--out", out, "--methods", "fdg", "--splits", "3")
        rows = [l for l in table.splitlines() if l.startswith("| resnet20 ")]
        check(rc == 0 and len(rows) == 1 and rows[0].startswith("| resnet20 | fdg | 3 "), "the rows chosen", table)
        peaks = os.path.join(tmp, "peaks")
        os.makedirs(peaks)
        with open(os.path.join(peaks, "resnet56-bp-K1.jsonl"), "w") as f:
            for epoch, peak in ((1, 300), (2, 500), (3, 400)):
                f.write(json.dumps({"event": "epoch", "epoch": epoch, "test_acc": 0.5, "images_per_s": 1.0,
                                    "peak_allocated_bytes": peak * 2**20}) + "\n")
        with open(os.path.join(peaks, "resnet56-bp-K1.jsonl"), "ab") as f:
            f.write(b'{"event": "epo\xc3')  # a line cut short inside a two-byte character
        os.makedirs(os.path.join(peaks, "resnet56-fdg-K2.jsonl"))  # a folder of that name is no cell
        rc, table = run("table", "--out", peaks)
        rows = [l for l in table.splitlines() if l.startswith("| resnet56 ")]
        check(rc == 0 and len(rows) == 1 and "| 500 |" in rows[0], "the largest epoch's peak, the cut line dropped",
              table)
    print("accuracy_table: all checks passed")


if __name__ == "__main__":
    main()
