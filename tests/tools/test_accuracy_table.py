#!/usr/bin/env python3
"""tools/accuracy_table.py end to end on the CPU: usage `test_accuracy_table.py STALEPROP`.

Writes a CIFAR-10 binary set of the official shape (5 training files and a test file of
10,000 records; labels 0-9, flat images), runs the table's cells for ResNet-20 at K = 1, 2, 3
with bp, ddg and fdg on 64 images for one epoch, and checks that:
  - each cell ran once: bp at K = 1 only, ddg and fdg at K = 2 and 3 with FDG's cuts and the
    shrink factor;
  - a second run skips the finished cells, a cell cut short runs again, and no cell starts
    when the budget is spent;
  - the Markdown table has one row per cell with its busy shares and FDG's published figure
    only where one exists.
"""
import json
import os
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
SCRIPT = os.path.join(HERE, "..", "..", "tools", "accuracy_table.py")


def write_cifar(directory):
    os.makedirs(directory)
    records = [bytes([label]) + bytes([(17 * label) % 256]) * 3072 for label in range(10)]
    batch = b"".join(records[i % 10] for i in range(10000))
    for name in [f"data_batch_{i}.bin" for i in range(1, 6)] + ["test_batch.bin"]:
        with open(os.path.join(directory, name), "wb") as f:
            f.write(batch)


def run(*args):
    p = subprocess.run([sys.executable, SCRIPT, *args], capture_output=True, text=True)
    return p.returncode, p.stdout + p.stderr


def check(cond, what, output=""):
    if not cond:
        print(f"FAILED: {what}\n{output}")
        sys.exit(1)


def main():
    staleprop = os.path.abspath(sys.argv[1])
    with tempfile.TemporaryDirectory() as tmp:
        data, out = os.path.join(tmp, "data"), os.path.join(tmp, "runs")
        write_cifar(data)
        common = ["--staleprop", staleprop, "--out", out, "--models", "resnet20", "--splits", "1,2,3", "--methods",
                  "bp,ddg,fdg", "--epochs", "1", "--shrink", "0.5"]
        train = ["--", "--data", data, "--train-limit", "64", "--test-limit", "64", "--batch-size", "16",
                 "--threads", "2"]
        rc, log = run("run", *common, "--budget", "600", *train)
        check(rc == 0, "the first run succeeds", log)
        cells = sorted(f[:-6] for f in os.listdir(out) if f.endswith(".jsonl"))
        check(cells == ["resnet20-bp-K1", "resnet20-ddg-K2", "resnet20-ddg-K3", "resnet20-fdg-K2", "resnet20-fdg-K3"],
              f"the cells run: {cells}", log)
        cmd = open(os.path.join(out, "resnet20-fdg-K2.cmd")).read()
        check("--method fdg --split 2" in cmd and "--split-at fdg --shrink 0.5" in cmd, "the K = 2 command", cmd)
        check("--split-at" not in open(os.path.join(out, "resnet20-bp-K1.cmd")).read(), "K = 1 has no cut")

        rc, log = run("run", *common, "--budget", "600", *train)
        check(rc == 0 and log.count("skipped") == 5, "a second run skips every finished cell", log)

        # A cell cut short (its metrics end early) runs again; the others stay as they are.
        path = os.path.join(out, "resnet20-ddg-K3.jsonl")
        lines = open(path).read().splitlines()
        with open(path, "w") as f:
            f.write("\n".join(l for l in lines if json.loads(l).get("event") != "epoch") + "\n")
        rc, log = run("run", *common, "--budget", "600", *train)
        check(rc == 0 and log.count("skipped") == 4 and "resnet20-ddg-K3: test accuracy" in log,
              "only the incomplete cell runs again", log)

        rc, log = run("run", *common[:3], os.path.join(tmp, "empty"), *common[4:], "--budget", "0", *train)
        check(rc == 0 and log.count("not started") == 5, "no cell starts without budget", log)

        rc, table = run("table", "--out", out)
        check(rc == 0, "the table is made", table)
        rows = [l for l in table.splitlines() if l.startswith("| resnet20 ")]
        check(len(rows) == 5, "one row per cell", table)
        fdg = [r for r in rows if r.startswith("| resnet20 | fdg | 2 | 1 |")]
        check(len(fdg) == 1, "the fdg K = 2 row", table)
        cols = [c.strip() for c in fdg[0].strip("|").split("|")]
        check(len(cols) == 10 and cols[7].count("/") == 1, "busy shares of both modules", fdg[0])
        check(0 <= float(cols[4]) <= 100 and cols[9] == "–", "an error in % and no published figure", fdg[0])
        rc, _ = run("table", "--out", os.path.join(tmp, "empty"))
        check(rc != 0, "an empty directory is no table")
    print("accuracy_table: all checks passed")


if __name__ == "__main__":
    main()
