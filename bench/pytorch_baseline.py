#!/usr/bin/env python3
"""Training-throughput baseline: the same CIFAR ResNets in PyTorch eager mode.

A measuring stick for `staleprop train`, run on the same GPU in the same session; nothing in
the engine depends on it. It builds the model staleprop builds (CIFAR ResNet-20..110 with
option-A shortcuts, or the CIFAR ResNet-18), trains it with SGD (momentum 0.9, weight decay
5e-4) on random CIFAR-shaped batches resident on the GPU, and reports images/s timed with
CUDA events after a warm-up, plus peak GPU memory. JSON on stdout, one object per run.
With --device cpu it runs on the CPU instead (fp32, timed with the host clock, --threads
threads), beside `staleprop bench --device cpu`.

    python3 bench/pytorch_baseline.py --model resnet56 --batch-size 128
    python3 bench/pytorch_baseline.py --model resnet18 --batch-size 512 --channels-last --bf16
    python3 bench/pytorch_baseline.py --device cpu --threads 2 --model resnet20 --steps 8 --warmup 2
"""
import argparse
import json
import platform
import time

import torch
import torch.nn as nn
import torch.nn.functional as F


class BasicBlock(nn.Module):
    def __init__(self, cin, cout, stride, option):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.option = option
        self.pad = (cout - cin) // 2
        self.stride = stride
        self.shortcut = None
        if (stride != 1 or cin != cout) and option == "B":
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
        self.reshape = stride != 1 or cin != cout

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if not self.reshape:
            sc = x
        elif self.shortcut is not None:
            sc = self.shortcut(x)
        else:  # option A: subsample and zero-pad channels
            sc = F.pad(x[:, :, :: self.stride, :: self.stride], (0, 0, 0, 0, self.pad, self.pad))
        return F.relu(out + sc)


class ResNet(nn.Module):
    def __init__(self, widths, blocks, option, classes=10):
        super().__init__()
        self.conv1 = nn.Conv2d(3, widths[0], 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        # Stages named layer1, layer2, ... as staleprop's checkpoints (and the common PyTorch CIFAR
        # ResNets) name them, so `load_state_dict` takes a staleprop checkpoint as it is.
        self.stages, cin = len(widths), widths[0]
        for i, (w, n) in enumerate(zip(widths, blocks)):
            stage = []
            for b in range(n):
                stage.append(BasicBlock(cin, w, 2 if i > 0 and b == 0 else 1, option))
                cin = w
            setattr(self, f"layer{i + 1}", nn.Sequential(*stage))
        self.linear = nn.Linear(cin, classes)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        for i in range(self.stages):
            x = getattr(self, f"layer{i + 1}")(x)
        return self.linear(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def build(name, init="staleprop"):
    """The model; init="staleprop" initialises it as staleprop does (layers/layers.cpp, He et al.
    2015): convolution and linear weights normal with std sqrt(2 / fan_in), biases 0, batch norm
    gamma 1 and beta 0. init="pytorch" keeps PyTorch's defaults (uniform weights with std
    1 / sqrt(3 fan_in), uniform linear bias), which start with smaller logits."""
    if name == "resnet18":
        model = ResNet([64, 128, 256, 512], [2, 2, 2, 2], "B")
    elif name in ("resnet20", "resnet32", "resnet44", "resnet56", "resnet110"):
        n = (int(name.removeprefix("resnet")) - 2) // 6
        model = ResNet([16, 32, 64], [n, n, n], "A")
    else:  # as staleprop's models (layers/resnet.h)
        raise ValueError(f"model {name!r}: resnet18, or the CIFAR resnet20, 32, 44, 56 or 110")
    if init == "staleprop":
        for m in model.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
    elif init != "pytorch":
        raise ValueError(f"init {init!r}: staleprop or pytorch")
    return model


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="resnet56")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--steps", type=int, default=200, help="timed steps (default 200)")
    ap.add_argument("--warmup", type=int, default=30, help="untimed steps first (default 30)")
    ap.add_argument("--channels-last", action="store_true", help="NHWC memory format")
    ap.add_argument("--bf16", action="store_true", help="autocast to bfloat16")
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda", help="where to train (default cuda)")
    ap.add_argument("--threads", type=int, default=0, help="CPU threads (default: PyTorch's choice)")
    ap.add_argument("--tf32", action="store_true",
                    help="let cuDNN/cuBLAS use TF32 for fp32 (PyTorch's cuDNN default); off by default so fp32 "
                         "means fp32, as in staleprop")
    args = ap.parse_args()

    cuda = args.device == "cuda"
    if cuda and not torch.cuda.is_available():
        ap.error("no GPU: CUDA is not available to this PyTorch (--device cpu runs on the CPU)")
    if not cuda and args.bf16:
        ap.error("--bf16 is the GPU's autocast; the CPU baseline is fp32")
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    dev = torch.device(args.device)
    # cuDNN's autotuner, the usual eager practice (its choice is made in the warm-up steps); the
    # JSON records it.
    torch.backends.cudnn.benchmark = True
    torch.backends.cudnn.allow_tf32 = args.tf32
    torch.backends.cuda.matmul.allow_tf32 = args.tf32
    model = build(args.model).to(dev)
    fmt = torch.channels_last if args.channels_last else torch.contiguous_format
    model = model.to(memory_format=fmt)
    # The optimizer staleprop bench steps (tools/bench.cpp): SGD, momentum 0.9, weight decay 5e-4,
    # learning rate 0.01 (the rate changes no work).
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    # A pool of random batches on the GPU, rotated so no step sees the same input twice in a row.
    pool = [torch.randn(args.batch_size, 3, 32, 32, device=dev).to(memory_format=fmt) for _ in range(4)]
    labels = [torch.randint(0, 10, (args.batch_size,), device=dev) for _ in range(4)]

    def step(i):
        # The gradients go before the forward, so the last step's are not held through it (they
        # would add a copy of the parameters to the peak memory compared).
        opt.zero_grad(set_to_none=True)
        with torch.autocast(args.device, dtype=torch.bfloat16, enabled=args.bf16):
            loss = F.cross_entropy(model(pool[i % 4]), labels[i % 4])
        loss.backward()
        opt.step()

    for i in range(args.warmup):
        step(i)
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
    else:
        t0 = time.perf_counter()
    for i in range(args.steps):
        step(i)
    if cuda:
        stop.record()
        torch.cuda.synchronize()
        ms = start.elapsed_time(stop)
    else:
        ms = (time.perf_counter() - t0) * 1e3
    print(json.dumps({
        "framework": "pytorch-eager", "torch": torch.__version__,
        "device": torch.cuda.get_device_name() if cuda else "cpu " + (platform.processor() or platform.machine()),
        "threads": None if cuda else torch.get_num_threads(),
        "model": args.model, "batch_size": args.batch_size, "channels_last": args.channels_last,
        "bf16": args.bf16, "tf32": args.tf32, "cudnn_benchmark": cuda, "steps": args.steps, "warmup": args.warmup,
        "images_per_s": args.steps * args.batch_size / (ms / 1e3),
        "peak_memory_bytes": torch.cuda.max_memory_allocated() if cuda else None, "date": time.strftime("%Y-%m-%d"),
    }))


if __name__ == "__main__":
    main()
