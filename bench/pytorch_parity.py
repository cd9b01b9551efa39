#!/usr/bin/env python3
"""Step-for-step parity of `staleprop train` with PyTorch: the same network, the same initial
weights, the same images and the same recipe must take the same training steps.

The kernel tests check each op against our own CPU reference, and the layer tests check the
network against a composition of those ops; neither can show that the training *semantics* are
PyTorch's: batch norm's momentum and unbiased running variance, where weight decay and Nesterov
momentum enter the update, the label-smoothed loss, option-A and option-B shortcuts, the
classifier's pooling. This script checks them against PyTorch's own modules, loss and
torch.optim.SGD, which is what "He et al.'s recipe" means to most readers.

How:
  1. `staleprop train --lr 0` writes the initial weights (one step that changes no weight; the
     batch norm running statistics it moved are reset here to a fresh run's (0, 1, 0)).
  2. `staleprop train` runs S steps of full-batch training on the first B training images,
     unaugmented, at a constant learning rate, checkpointing after every step (one step per
     epoch), and evaluates the last on the first E test images.
  3. For every step, PyTorch (bench/pytorch_baseline.py's model, on the CPU) loads the state our
     step started from (weights, running statistics, momentum buffers) and takes the same step
     with F.cross_entropy and torch.optim.SGD twice: in float64, the exact step, and in float32.

Free-running fp32 trajectories cannot be compared for long, nor gradients to fp32 rounding: a
pre-activation within rounding of 0 switches a ReLU one way in one implementation and the other
way in the other (batch norm's beta = 0 puts many there), which moves the gradients below it by
about 1e-3 (up to 7e-3 measured, in ours and in PyTorch fp32 alike), and training amplifies that
from step to step. So every step starts from our own state and is compared with the exact step:
  - forward quantities, the step's loss and the running statistics, within --tight (1e-5);
  - each parameter's update (its change over the step, where a wrong rule shows at full size)
    and momentum buffer, within --factor (4) times PyTorch fp32's error or --tolerance (1e-2),
    the larger. Rule errors put in on purpose (--perturb) move them by far more: Nesterov
    flipped 1.2, no label smoothing 0.13, weight decay doubled 0.08
    (bench/results/cpu-amd-epyc-2core/2026-11-26-pytorch-parity.md);
all as the worst tensor's ||ours - exact|| / ||exact||. The final test loss must match the exact
evaluation of our last checkpoint within 10 x --tight. It prints one JSON line per step and a
summary, and exits 1 when a bound fails or the two disagree about any tensor's name or shape.

    python3 bench/pytorch_parity.py --staleprop build-cpu/tools/staleprop --data data/cifar-10-batches-bin
    python3 bench/pytorch_parity.py --model resnet18 --batch-size 32 --steps 3 ...

fp32 only: staleprop's bf16 is not PyTorch's autocast (other ops in bf16, other roundings).
staleprop trains on the CPU, or with --device cuda on our CUDA kernels (not yet run on a GPU);
PyTorch always computes on the CPU. Needs torch and numpy (CPU builds are fine).
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from pytorch_baseline import build  # noqa: E402
from pytorch_cifar_train import read_batches  # noqa: E402
from pytorch_load_checkpoint import MEAN, STD, read_safetensors  # noqa: E402


def load_images(directory, name, n):
    """First n images of a CIFAR-10 binary file, normalised to the bit as staleprop normalises
    them: one float32 multiply-add per value, p * (1 / (255 std)) + (-mean / std)
    (tools/cifar10.cpp, augment_normalize). PyTorch's usual (p / 255 - mean) / std rounds
    differently, which alone moves the first batch norm's running mean by ~1e-6."""
    images, labels = read_batches(directory, [name])
    if len(labels) < n:
        raise SystemExit(f"{os.path.join(directory, name)}: has {len(labels)} records, {n} wanted")
    mean, std = torch.tensor(MEAN, dtype=torch.float32), torch.tensor(STD, dtype=torch.float32)
    scale, bias = (1.0 / (255.0 * std)).view(1, 3, 1, 1), (-mean / std).view(1, 3, 1, 1)
    x = torch.addcmul(bias, torch.tensor(images[:n]).float(), scale)
    return x, torch.tensor(labels[:n])


def rel(a, b):
    """||a - b|| / ||b||, in float64; the absolute norm where b is zero."""
    a, b = a.double(), b.double()
    d, n = float(torch.linalg.vector_norm(a - b)), float(torch.linalg.vector_norm(b))
    return d / n if n > 0 else d


def run(cmd):
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)}\nfailed with status {p.returncode}:\n{p.stdout}{p.stderr}")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--staleprop", default="build/tools/staleprop", help="the staleprop binary")
    ap.add_argument("--data", default=os.environ.get("CIFAR10_DIR", "data/cifar-10-batches-bin"))
    ap.add_argument("--model", default="resnet20")
    ap.add_argument("--device", default="cpu", help="where staleprop trains: cpu or cuda (fp32; default cpu)")
    ap.add_argument("--batch-size", type=int, default=128, help="B: images per step, all of the training set used")
    ap.add_argument("--steps", type=int, default=5, help="S: steps compared (default 5)")
    ap.add_argument("--test-limit", type=int, default=500, help="E: test images evaluated at the end")
    ap.add_argument("--lr", type=float, default=0.1)
    ap.add_argument("--momentum", type=float, default=0.9)
    ap.add_argument("--nesterov", action="store_true")
    ap.add_argument("--weight-decay", type=float, default=5e-4)
    ap.add_argument("--label-smoothing", type=float, default=0.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tight", type=float, default=1e-5,
                    help="bound of the loss and running statistics (10x it: the test loss; default 1e-5)")
    ap.add_argument("--factor", type=float, default=4.0,
                    help="updates and momentum: at most this many times PyTorch fp32's error (default 4) ...")
    ap.add_argument("--tolerance", type=float, default=1e-2, help="... or this, the larger (default 1e-2)")
    ap.add_argument("--perturb", choices=["nesterov", "weight-decay", "label-smoothing"],
                    help="give PyTorch a wrong rule on purpose (Nesterov flipped, weight decay doubled, no label "
                         "smoothing): the check must then fail; shows that it can")
    ap.add_argument("--threads", type=int, default=0, help="CPU threads for both (default: all cores)")
    ap.add_argument("--out", help="append the JSON lines to this file too")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    torch.use_deterministic_algorithms(True)

    lines = []

    def emit(obj):
        s = json.dumps(obj)
        print(s, flush=True)
        lines.append(s)

    with tempfile.TemporaryDirectory(prefix="staleprop-parity-") as tmp:
        common = [a.staleprop, "train", "--data", a.data, "--model", a.model, "--batch-size", str(a.batch_size),
                  "--train-limit", str(a.batch_size), "--test-limit", str(a.test_limit), "--no-augment",
                  "--schedule", "constant", "--seed", str(a.seed), "--progress", "none", "--device", a.device]
        if a.threads:
            common += ["--threads", str(a.threads)]
        run(common + ["--lr", "0", "--epochs", "1", "--checkpoint", os.path.join(tmp, "init.st")])
        recipe = ["--lr", repr(a.lr), "--momentum", repr(a.momentum), "--weight-decay", repr(a.weight_decay),
                  "--label-smoothing", repr(a.label_smoothing)] + (["--nesterov"] if a.nesterov else [])
        metrics = os.path.join(tmp, "metrics.jsonl")
        run(common + recipe + ["--epochs", str(a.steps), "--checkpoint", os.path.join(tmp, "step{epoch}.st"),
                               "--metrics", metrics])
        with open(metrics) as f:
            events = [json.loads(line) for line in f]
        ours_steps = [e for e in events if e["event"] == "step"]
        ours_epochs = [e for e in events if e["event"] == "epoch"]
        if len(ours_steps) != a.steps or len(ours_epochs) != a.steps:
            raise SystemExit(f"{metrics}: {len(ours_steps)} step and {len(ours_epochs)} epoch records, "
                             f"{a.steps} of each expected (one step per epoch)")
        init, _ = read_safetensors(os.path.join(tmp, "init.st"))
        ours = [read_safetensors(os.path.join(tmp, f"step{s}.st"))[0] for s in range(1, a.steps + 1)]

    x, y = load_images(a.data, "data_batch_1.bin", a.batch_size)
    tx, ty = load_images(a.data, "test_batch.bin", a.test_limit)
    fresh = dict(init)  # a fresh run's state: the initial weights, running statistics (0, 1, 0), no momentum
    for k, v in init.items():
        if k.endswith("running_mean") or k.endswith("num_batches_tracked"):
            fresh[k] = torch.zeros_like(v)
        elif k.endswith("running_var"):
            fresh[k] = torch.ones_like(v)
    fresh = {k: v for k, v in fresh.items() if not k.startswith("_optim.")}

    def torch_step(state, dtype):
        """PyTorch's loss and state after one step from `state` (ours, or the fresh one), in dtype."""
        model = build(a.model).to(dtype)
        model.load_state_dict({k: v for k, v in state.items() if not k.startswith("_optim.")}, strict=True)
        opt = torch.optim.SGD(model.parameters(), lr=a.lr, momentum=a.momentum,
                              nesterov=a.nesterov != (a.perturb == "nesterov"),
                              weight_decay=a.weight_decay * (2 if a.perturb == "weight-decay" else 1))
        for n, p in model.named_parameters():
            if "_optim.momentum." + n in state:
                opt.state[p]["momentum_buffer"] = state["_optim.momentum." + n].to(dtype).clone()
        model.train()
        smoothing = 0.0 if a.perturb == "label-smoothing" else a.label_smoothing
        loss = F.cross_entropy(model(x.to(dtype)), y, label_smoothing=smoothing)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        after = {k: v.detach() for k, v in model.state_dict().items()}
        for n, p in model.named_parameters():
            buf = opt.state[p].get("momentum_buffer")  # none with --momentum 0
            if buf is not None:
                after["_optim.momentum." + n] = buf
        return float(loss.detach()), after

    def errors(before, after, exact):
        """Per tensor: relative error against the float64 step, of a parameter's update (its change
        over the step, where a wrong rule shows at full size) and of everything else as it is."""
        out = {}
        for k, e in exact.items():
            if k not in after:
                raise SystemExit(f"{k}: in PyTorch's state, not in our checkpoint")
            if tuple(after[k].shape) != tuple(e.shape):
                raise SystemExit(f"{k}: shape {tuple(after[k].shape)} in ours, {tuple(e.shape)} in PyTorch's")
            if k in params:
                out[k] = rel(after[k].double() - before[k].double(), e - before[k].double())
            else:
                out[k] = rel(after[k], e)
        extra = set(after) - set(exact)
        if a.momentum == 0:  # our checkpoint keeps its (unused) buffers; PyTorch keeps none
            extra = {k for k in extra if not k.startswith("_optim.")}
        if extra:
            raise SystemExit(f"in our checkpoint, not in PyTorch's state: {sorted(extra)}")
        return out

    params = {n for n, _ in build(a.model).named_parameters()}
    group_of = {"update": lambda k: k in params, "momentum": lambda k: k.startswith("_optim."),
                "running_stats": lambda k: "running" in k or "num_batches" in k}
    worst_ratio, ok = 0.0, True
    for s in range(a.steps):
        before = fresh if s == 0 else ours[s - 1]
        loss64, exact = torch_step(before, torch.float64)
        loss32, theirs = torch_step(before, torch.float32)
        e_ours = errors(before, ours[s], exact)
        e_torch = errors(before, theirs, exact)
        step = {"step": s + 1, "loss_ours": ours_steps[s]["loss"], "loss_torch_fp64": loss64,
                "loss_rel_ours": abs(ours_steps[s]["loss"] - loss64) / abs(loss64),
                "loss_rel_torch_fp32": abs(loss32 - loss64) / abs(loss64)}
        groups = [("loss", step["loss_rel_ours"], step["loss_rel_torch_fp32"])]
        for g, member in group_of.items():
            ks = [k for k in exact if member(k)]
            k_ours = max(ks, key=lambda k: e_ours[k])
            k_torch = max(ks, key=lambda k: e_torch[k])
            step[f"{g}_ours"], step[f"{g}_ours_worst"] = e_ours[k_ours], k_ours
            step[f"{g}_torch_fp32"], step[f"{g}_torch_fp32_worst"] = e_torch[k_torch], k_torch
            groups.append((g, e_ours[k_ours], e_torch[k_torch]))
        for g, mine, theirs_err in groups:
            bound = a.tight if g in ("loss", "running_stats") else max(a.factor * theirs_err, a.tolerance)
            worst_ratio = max(worst_ratio, mine / bound)
            if not mine <= bound:
                ok = False
                step.setdefault("failed", []).append(g)
        emit(step)

    final = ours[-1]
    model = build(a.model).double()
    model.load_state_dict({k: v.double() if v.is_floating_point() else v for k, v in final.items()
                           if not k.startswith("_optim.")}, strict=True)
    model.eval()
    with torch.no_grad():
        out = model(tx.double())
    test_loss, test_acc = float(F.cross_entropy(out, ty)), float((out.argmax(1) == ty).double().mean())
    last = ours_epochs[-1]
    test_rel = abs(last["test_loss"] - test_loss) / abs(test_loss)
    if not test_rel <= a.tight * 10:
        ok = False
    emit({"summary": True, "model": a.model, "device": a.device, "batch_size": a.batch_size, "steps": a.steps,
          "lr": a.lr, "momentum": a.momentum, "nesterov": a.nesterov, "weight_decay": a.weight_decay,
          "label_smoothing": a.label_smoothing, "perturb": a.perturb, "test_images": a.test_limit,
          "test_loss_ours": last["test_loss"], "test_loss_torch_fp64": test_loss, "test_loss_rel": test_rel,
          "test_acc_ours": last["test_acc"], "test_acc_torch_fp64": test_acc,
          "worst_error_over_bound": worst_ratio, "tight": a.tight, "factor": a.factor, "tolerance": a.tolerance,
          "torch": torch.__version__, "pass": ok})
    if a.out:
        with open(a.out, "a") as f:
            f.write("\n".join(lines) + "\n")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
