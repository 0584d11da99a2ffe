"""Where a D-VAE training step's time goes, layer by layer (in process, no Ray).

For a preset's net at its stage batch (`--preset`, `--set` overrides as for `raypurify
purify`): the whole training step (forward, Eq. 14, backward, clipping, Adam) and, for each
convolution, the time of its forward and backward alone on an input of the shape it gets
in the net, with the GFLOP/s that makes (multiply-adds x 2 x 3: the forward, the input
gradient and the weight gradient; the stem needs no input gradient but is counted alike).
The sum over the convolutions against the step says how much a faster step could gain
outside them; their GFLOP/s against the best layer says how far they are from this CPU's
convolution rate. Precision as `precision: auto` resolves here (RAYPURIFY_PRECISION=fp32
forces fp32), channels_last, the torch threads of a one-worker stage.

    python bench/dvae_layers.py [--preset cpu] [--set model.width=16]

Results: bench/results/dvae_layers[-<label>]-<cpu kind>.{json,md}.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write_results  # noqa: E402

from raypurify.defenses.dvae.config import preset  # noqa: E402
from raypurify.defenses.dvae.loss import stage_loss  # noqa: E402
from raypurify.defenses.dvae.stage import build  # noqa: E402
from raypurify.runtime import autocast, torch_threads, use_bf16  # noqa: E402


def timed(fn, repeats: int) -> float:
    """Seconds per call of `fn`, after three warm-up calls."""
    for _ in range(3):
        fn()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats


def conv_inputs(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, tuple]:
    """Each convolution's (module, input shape, output shape) in one forward pass."""
    seen: dict[str, tuple] = {}

    def record(name: str, module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        seen.setdefault(name, (module, inputs[0].shape, output.shape))

    hooks = [
        m.register_forward_hook(lambda mod, i, o, n=n: record(n, mod, i, o))
        for n, m in model.named_modules()
        if isinstance(m, nn.Conv2d | nn.ConvTranspose2d)
    ]
    with torch.no_grad():
        model(x, y)
    for h in hooks:
        h.remove()
    return seen


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="cpu")
    ap.add_argument("--set", action="append", default=[], help="a preset override")
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--label", help="a variant name for the result file")
    args = ap.parse_args()
    cfg = preset(args.preset, args.set)
    stage, dev = cfg.stage1, torch.device("cpu")
    torch.set_num_threads(torch_threads(cfg.threads))
    amp = use_bf16(cfg.precision, dev)
    torch.manual_seed(0)
    model = build(cfg, 10, 32).to(memory_format=torch.channels_last)
    opt = torch.optim.Adam(model.parameters(), lr=stage.lr)
    x = torch.rand(stage.batch_size, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (stage.batch_size,))

    def step() -> None:
        with autocast(dev, amp):
            out = model(x, y)
        x_hat, p_hat, mu, logvar = (t.float() for t in out)
        # past phat_start_epoch: the p_hat hinge is part of the step timed
        loss, _ = stage_loss(stage, stage.phat_start_epoch, x, x_hat, p_hat, mu, logvar)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), stage.grad_clip)
        opt.step()

    step_s = timed(step, args.repeats)
    rows = []
    for name, (conv, shape_in, shape_out) in conv_inputs(model, x, y).items():
        inp = torch.randn(shape_in).contiguous(memory_format=torch.channels_last)
        inp.requires_grad_(True)

        def pass_(conv=conv, inp=inp) -> None:
            with autocast(dev, amp):
                out = conv(inp)
            out.float().sum().backward()

        seconds = timed(pass_, args.repeats)
        grid = shape_out[2:] if isinstance(conv, nn.Conv2d) else shape_in[2:]
        gflop = 6 * conv.weight.numel() * grid[0] * grid[1] * shape_in[0] / 1e9
        rows.append(
            {
                "what": name,
                "shape": f"{tuple(shape_in[1:])} -> {tuple(shape_out[1:])}",
                "ms": seconds * 1e3,
                "gflop_per_s": gflop / seconds,
                "gflop": gflop,
            }
        )
    conv_s = sum(r["ms"] for r in rows) / 1e3
    conv_gflop = sum(r["gflop"] for r in rows)
    rows.append(
        {
            "what": "all convolutions, alone",
            "ms": conv_s * 1e3,
            "gflop_per_s": conv_gflop / conv_s,
            "gflop": conv_gflop,
        }
    )
    rows.append(
        {
            "what": "the training step",
            "ms": step_s * 1e3,
            "gflop_per_s": conv_gflop / step_s,
            "gflop": conv_gflop,
            "images_per_s": stage.batch_size / step_s,
        }
    )
    name = f"dvae_layers-{args.label}" if args.label else "dvae_layers"
    write_results(
        name,
        rows,
        ["what", "shape", "ms", "gflop_per_s", "images_per_s"],
        notes=f"Preset {args.preset} (overrides: {args.set or 'none'}), batch "
        f"{stage.batch_size}, {'bf16' if amp else 'fp32'}, {torch.get_num_threads()} threads. "
        "Each convolution: forward + backward alone, GFLOP = 6 x multiply-adds. The step: "
        "the convolutions' GFLOP over the whole step's time (its other work counts as time "
        f"only). Convolutions alone take {conv_s / step_s:.0%} of the step's time.",
    )


if __name__ == "__main__":
    main()
