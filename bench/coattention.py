"""Benchmark: the co-attention core (SDPA) against a per-head Python loop of matmul, softmax, matmul.

Both directions of ViLBERT co-attention (regions query tokens, tokens query regions), forward + backward, at
batch 32, 37 regions (36 + the global one), 36 tokens, hidden 768, 12 heads; key-padding masks on both sides.
Also the whole Co-TRM block with either core. Prints the ratios (reference time / our time, median of several
repeats), the attention-core ratio last, and writes ``bench/results/coattention.json``.

    python bench/coattention.py [--device cpu|cuda] [--repeats 20] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any
from unittest import mock

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from model import coattention

GOAL = 1.5  # the attention-core ratio the design asks for
TOLERANCE = 1e-5
PARAMETERS = dict(batch=32, regions=37, tokens=36, hidden=768, heads=12, intermediate=3072)


def reference_core(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_mask: torch.Tensor, dropout_p: float = 0.0
) -> torch.Tensor:
    """Per-head loop: ``softmax(q_h k_h^T / sqrt(d_h) + mask) v_h`` with explicit matmuls; same shapes as ours."""
    assert dropout_p == 0.0
    scale = 1.0 / math.sqrt(q.shape[-1])
    blocked = ~key_mask[:, None, :]  # (B, 1, T_k)
    outputs = []
    for h in range(q.shape[1]):
        scores = torch.matmul(q[:, h], k[:, h].transpose(-1, -2)) * scale  # (B, T_q, T_k)
        weights = torch.softmax(scores.masked_fill(blocked, float("-inf")), dim=-1)
        outputs.append(torch.matmul(weights, v[:, h]))  # (B, T_q, d_h)
    return torch.stack(outputs, dim=1)  # (B, heads, T_q, d_h)


def make_inputs(device: torch.device) -> dict[str, torch.Tensor]:
    """Random projected Q/K/V per direction, masks with padded tokens and regions, upstream grads (seeded)."""
    p = PARAMETERS
    g = torch.Generator().manual_seed(0)
    b, h, d_h = p["batch"], p["heads"], p["hidden"] // p["heads"]

    def qkv(t: int) -> torch.Tensor:
        return torch.randn(b, h, t, d_h, generator=g).to(device)

    token_len = torch.randint(8, p["tokens"] + 1, (b,), generator=g)
    region_len = torch.randint(11, p["regions"] + 1, (b,), generator=g)
    token_mask = torch.arange(p["tokens"])[None] < token_len[:, None]
    region_mask = torch.arange(p["regions"])[None] < region_len[:, None]
    return dict(
        q_v=qkv(p["regions"]), k_t=qkv(p["tokens"]), v_t=qkv(p["tokens"]),  # regions query tokens
        q_t=qkv(p["tokens"]), k_v=qkv(p["regions"]), v_v=qkv(p["regions"]),  # tokens query regions
        token_mask=token_mask.to(device), region_mask=region_mask.to(device),
        grad_visual=qkv(p["regions"]), grad_text=qkv(p["tokens"]),  # upstream gradients for backward
    )  # fmt: skip


def core_step(core: Callable, x: dict[str, torch.Tensor]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Both directions forward + backward; returns (outputs, input gradients)."""
    leaves = {name: x[name].detach().requires_grad_() for name in ("q_v", "k_t", "v_t", "q_t", "k_v", "v_v")}
    visual = core(leaves["q_v"], leaves["k_t"], leaves["v_t"], x["token_mask"])
    text = core(leaves["q_t"], leaves["k_v"], leaves["v_v"], x["region_mask"])
    torch.autograd.backward([visual, text], [x["grad_visual"], x["grad_text"]])
    grads = [leaf.grad for leaf in leaves.values()]
    assert all(grad is not None for grad in grads)
    return [visual.detach(), text.detach()], grads  # type: ignore[return-value]


def block_step(block: torch.nn.Module, core: Callable, states: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    """The Co-TRM block forward + backward with the given attention core; returns outputs."""
    block.zero_grad(set_to_none=True)
    with mock.patch.object(coattention, "attention_core", core):
        out = block(states["visual"], states["region_mask"], states["text"], states["token_mask"])
    (out.visual.square().mean() + out.text.square().mean()).backward()
    return [out.visual.detach(), out.text.detach()]


def timed_pair(
    ours: Callable[[], object],
    reference: Callable[[], object],
    device: torch.device,
    repeats: int,
    warmup: int = 2,
) -> tuple[list[float], list[float]]:
    """Wall-clock seconds per repeat of ``ours`` and ``reference``, interleaved (so load drift hits both alike)."""

    def once(fn: Callable[[], object]) -> float:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - start

    for _ in range(warmup):
        ours(), reference()
    pairs = [(once(ours), once(reference)) for _ in range(repeats)]
    return [a for a, _ in pairs], [b for _, b in pairs]


def max_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max(float((x - y).abs().max()) for x, y in zip(a, b, strict=True))


def machine(device: torch.device) -> dict[str, object]:
    info: dict[str, object] = dict(
        platform=platform.platform(),
        processor=platform.processor() or platform.machine(),
        cpu_count=torch.multiprocessing.cpu_count(),
        torch_threads=torch.get_num_threads(),
        device=str(device),
        load_average_1m=os.getloadavg()[0],  # the machine may be shared: compare ratios, not times
    )
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def bench_core(device: torch.device, repeats: int) -> dict[str, Any]:
    x = make_inputs(device)
    ours_out, ours_grad = core_step(coattention.attention_core, x)
    ref_out, ref_grad = core_step(reference_core, x)
    diff_out, diff_grad = max_diff(ours_out, ref_out), max_diff(ours_grad, ref_grad)
    if diff_out > TOLERANCE or diff_grad > TOLERANCE:
        raise RuntimeError(
            f"attention core differs from the reference: outputs {diff_out}, grads {diff_grad}"
        )
    ours, ref = timed_pair(
        lambda: core_step(coattention.attention_core, x),
        lambda: core_step(reference_core, x),
        device,
        repeats,
    )
    ratio = statistics.median(ref) / statistics.median(ours)
    return dict(
        ours_s=ours, reference_s=ref, ratio=ratio, max_abs_diff_out=diff_out, max_abs_diff_grad=diff_grad
    )


def bench_block(device: torch.device, repeats: int) -> dict[str, Any]:
    p = PARAMETERS
    torch.manual_seed(0)
    d, inter = p["hidden"], p["intermediate"]
    block = coattention.CoTransformerBlock(d, d, d, p["heads"], inter, inter, dropout=0.0).to(device)
    x = make_inputs(device)
    g = torch.Generator().manual_seed(1)
    states = dict(
        visual=torch.randn(p["batch"], p["regions"], d, generator=g).to(device),
        text=torch.randn(p["batch"], p["tokens"], d, generator=g).to(device),
        region_mask=x["region_mask"],
        token_mask=x["token_mask"],
    )
    diff = max_diff(
        block_step(block, coattention.attention_core, states), block_step(block, reference_core, states)
    )
    ours, ref = timed_pair(
        lambda: block_step(block, coattention.attention_core, states),
        lambda: block_step(block, reference_core, states),
        device,
        repeats,
    )
    ratio = statistics.median(ref) / statistics.median(ours)
    return dict(ours_s=ours, reference_s=ref, ratio=ratio, max_abs_diff_out=diff)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "coattention.json")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda":
        # Full float32 matmuls, so "equal within 1e-5" compares like with like.
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    block = bench_block(device, args.repeats)
    core = bench_core(device, args.repeats)
    result = dict(
        benchmark="coattention",
        machine=machine(device),
        versions=dict(python=platform.python_version(), torch=torch.__version__),
        parameters=dict(PARAMETERS, repeats=args.repeats, dtype="float32", goal_core_ratio=GOAL),
        attention_core=core,
        coattention_block=block,
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    med = statistics.median
    print(
        f"device {device}, torch {torch.__version__}, {torch.get_num_threads()} threads, {args.repeats} repeats"
    )
    print(f"Co-TRM block fwd+bwd: ours {med(block['ours_s']) * 1e3:.2f} ms, per-head loop "
          f"{med(block['reference_s']) * 1e3:.2f} ms, max |diff| {block['max_abs_diff_out']:.1e}")  # fmt: skip
    print(f"Co-TRM block ratio (reference / ours): {block['ratio']:.2f}x")
    print(f"attention core fwd+bwd, both directions: ours {med(core['ours_s']) * 1e3:.2f} ms, per-head loop "
          f"{med(core['reference_s']) * 1e3:.2f} ms, max |diff| out {core['max_abs_diff_out']:.1e} "
          f"grad {core['max_abs_diff_grad']:.1e}")  # fmt: skip
    print(f"attention core ratio (reference / ours, goal >= {GOAL}x): {core['ratio']:.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
