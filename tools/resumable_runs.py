#!/usr/bin/env python3
"""Training runs that survive short GPU calls: each run checkpoints every epoch, and a run that a
time budget stopped resumes at its last epoch on the next call, bit for bit as if it had not
stopped. The runs of a call train in one `staleprop sweep`, up to --parallel at once (sharing
the GPU). tools/accuracy_table.py fills its table with it; on its own it runs a file of named
runs:

    tools/resumable_runs.py run --runs bench/runs/resnet20-recipes.txt --out runs/r20 --budget 540 \\
        --parallel 4 -- --device cuda --data data/cifar-10-batches-bin
    tools/resumable_runs.py summary --out runs/r20 > summary.md
    tools/resumable_runs.py unfinished --out runs/r20     # checkpoints of runs still to finish

A runs file has one run per line: a name (letters, digits, '.', '_', '-'), then the arguments
of its `staleprop train` (quoted as in a shell, and giving --epochs); '#' starts a comment line.
Arguments after `--` go to every run. Each run writes NAME.jsonl (metrics), NAME.log and
NAME.cmd (the command) under --out, and NAME.safetensors (its last epoch's checkpoint) under
--state. A run resumes only with the recipe it began with (flags of where files go and how it
reports may change; the flags compare by name and value, in any order); with another, it starts
again, and the records of the epochs it had are moved into --out's replaced/ folder. A sweep
stopped past the budget's grace, or by Ctrl-C, stops its runs as `staleprop train` does on a
signal: plain backprop then keeps the step it was at (a checkpoint inside an epoch, which the
next call resumes from), a pipeline its last epoch. `run` exits 0 where the sweep ended its runs
(finished, or stopped by the budget to resume later) and 1 where it failed: it refused its jobs,
or a run ended in an error (a diverged run among them).
"""
import argparse
import json
import os
import re
import shlex
import struct
import subprocess
import sys


def read_records(path):
    """The records of a metrics file in order (none where it is missing), up to a line cut short
    by a killed run."""
    if not os.path.isfile(path):
        return
    # A line cut short may end inside a character: it is dropped as any other cut line.
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                yield json.loads(line)
            except json.JSONDecodeError:
                return


def read_epochs(path):
    return [event for event in read_records(path) if event.get("event") == "epoch"]


def checkpoint_position(path):
    """(step, steps per epoch) a staleprop checkpoint was written at (its metadata), or None. Plain
    backprop stopped by a signal (the sweep's timeout, Ctrl-C) writes one inside an epoch."""
    try:
        with open(path, "rb") as f:
            n = struct.unpack("<Q", f.read(8))[0]
            meta = json.loads(f.read(n)).get("__metadata__", {})
        step, spe = int(meta["step"]), int(meta["steps_per_epoch"])
        return (step, spe) if spe > 0 else None
    except (OSError, ValueError, KeyError, struct.error):
        return None


def checkpoint_epoch(path):
    """The last epoch a staleprop checkpoint holds whole, or None."""
    pos = checkpoint_position(path)
    return None if pos is None else pos[0] // pos[1]


def keep_records(path, step):
    """Drops the metrics records written after the checkpoint a run resumes from, at global step
    `step`: the epoch and step records past it, and the start records of runs that began there or
    later (the resumed run writes its own). A checkpoint inside an epoch keeps that epoch's step
    records up to it, which the resumed run does not write again."""
    kept = []
    with open(path) as f:
        for line in f:
            try:
                event = json.loads(line)
            except json.JSONDecodeError:
                break
            at = event.get("step", 0)
            if at < step or (at == step and event.get("event") != "start"):
                kept.append(line if line.endswith("\n") else line + "\n")
    with open(path, "w") as f:
        f.writelines(kept)


# Flags that say where a cell's files are and how it reports, not what it trains: they may
# change under a cell that resumes (the others may not).
NOT_RECIPE = ("--metrics", "--log", "--checkpoint", "--data", "--resume", "--threads", "--progress", "--time-limit",
              "--eval-batch-size", "--trace")


def flags_of(words):
    """The words before the first flag, and each flag's last value (None for a switch), as
    staleprop reads them: a flag is `--flag value` (a value never starts with "--") or
    `--flag=value`, and the last of a repeated flag counts."""
    positional, flags = [], {}
    i = 0
    while i < len(words):
        w = words[i]
        if not w.startswith("--"):
            positional.append(w)
            i += 1
            continue
        if "=" in w:
            name, value = w.split("=", 1)
            i += 1
        elif i + 1 < len(words) and not words[i + 1].startswith("--"):
            name, value = w, words[i + 1]
            i += 2
        else:
            name, value = w, None
            i += 1
        flags[name] = value
    return positional, flags


def recipe(words):
    """What a train command (binary first) trains, comparable whatever the order of its flags: its
    words before the first flag and its flags' values (flags_of), the flags of NOT_RECIPE left out."""
    positional, flags = flags_of(words[1:])
    return positional, {k: v for k, v in flags.items() if k not in NOT_RECIPE}


def last_error(log, offset):
    """The last "error: ..." line written to a run's log after its first `offset` bytes, or None."""
    if not os.path.exists(log):
        return None
    with open(log, "rb") as f:
        f.seek(offset)
        lines = f.read().decode(errors="replace").splitlines()
    errors = [l.strip() for l in lines if l.startswith("error: ")]
    return errors[-1] if errors else None


def replace_aside(out, name, paths):
    """Moves a run's files that exist among `paths` into out/replaced/, each name given the first
    free number (NAME.1.jsonl, NAME.1.log, ...); returns that folder."""
    aside = os.path.join(out, "replaced")
    os.makedirs(aside, exist_ok=True)
    n = 1
    while any(os.path.exists(os.path.join(aside, f"{name}.{n}{os.path.splitext(p)[1]}")) for p in paths):
        n += 1
    for p in paths:
        if os.path.exists(p):
            os.replace(p, os.path.join(aside, f"{name}.{n}{os.path.splitext(p)[1]}"))
    return aside


def train_resumable(runs, out, state, staleprop, budget, grace, parallel):
    """Trains the unfinished runs (name, train arguments without the binary, epochs wanted) in one
    `staleprop sweep`, each resuming from the checkpoint of its last finished epoch under `state`.
    Prints what happened to each; returns 0, or 1 where the sweep failed (it refused its jobs, or a
    run ended in an error) rather than ending on time or by its budget."""
    os.makedirs(out, exist_ok=True)
    os.makedirs(state, exist_ok=True)
    jobs, names, wanted = [], [], {}
    for name, args, epochs in runs:
        metrics, log = os.path.join(out, name + ".jsonl"), os.path.join(out, name + ".log")
        ckpt = os.path.join(state, name + ".safetensors")
        done = read_epochs(metrics)
        cmd = ["train"] + list(args) + ["--metrics", metrics, "--log", log, "--progress", "plain", "--checkpoint",
                                        ckpt]
        cmd_file = os.path.join(out, name + ".cmd")
        before = shlex.split(open(cmd_file).read()) if os.path.exists(cmd_file) else None
        same_recipe = before is not None and recipe(before) == recipe([staleprop] + cmd)
        # Finished, with the recipe asked for now: a run of another recipe (or of none recorded)
        # starts again below.
        if same_recipe and done and done[-1]["epoch"] >= epochs:
            print(f"{name}: done ({done[-1]['epoch']} epochs), skipped", flush=True)
            continue
        if budget <= 0:
            print(f"{name}: not started (no budget left)", flush=True)
            continue
        # A run that diverged would diverge again from its last checkpoint: it waits for a new
        # recipe (or the marker's removal) instead of spending every call's budget on it.
        diverged = os.path.join(out, name + ".diverged")
        if os.path.exists(diverged):
            if same_recipe:
                with open(diverged) as f:
                    why = f.readline().strip()
                print(f"{name}: not resumed: it diverged on an earlier call ({why}); change its recipe, or delete "
                      f"{diverged}, to train it again", flush=True)
                continue
            os.remove(diverged)
        if done and not same_recipe:
            # Epochs trained with another recipe (or with none recorded) are not this run's: they
            # are kept aside, not deleted (a changed default, say a shrink factor, would otherwise
            # take a finished run's record without a word).
            aside = replace_aside(out, name, [metrics, log, cmd_file])
            why = "no record of its command" if before is None else "another recipe"
            print(f"{name}: its {done[-1]['epoch']} epochs had {why}: kept in {aside}, starts again", flush=True)
        with open(cmd_file, "w") as f:
            f.write(shlex.join([staleprop] + cmd) + "\n")
        # Resume from the last finished epoch when its metrics are all there and the recipe is the
        # one the run began with; else start over.
        pos = checkpoint_position(ckpt)
        resumed = None if pos is None else pos[0] // pos[1]  # whole epochs in it
        if pos is not None and not same_recipe:
            why = "no record of the command" if before is None else "the recipe differs from the one"
            print(f"{name}: {why} its checkpoint was trained with; starts again", flush=True)
        if same_recipe and pos is not None and pos[0] > 0 and resumed < epochs and [e["epoch"] for e in done][
                :resumed] == list(range(1, resumed + 1)):
            keep_records(metrics, pos[0])
            cmd += ["--resume", ckpt]
            if pos[0] % pos[1]:
                print(f"{name}: resumes at step {pos[0] % pos[1]} of {pos[1]} in epoch {resumed + 1} of {epochs}",
                      flush=True)
            else:
                print(f"{name}: resumes after epoch {resumed} of {epochs}", flush=True)
        else:
            for stale in (metrics, log, ckpt):
                if os.path.exists(stale):
                    os.remove(stale)
        jobs.append(shlex.join(cmd))
        names.append(name)
        wanted[name] = epochs
    if not jobs:
        return 0
    jobs_file = os.path.join(state, "sweep-jobs.txt")
    with open(jobs_file, "w") as f:
        f.write("\n".join(jobs) + "\n")
    sweep = [staleprop, "sweep", "--jobs", jobs_file, "--parallel", str(parallel), "--time-limit", str(budget)]
    print(f"{len(jobs)} runs: {shlex.join(sweep)}", flush=True)
    logs = {name: os.path.join(out, name + ".log") for name in names}
    log_start = {name: os.path.getsize(path) if os.path.exists(path) else 0 for name, path in logs.items()}
    proc = subprocess.Popen(sweep)
    interrupted = False
    try:
        # The sweep ends runs at epoch boundaries inside the budget (and starts none that would not
        # fit an epoch), but a run's first epoch is not cut short: `grace` bounds that overrun.
        rc = proc.wait(timeout=budget + grace)
    except subprocess.TimeoutExpired:
        # SIGTERM stops the runs as Ctrl-C does: plain backprop keeps its last step, a pipeline its
        # last epoch. A sweep still going 15 s later is killed.
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        rc = 124
        print(f"the sweep was stopped {grace:.0f} s past the budget; the runs keep their last step or epoch",
              flush=True)
    except KeyboardInterrupt:
        # The sweep, in the same process group, got the same Ctrl-C and stops its runs, keeping
        # their last step or epoch: wait for it (a second Ctrl-C ends both at once).
        rc = proc.wait()
        interrupted = True
    for name in names:
        epochs = read_epochs(os.path.join(out, name + ".jsonl"))
        if epochs and epochs[-1]["epoch"] >= wanted[name]:
            print(f"{name}: test accuracy {100 * epochs[-1]['test_acc']:.2f}% after {wanted[name]} epochs", flush=True)
        elif epochs:
            print(f"{name}: {epochs[-1]['epoch']} of {wanted[name]} epochs; the next call resumes it", flush=True)
        elif os.path.exists(logs[name]):
            print(f"{name}: no epoch finished (sweep exit {rc}); see {logs[name]}", flush=True)
        else:
            print(f"{name}: no epoch finished (sweep exit {rc}); the run did not start (see the sweep's message "
                  "above)", flush=True)
        error = last_error(logs[name], log_start[name])
        if error:
            print(f"{name}: failed: {error[len('error: '):]}", flush=True)
            if "the run diverged" in error:
                with open(os.path.join(out, name + ".diverged"), "w") as f:
                    f.write(error[len("error: "):] + "\n")
    if interrupted:
        raise KeyboardInterrupt
    return 0 if rc in (0, 124) else 1


def epochs_of(words):
    """The --epochs of a train command (either form; the last one counts, as for staleprop), or None."""
    value = flags_of(words)[1].get("--epochs")
    return None if value is None else int(value)


def read_runs(path):
    """The (name, arguments, epochs) of a runs file."""
    runs, seen = [], set()
    for number, line in enumerate(open(path), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        words = shlex.split(line)
        name, args = words[0], words[1:]
        where = f"{path} line {number}"
        if not re.fullmatch(r"[A-Za-z0-9._-]+", name):
            raise SystemExit(f"{where}: the run's name {name!r} may hold only letters, digits, '.', '_' and '-'")
        if name in seen:
            raise SystemExit(f"{where}: a second run named {name}")
        seen.add(name)
        epochs = epochs_of(args)
        if epochs is None:
            raise SystemExit(f"{where}: {name} gives no --epochs (needed to tell a finished run)")
        runs.append((name, args, epochs))
    if not runs:
        raise SystemExit(f"{path}: no runs")
    return runs


def summary(out):
    """A Markdown line per run under `out`: epochs, last and best test accuracy, img/s."""
    rows = ["| run | epochs | test accuracy % (last) | best | img/s |", "|---|---|---|---|---|"]
    for entry in sorted(os.listdir(out)):
        if not entry.endswith(".jsonl"):
            continue
        name = entry[:-len(".jsonl")]
        epochs = read_epochs(os.path.join(out, entry))
        if not epochs:
            continue
        cmd = os.path.join(out, name + ".cmd")
        wanted = epochs_of(shlex.split(open(cmd).read())) if os.path.exists(cmd) else None
        last = epochs[-1]
        shared = max(e.get("max_concurrent_runs", 1) for e in epochs)
        ips = sum(e["images_per_s"] for e in epochs) / len(epochs)
        rows.append(f"| {name} | {last['epoch']}" + (f" of {wanted}" if wanted and wanted != last["epoch"] else "") +
                    f" | {100 * last['test_acc']:.2f} | {100 * max(e['test_acc'] for e in epochs):.2f} | "
                    f"{ips:,.0f}" + (f" (up to {shared} at once)" if shared > 1 else "") + " |")
    print("\n".join(rows))
    return 0 if len(rows) > 2 else 1


def split_argv(argv):
    """The script's own arguments, and those after `--` (for every staleprop train)."""
    if "--" in argv:
        return argv[:argv.index("--")], argv[argv.index("--") + 1:]
    return argv, []


def at_least_one(text):
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def add_run_options(ap, what):
    """The options of a `run` verb that trains through train_resumable; `what`: "runs" or "cells"."""
    ap.add_argument("--out", required=True, help=f"directory of the {what}' metrics, logs and commands")
    ap.add_argument("--staleprop", default="build/tools/staleprop", help="the staleprop binary (run; default %(default)s)")
    ap.add_argument("--state", help=f"directory of the {what}' checkpoints, to resume from (default: --out)")
    ap.add_argument("--budget", type=float, default=540,
                    help=f"seconds: {what} stop at the last epoch boundary inside it and resume on the next call "
                         "(default %(default)s)")
    ap.add_argument("--grace", type=float, default=30,
                    help=f"seconds past the budget after which the sweep is stopped, as by Ctrl-C (its {what} keep "
                         "their last epoch, or with plain backprop their last step; default %(default)s)")
    ap.add_argument("--parallel", type=at_least_one, default=1,
                    help=f"{what} trained at once in one process (staleprop sweep), sharing the GPU (default %(default)s)")


def unfinished(out, state):
    """Prints the checkpoints under `state` written before their run's last epoch (its .cmd under
    `out` says how many it wants): what a later call would resume from."""
    for f in sorted(os.listdir(state)):
        if not f.endswith(".safetensors"):
            continue
        cmd = os.path.join(out, f[:-len(".safetensors")] + ".cmd")
        wanted = epochs_of(shlex.split(open(cmd).read())) if os.path.exists(cmd) else None
        done = checkpoint_epoch(os.path.join(state, f))
        if done is not None and wanted is not None and done < wanted:
            print(f)
    return 0


def existing_dir(ap, path, what):
    """Refuses, naming it, a directory to read that is not there."""
    if not os.path.isdir(path):
        ap.error(f"{what} {path}: no such directory")
    return path


def main():
    argv, extra = split_argv(sys.argv[1:])
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("verb", choices=["run", "summary", "unfinished"])
    ap.add_argument("--runs", help="the runs file (run)")
    add_run_options(ap, "runs")
    args = ap.parse_args(argv)
    if args.verb == "summary":
        return summary(existing_dir(ap, args.out, "--out"))
    if args.verb == "unfinished":
        return unfinished(args.out, existing_dir(ap, args.state or args.out, "--state" if args.state else "--out"))
    if not args.runs:
        ap.error("run needs --runs FILE")
    runs = [(name, words + extra, epochs_of(words + extra)) for name, words, _ in read_runs(args.runs)]
    return train_resumable(runs, args.out, args.state or args.out, args.staleprop, args.budget, args.grace,
                           args.parallel)


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        sys.exit(130)
