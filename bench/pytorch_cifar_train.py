#!/usr/bin/env python3
"""Accuracy baseline: train the same CIFAR ResNet in PyTorch on the same files (eager mode;
--compile for torch.compile with CUDA graphs, which has not been run on a GPU yet).

A measuring stick for `staleprop train`'s test accuracy, not part of the engine. It reads the
CIFAR-10 binary files staleprop reads (the first --train-limit / --test-limit images, as
staleprop's flags of those names), normalises with staleprop's per-channel constants
(tools/cifar10.h), augments by a random 32x32 crop of the
image zero-padded by 4 (black, before normalising) and a horizontal flip (and --cutout's square,
zeroed after normalising), reshuffles every
epoch, and trains with SGD and staleprop's learning-rate schedules (per step: linear warm-up,
then constant, multistep at fractions of the run, cosine, or onecycle's linear decay). The
model is bench/pytorch_baseline.py's, initialised as staleprop initialises its own (--init
pytorch: PyTorch's defaults). The dataset lives on the device (--device: the GPU where
there is one, else the CPU). One JSON line per epoch:

    python3 bench/pytorch_cifar_train.py --model resnet20 --epochs 30 --schedule cosine --bf16
    python3 bench/pytorch_cifar_train.py --device cpu --epochs 4 --train-limit 20000   # quickstart-sized
"""
import argparse
import json
import math
import os
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from pytorch_baseline import build  # noqa: E402
from pytorch_load_checkpoint import MEAN, STD  # noqa: E402


def read_batches(directory, names):
    raw = b"".join(open(os.path.join(directory, n), "rb").read() for n in names)
    rec = np.frombuffer(raw, dtype=np.uint8).reshape(-1, 3073)
    labels = rec[:, 0].astype(np.int64)
    if labels.max() > 9:
        raise SystemExit(f"label {labels.max()} outside 0-9 in {directory}")
    return rec[:, 1:].reshape(-1, 3, 32, 32), labels


def round_half_up(x):
    """std::llround for x >= 0, as staleprop rounds warm-up and milestone steps (Python's round()
    rounds halves to even: 78.5 -> 78, where staleprop takes 79)."""
    return math.floor(x + 0.5)


def lr_at(step, a, total, warmup):
    if warmup > 0 and step < warmup:
        return a.lr * (step + 1) / warmup
    t = min(1.0, (step - warmup) / max(1, total - warmup))
    if a.schedule == "constant":
        return a.lr
    if a.schedule == "multistep":
        return a.lr * a.gamma ** sum(step >= round_half_up(f * total) for f in a.milestones)
    if a.schedule == "cosine":
        return a.lr * 0.5 * (1 + math.cos(math.pi * t))
    return a.lr * (1 - t)  # onecycle


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="resnet20")
    ap.add_argument("--data", default=os.environ.get("CIFAR10_DIR", "data/cifar-10-batches-bin"))
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--lr", type=float, default=0.1)
    ap.add_argument("--momentum", type=float, default=0.9)
    ap.add_argument("--nesterov", action="store_true")
    ap.add_argument("--weight-decay", type=float, default=5e-4)
    ap.add_argument("--schedule", default="multistep", choices=["constant", "multistep", "cosine", "onecycle"])
    ap.add_argument("--milestones", type=lambda s: [float(f) for f in s.split(",")], default=[0.5, 0.75])
    ap.add_argument("--gamma", type=float, default=0.1)
    ap.add_argument("--warmup-epochs", type=float, default=0)
    ap.add_argument("--bf16", action="store_true", help="autocast to bfloat16")
    ap.add_argument("--channels-last", action="store_true")
    ap.add_argument("--compile", action="store_true",
                    help="torch.compile(mode='reduce-overhead'): CUDA graphs, so a long run is not launch-bound")
    ap.add_argument("--cutout", type=int, default=0,
                    help="zero a square of this side centred on a random pixel after normalising (as staleprop)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--init", default="staleprop", choices=["staleprop", "pytorch"],
                    help="staleprop: He et al.'s normal init, as staleprop's layers (default); pytorch: PyTorch's own")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                    help="cuda or cpu (default: cuda where there is a GPU)")
    ap.add_argument("--train-limit", type=int, default=0, help="use only the first N training images (default all)")
    ap.add_argument("--test-limit", type=int, default=0, help="evaluate on the first N test images (default all)")
    ap.add_argument("--threads", type=int, default=0, help="CPU threads (default: PyTorch's)")
    ap.add_argument("--metrics", help="append the JSON lines to this file too")
    a = ap.parse_args()
    if not 0 <= a.cutout <= 32:
        ap.error("--cutout must be in 0..32")

    torch.manual_seed(a.seed)
    dev = torch.device(a.device)
    if a.bf16 and dev.type != "cuda":
        ap.error("--bf16 is the GPU's autocast; on the CPU train in fp32")
    if a.threads:
        torch.set_num_threads(a.threads)
    torch.backends.cudnn.benchmark = True
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    xtr, ytr = read_batches(a.data, [f"data_batch_{i}.bin" for i in range(1, 6)])
    xte, yte = read_batches(a.data, ["test_batch.bin"])
    if a.train_limit:
        xtr, ytr = xtr[:a.train_limit], ytr[:a.train_limit]
    if a.test_limit:
        xte, yte = xte[:a.test_limit], yte[:a.test_limit]
    mean = torch.tensor(MEAN, dtype=torch.float32, device=dev).view(1, 3, 1, 1)
    std = torch.tensor(STD, dtype=torch.float32, device=dev).view(1, 3, 1, 1)
    xtr, ytr = torch.from_numpy(xtr.copy()).to(dev), torch.from_numpy(ytr).to(dev)
    xte, yte = torch.from_numpy(xte.copy()).to(dev), torch.from_numpy(yte).to(dev)
    fmt = torch.channels_last if a.channels_last else torch.contiguous_format

    def prep(x):
        return ((x.float() / 255.0 - mean) / std).contiguous(memory_format=fmt)

    ar = torch.arange(32, device=dev)

    def augment(x):  # x: uint8 [B,3,32,32]
        b = x.shape[0]
        xp = F.pad(x, (4, 4, 4, 4))
        oy = torch.randint(0, 9, (b,), device=dev)
        ox = torch.randint(0, 9, (b,), device=dev)
        iy = (oy[:, None] + ar)[:, None, :, None]
        ix = (ox[:, None] + ar)[:, None, None, :]
        out = xp[torch.arange(b, device=dev)[:, None, None, None], torch.arange(3, device=dev)[None, :, None, None],
                 iy, ix]
        flip = torch.rand(b, device=dev) < 0.5
        return torch.where(flip[:, None, None, None], out.flip(3), out)

    def cutout(x, side):  # x: normalised [B,3,32,32]; rows/cols c - side // 2 .. c - side // 2 + side - 1
        b = x.shape[0]
        cy = torch.randint(0, 32, (b,), device=dev)[:, None]
        cx = torch.randint(0, 32, (b,), device=dev)[:, None]
        ry = (ar[None, :] >= cy - side // 2) & (ar[None, :] < cy - side // 2 + side)
        rx = (ar[None, :] >= cx - side // 2) & (ar[None, :] < cx - side // 2 + side)
        return x.masked_fill((ry[:, :, None] & rx[:, None, :])[:, None], 0.0)

    model = build(a.model, a.init).to(dev).to(memory_format=fmt)
    net = torch.compile(model, mode="reduce-overhead") if a.compile else model
    opt = torch.optim.SGD(model.parameters(), lr=a.lr, momentum=a.momentum, nesterov=a.nesterov,
                          weight_decay=a.weight_decay)
    n = xtr.shape[0]
    steps_per_epoch = n // a.batch_size + (n % a.batch_size != 0)
    total = steps_per_epoch * a.epochs
    warmup = round_half_up(a.warmup_epochs * steps_per_epoch)
    step, t0 = 0, time.time()
    out = open(a.metrics, "a") if a.metrics else None
    for epoch in range(1, a.epochs + 1):
        model.train()
        perm = torch.randperm(n, device=dev)
        loss_sum = torch.zeros((), device=dev)
        correct = torch.zeros((), device=dev, dtype=torch.int64)
        for i in range(steps_per_epoch):
            idx = perm[i * a.batch_size:(i + 1) * a.batch_size]
            x, y = prep(augment(xtr[idx])), ytr[idx]
            if a.cutout > 0:
                x = cutout(x, a.cutout)
            for g in opt.param_groups:
                g["lr"] = lr_at(step, a, total, warmup)
            with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=a.bf16):
                if a.compile:
                    torch.compiler.cudagraph_mark_step_begin()
                logits = net(x)
                loss = F.cross_entropy(logits.float(), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            loss_sum += loss.detach() * y.shape[0]
            correct += (logits.argmax(1) == y).sum()
            step += 1
        model.eval()
        test_correct, test_loss = 0, 0.0
        with torch.no_grad(), torch.autocast(dev.type, dtype=torch.bfloat16, enabled=a.bf16):
            for i in range(0, xte.shape[0], 500):
                logits = net(prep(xte[i:i + 500])).float()
                test_loss += F.cross_entropy(logits, yte[i:i + 500], reduction="sum").item()
                test_correct += (logits.argmax(1) == yte[i:i + 500]).sum().item()
        line = json.dumps({
            "framework": "pytorch-compiled" if a.compile else "pytorch-eager", "torch": torch.__version__,
            "model": a.model, "bf16": a.bf16, "device": str(dev), "seed": a.seed, "init": a.init,
            "event": "epoch", "epoch": epoch, "step": step, "loss": loss_sum.item() / n,
            "train_acc": correct.item() / n, "test_loss": test_loss / xte.shape[0],
            "test_acc": test_correct / xte.shape[0], "lr": lr_at(step - 1, a, total, warmup),
            "elapsed_s": time.time() - t0})
        print(line, flush=True)
        if out:
            out.write(line + "\n")
            out.flush()


if __name__ == "__main__":
    main()
