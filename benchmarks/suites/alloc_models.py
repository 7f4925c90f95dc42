"""The real workloads of the allocator benchmark: CPU training steps of a small
GPT-2 (transformers, random weights) and torchvision's ResNet-50 (random
weights), small batch. Also the timing worker, run in a subprocess per
allocator contender (an LD_PRELOADed malloc must be there from the start):

    python -m benchmarks.suites.alloc_models --model gpt2 --steps 10 --warmup 3 [--torch-wsl]

prints one JSON line: {"step_s": [...], ...}.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Callable

import torch

#: Model shapes: small enough for a 2-core CI machine, big enough that
#: activations are MiBs (the sizes where allocators differ).
GPT2 = dict(n_layer=4, n_head=4, n_embd=256, vocab_size=8192, n_positions=256, batch=4, seq=128)
RESNET50 = dict(batch=4, resolution=128, num_classes=100)


def make_step(model: str) -> Callable[[], float]:
    """A closure running one training step (forward, backward, AdamW/SGD update); returns the loss."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    if model == "gpt2":
        import transformers

        cfg = {k: v for k, v in GPT2.items() if k not in ("batch", "seq")}
        net = transformers.GPT2LMHeadModel(transformers.GPT2Config(**cfg))
        ids = torch.randint(0, GPT2["vocab_size"], (GPT2["batch"], GPT2["seq"]), generator=g)
        opt = torch.optim.AdamW(net.parameters(), lr=1e-4)

        def step() -> float:
            loss = net(input_ids=ids, labels=ids).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            return loss.item()

        return step
    if model == "resnet50":
        import torchvision

        net = torchvision.models.resnet50(num_classes=RESNET50["num_classes"])
        r = RESNET50["resolution"]
        x = torch.randn(RESNET50["batch"], 3, r, r, generator=g)
        y = torch.randint(0, RESNET50["num_classes"], (RESNET50["batch"],), generator=g)
        opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)

        def step() -> float:
            loss = torch.nn.functional.cross_entropy(net(x), y)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            return loss.item()

        return step
    raise ValueError(f"unknown model {model!r}")


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--model", required=True, choices=["gpt2", "resnet50"])
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--torch-wsl", action="store_true", help="torch_wsl.memory.enable('cpu') first")
    args = p.parse_args(argv)
    if args.torch_wsl:
        import torch_wsl.memory

        torch_wsl.memory.enable("cpu")
    step = make_step(args.model)
    for _ in range(args.warmup):
        step()
    times = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    out = {"step_s": times, "threads": torch.get_num_threads()}
    if args.torch_wsl:
        import torch_wsl.memory

        s = torch_wsl.memory.stats("cpu")
        out["backend_calls"] = s["num_device_alloc"] + s["num_device_free"]
        out["reserved_peak"] = s["reserved_bytes.all.peak"]
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
