#!/usr/bin/env python3
"""tools/resumable_runs.py end to end on the CPU: usage `test_resumable_runs.py STALEPROP`.

Writes a CIFAR-10 binary set of the official shape, then runs a file of two named ResNet-20
runs on 64 images, two at once, and checks that:
  - the short run finishes and the long one (400 epochs) is stopped by the budget at an epoch
    boundary; the next call skips the first and resumes the second, every epoch recorded once;
  - a plain-backprop run whose checkpoint lies inside an epoch (as a signal leaves it) is
    unfinished, and the next call resumes it at that step, every epoch recorded once;
  - a run that diverged is not trained again until its recipe changes; a finished run is done
    with its recipe (its flags in any order), and trains again with another;
  - a run resumed inside an epoch keeps every step record once, and each run's start record;
  - the summary has a line per run, saying how far the stopped one got, and `unfinished` names
    the stopped run's checkpoint alone;
  - the repository's runs files (bench/runs/) read, and a file with a run without --epochs, a
    name used twice or a name with a slash is refused with the line named.
"""
import json
import os
import shlex
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from tooltest import check, run_script, write_cifar  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.join(HERE, "..", "..")
SCRIPT = os.path.join(ROOT, "tools", "resumable_runs.py")
sys.path.insert(0, os.path.join(ROOT, "tools"))
from resumable_runs import read_runs  # noqa: E402


def run(*args):
    return run_script(SCRIPT, *args)


def epochs(path):
    return [e["epoch"] for e in (json.loads(l) for l in open(path)) if e.get("event") == "epoch"]


def main():
    staleprop = os.path.abspath(sys.argv[1])
    with tempfile.TemporaryDirectory() as tmp:
        data, out = os.path.join(tmp, "data"), os.path.join(tmp, "runs")
        write_cifar(data)
        runs = os.path.join(tmp, "runs.txt")
        with open(runs, "w") as f:
            f.write("# two runs\n"
                    "short --model resnet20 --epochs 1 --batch-size 16\n"
                    "long  --model resnet20 --epochs 400 --batch-size 16 --method fdg --split-at 4 --shrink 0.5\n")
        common = ["--runs", runs, "--out", out, "--staleprop", staleprop, "--budget", "6", "--parallel", "2", "--",
                  "--data", data, "--train-limit", "64", "--test-limit", "64", "--threads", "2"]
        rc, log = run("run", *common)
        check(rc == 0 and "short: test accuracy" in log and "long: " in log and
              "of 400 epochs; the next call resumes it" in log, "the short run ends, the budget stops the long", log)
        first = epochs(os.path.join(out, "long.jsonl"))
        rc, table = run("summary", "--out", out)
        lines = [l for l in table.splitlines() if l.startswith("| long ") or l.startswith("| short ")]
        check(rc == 0 and len(lines) == 2 and f"| long | {first[-1]} of 400 |" in table and "| short | 1 |" in table,
              "a summary line per run", table)
        check("(up to 2 at once)" in table, "img/s marked as shared", table)
        rc, left = run("unfinished", "--out", out)
        check(rc == 0 and left.split() == ["long.safetensors"], "only the stopped run's checkpoint is unfinished", left)

        rc, log = run("run", *common)
        check(rc == 0 and "short: done (1 epochs), skipped" in log and f"long: resumes after epoch {first[-1]} of 400"
              in log, "the next call skips the finished run and resumes the other", log)
        again = epochs(os.path.join(out, "long.jsonl"))
        check(again == list(range(1, len(again) + 1)) and len(again) > len(first), "every epoch once, more of them",
              again)

        # A run stopped inside an epoch (as a signal stops plain backprop) resumes at that step:
        # here the same recipe run on by hand, with a checkpoint 2 steps into the next epoch.
        bp_runs = os.path.join(tmp, "bp-runs.txt")
        with open(bp_runs, "w") as f:
            f.write("mid --model resnet20 --epochs 400 --batch-size 16\n")
        mid_out = os.path.join(tmp, "mid")
        mid_common = ["--runs", bp_runs, "--out", mid_out, "--staleprop", staleprop, "--budget", "6", "--", "--data",
                      data, "--train-limit", "64", "--test-limit", "64", "--threads", "2"]
        rc, log = run("run", *mid_common)
        done = epochs(os.path.join(mid_out, "mid.jsonl"))
        check(rc == 0 and done, "the budget stops the plain-backprop run after some epochs", log)
        words = shlex.split(open(os.path.join(mid_out, "mid.cmd")).read())
        ckpt = words[words.index("--checkpoint") + 1]
        stop = 4 * done[-1] + 2  # 4 steps per epoch
        p = subprocess.run(words + ["--resume", ckpt, "--stop-after", str(stop), "--checkpoint-every", str(stop)],
                           capture_output=True, text=True)
        check(p.returncode == 0, "the run goes on by hand, 2 steps into the next epoch", p.stdout + p.stderr)
        rc, left = run("unfinished", "--out", mid_out)
        check(rc == 0 and left.split() == ["mid.safetensors"], "a checkpoint inside an epoch is unfinished", left)
        rc, log = run("run", *mid_common)
        check(rc == 0 and f"mid: resumes at step 2 of 4 in epoch {done[-1] + 1} of 400" in log,
              "the next call resumes at that step", log)
        after = epochs(os.path.join(mid_out, "mid.jsonl"))
        check(after == list(range(1, len(after) + 1)) and len(after) > len(done), "every epoch once, more of them",
              after)
        # Every step has its record (4 steps an epoch: one each tenth), once: those of the steps
        # before the checkpoint inside the epoch were kept, those written after it dropped.
        records = [json.loads(l) for l in open(os.path.join(mid_out, "mid.jsonl"))]
        steps = [r["step"] for r in records if r["event"] == "step"]
        check(steps == list(range(1, len(steps) + 1)), "every step record once, in order", steps)
        starts = [r["step"] for r in records if r["event"] == "start"]
        check(starts[0] == 0 and stop in starts and starts == sorted(set(starts)),
              f"a start record for each run, at the step it began (the resumed one at {stop})", starts)

        # A run that diverges is not resumed on later calls, until its recipe changes.
        div_runs = os.path.join(tmp, "div-runs.txt")
        div_out = os.path.join(tmp, "div")
        recipe_line = ("boom --model resnet20 --epochs 3 --batch-size 16 --schedule multistep --milestones 0.5 "
                       "--gamma {}\n")
        with open(div_runs, "w") as f:
            f.write(recipe_line.format("1e9"))  # the learning rate explodes in epoch 2
        div_common = ["--runs", div_runs, "--out", div_out, "--staleprop", staleprop, "--budget", "60", "--", "--data",
                      data, "--train-limit", "64", "--test-limit", "64", "--threads", "2"]
        rc, log = run("run", *div_common)
        check(rc == 1 and "boom: failed: " in log and "the run diverged" in log, "the diverging run fails", log)
        rc, log = run("run", *div_common)
        check(rc == 0 and "boom: not resumed: it diverged on an earlier call" in log and "1 runs:" not in log,
              "the next call does not train it again", log)
        with open(div_runs, "w") as f:
            f.write(recipe_line.format("0.1"))
        rc, log = run("run", *div_common)
        check(rc == 0 and "boom: the recipe differs" in log and "boom: test accuracy" in log,
              "with another recipe it trains again, from the start", log)
        # Finished: the same recipe, its flags in another order, is done; another recipe is not.
        with open(div_runs, "w") as f:
            f.write("boom --gamma=0.1 --epochs 3 --milestones 0.5 --model resnet20 --schedule multistep "
                    "--batch-size 16\n")
        rc, log = run("run", *div_common)
        check(rc == 0 and "boom: done (3 epochs), skipped" in log, "a finished run is done whatever its flags' order",
              log)
        with open(div_runs, "w") as f:
            f.write(recipe_line.format("0.2"))
        rc, log = run("run", *div_common)
        check(rc == 0 and "boom: its 3 epochs had another recipe: kept in" in log and "boom: test accuracy" in log,
              "a finished run with another recipe trains again", log)
        aside = os.path.join(div_out, "replaced")
        kept = sorted(f for f in os.listdir(aside) if f.endswith(".jsonl"))
        check(any(epochs(os.path.join(aside, f)) == [1, 2, 3] for f in kept) and
              any(f.endswith(".cmd") and "--gamma 0.1 " in open(os.path.join(aside, f)).read()
                  for f in os.listdir(aside)),
              f"the finished run's records are kept aside: {sorted(os.listdir(aside))}", log)
        rc, table = run("summary", "--out", div_out)
        check(rc == 0 and sum(l.startswith("| boom ") for l in table.splitlines()) == 1,
              "the summary lists the run once, not its replaced records", table)

        for path in ("resnet20-recipes.txt", "long-runs.txt"):
            check(len(read_runs(os.path.join(ROOT, "bench", "runs", path))) >= 2, f"bench/runs/{path} reads")
        for body, complaint in (("a --model resnet20\n", "a gives no --epochs"),
                                ("a --epochs 1\na --epochs 2\n", "line 2: a second run named a"),
                                ("x/y --epochs 1\n", "line 1: the run's name 'x/y'")):
            with open(runs, "w") as f:
                f.write(body)
            rc, log = run("run", *common)
            check(rc != 0 and complaint in log, f"refused: {complaint}", log)
        rc, log = run("run", "--out", out)
        check(rc != 0 and "run needs --runs FILE" in log, "run needs a runs file", log)
        for verb in ("summary", "unfinished"):
            rc, log = run(verb, "--out", os.path.join(tmp, "nowhere"))
            check(rc == 2 and "no such directory" in log and "Traceback" not in log,
                  f"{verb} names a missing directory", log)
    print("resumable_runs: all checks passed")


if __name__ == "__main__":
    main()
