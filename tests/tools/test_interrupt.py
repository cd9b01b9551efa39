#!/usr/bin/env python3
"""SIGINT and SIGTERM on `staleprop train` and `staleprop sweep`: usage `test_interrupt.py STALEPROP`.

On a CIFAR-10 set of the official shape (ResNet-20, 320 images in batches of 16), checks that:
  - SIGINT during plain backprop ends the run after its step, with a checkpoint of that step
    and the command to go on, and then ends the process by SIGINT; --resume finishes the run;
  - SIGTERM (what `timeout` sends) does the same and ends the process by SIGTERM;
  - a second SIGINT, after the first was taken, ends the process at once, keeping nothing;
  - SIGINT on a sweep ends its running run the same way and starts no other.
Where the run stops depends on when the signal lands, so the checks compare the checkpoint with
what the run says, not with a fixed step.
"""
import json
import os
import re
import signal
import struct
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from tooltest import check, write_cifar  # noqa: E402

STEPS = 20  # per epoch: 320 images in batches of 16


def start(cmd):
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def read_until(p, seen, pred):
    for line in p.stdout:
        seen.append(line)
        if pred(line):
            return True
    return False


def interrupt(p, sig, twice=False):
    """Sends sig once p has printed a training step's progress line (with twice: sends it again
    once p has said it is stopping); returns (exit status, all output)."""
    seen = []
    if read_until(p, seen, lambda l: l.startswith("epoch ") and " step " in l):
        p.send_signal(sig)
        if twice and read_until(p, seen, lambda l: "stopping early" in l):
            p.send_signal(sig)
    seen.append(p.stdout.read())
    return p.wait(), "".join(seen)


def checkpoint_step(path):
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        return int(json.loads(f.read(n))["__metadata__"]["step"])


def stopped_step(out):
    """The global step the run said it stopped at."""
    m = re.search(r"interrupted in epoch (\d+) after step (\d+) of (\d+)", out)
    if m:
        return (int(m.group(1)) - 1) * int(m.group(3)) + int(m.group(2))
    m = re.search(r"interrupted after epoch (\d+) of", out)
    return int(m.group(1)) * STEPS if m else None


def main():
    staleprop = os.path.abspath(sys.argv[1])
    with tempfile.TemporaryDirectory() as tmp:
        data = os.path.join(tmp, "data")
        write_cifar(data)
        # Many epochs, so that a slow machine still signals the run well before its end.
        common = ["--data", data, "--train-limit", "320", "--test-limit", "64", "--batch-size", "16", "--epochs",
                  "10", "--progress", "plain", "--threads", "2"]
        ckpt = os.path.join(tmp, "run.safetensors")
        train = [staleprop, "train", *common, "--checkpoint", ckpt]

        rc, out = interrupt(start(train), signal.SIGINT)
        check(rc == -signal.SIGINT, f"SIGINT: the process ends by SIGINT (status {rc})", out)
        step = stopped_step(out)
        check(step is not None and f"go on with --resume {ckpt}" in out,
              "SIGINT: says where it stopped and how to go on", out)
        check(checkpoint_step(ckpt) == step, f"SIGINT: the checkpoint holds step {step}, where the run stopped", out)
        p = subprocess.run(train + ["--resume", ckpt], capture_output=True, text=True)
        check(p.returncode == 0 and "final test accuracy" in p.stdout and checkpoint_step(ckpt) == 10 * STEPS,
              "the interrupted run resumes to its end", p.stdout + p.stderr)

        os.remove(ckpt)
        rc, out = interrupt(start(train), signal.SIGTERM)
        step = stopped_step(out)
        check(rc == -signal.SIGTERM and step is not None and checkpoint_step(ckpt) == step,
              f"SIGTERM: ends by SIGTERM ({rc}) after a checkpoint of the step it stopped at ({step})", out)

        # Steps of 128 images (about 0.3 s here): the second signal arrives inside the step. If the
        # run still stopped on its own first (a stalled reader here, or a fast machine), that is
        # the race lost, not the second signal ignored: try again with longer steps. An ignored
        # second signal loses every time.
        for batch in ("128", "256", "512"):
            slow = list(common)
            slow[slow.index("--batch-size") + 1] = batch
            slow[slow.index("--train-limit") + 1] = str(20 * int(batch))
            slow_ckpt = os.path.join(tmp, f"slow-{batch}.safetensors")
            rc, out = interrupt(start([staleprop, "train", *slow, "--checkpoint", slow_ckpt]), signal.SIGINT,
                                twice=True)
            if not re.search(r"interrupted (in|after) epoch", out):
                break
        check(rc == -signal.SIGINT and "interrupted" not in out.replace("stopping early", ""),
              f"a second SIGINT ends the process at once, before the run stops on its own (status {rc})", out)
        left = [f for f in os.listdir(tmp) if f.startswith(f"slow-{batch}")]
        check(not left, f"a second SIGINT keeps nothing: no checkpoint, nor a part of one: {left}", out)

        jobs = os.path.join(tmp, "jobs.txt")
        with open(jobs, "w") as f:
            for name in ("a", "b"):
                f.write(" ".join(common + ["--checkpoint", os.path.join(tmp, f"sweep-{name}.safetensors")]) + "\n")
        rc, out = interrupt(start([staleprop, "sweep", "--jobs", jobs]), signal.SIGINT)
        check(rc == -signal.SIGINT and "1 interrupted" in out and "not started: the sweep was interrupted" in out,
              f"SIGINT on a sweep: the running run stops, the other does not start (status {rc})", out)
        check(os.path.exists(os.path.join(tmp, "sweep-a.safetensors")) and
              not os.path.exists(os.path.join(tmp, "sweep-b.safetensors")), "only the first run wrote a checkpoint",
              out)
    print("interrupt: all checks passed")


if __name__ == "__main__":
    main()
