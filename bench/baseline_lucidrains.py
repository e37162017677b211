"""Baseline: lucidrains' denoising-diffusion-pytorch with its README recipe scaled to a CPU.

Runs in its own environment; denoising-diffusion-pytorch is never a dependency of difflab:

    python3 -m venv bench/out/venv-baseline
    bench/out/venv-baseline/bin/pip install torch==2.14.1 torchvision==0.29.1 \
        denoising-diffusion-pytorch==2.3.4
    bench/out/venv-baseline/bin/python bench/baseline_lucidrains.py --minutes 30 --num 1000
    python -m difflab eval bench/out/baseline/samples --ref bench/out/quality/ref-cars.npz

Recipe (issue 5): Unet(dim=32, dim_mults=(1, 2, 4)), GaussianDiffusion(image_size=32,
timesteps=1000, sampling_timesteps=100), Adam lr 8e-5 betas (0.9, 0.99), batch 32, horizontal
flips, gradient clipping 1.0, EMA decay 0.995 updated every 10 steps; 1,000 samples from the EMA
model with its DDIM sampler (100 steps). The training loop is the library's Trainer loop without
accelerate and without its periodic sampling (which would eat the budget).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent


def load_cars(folder: Path) -> torch.Tensor:
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in (".jpg", ".png"))
    arrays = [np.asarray(Image.open(p).convert("RGB")) for p in files]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()  # uint8 NCHW


def main() -> None:
    from denoising_diffusion_pytorch import GaussianDiffusion, Unet
    from ema_pytorch import EMA

    parser = argparse.ArgumentParser()
    parser.add_argument("--data", default=ROOT.parent / "shared/data/cifar10-jpg/train/automobile")
    parser.add_argument("--out", default=ROOT / "bench/out/baseline")
    parser.add_argument("--minutes", type=float, default=30.0)
    parser.add_argument("--num", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    out = Path(args.out)
    torch.manual_seed(args.seed)

    images = load_cars(Path(args.data))
    model = Unet(dim=32, dim_mults=(1, 2, 4))
    diffusion = GaussianDiffusion(model, image_size=32, timesteps=1000, sampling_timesteps=100)
    ema = EMA(diffusion, beta=0.995, update_every=10)
    optimizer = torch.optim.Adam(diffusion.parameters(), lr=8e-5, betas=(0.9, 0.99))
    parameters = sum(p.numel() for p in model.parameters())

    state_path = out / "trained.pt"  # the trained EMA model: sampling can resume without retraining
    if state_path.exists():
        state = torch.load(state_path, weights_only=False)
        ema.load_state_dict(state["ema"])
        steps, train_seconds = state["steps"], state["train_seconds"]
    else:
        started, steps = time.monotonic(), 0
        while time.monotonic() - started < args.minutes * 60:
            index = torch.randint(len(images), (32,))
            batch = images[index].float() / 255  # the library normalizes [0, 1] -> [-1, 1] itself
            flip = torch.rand(32) < 0.5
            batch = torch.where(flip[:, None, None, None], batch.flip(-1), batch)
            loss = diffusion(batch)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(diffusion.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad()
            ema.update()
            steps += 1
        train_seconds = time.monotonic() - started
        out.mkdir(parents=True, exist_ok=True)
        state = {"ema": ema.state_dict(), "steps": steps, "train_seconds": train_seconds}
        torch.save(state, out / "trained.tmp")
        (out / "trained.tmp").replace(state_path)
        print(f"trained {steps} steps in {train_seconds / 60:.1f} min", flush=True)

    samples = out / "samples"
    samples.mkdir(parents=True, exist_ok=True)
    ema.ema_model.eval()
    sample_seconds = state.get("sample_seconds", 0.0)
    for start in range(0, args.num, 100):  # batches already on disk are skipped (resumable)
        count = min(100, args.num - start)
        if all((samples / f"{start + i:05d}.png").exists() for i in range(count)):
            continue
        torch.manual_seed(args.seed + 1 + start)
        started = time.monotonic()
        with torch.inference_mode():
            batch = ema.ema_model.sample(batch_size=count)
        sample_seconds += time.monotonic() - started
        for i, image in enumerate((batch.clamp(0, 1) * 255).round().byte().permute(0, 2, 3, 1)):
            Image.fromarray(image.numpy()).save(samples / f"{start + i:05d}.png")
        state["sample_seconds"], state["sampled"] = sample_seconds, state.get("sampled", 0) + count
        torch.save(state, out / "trained.tmp")
        (out / "trained.tmp").replace(state_path)
        print(f"sampled {start + count}/{args.num}", flush=True)
    result = {
        "parameters": parameters,
        "steps": steps,
        "images_seen": steps * 32,
        "train_minutes": train_seconds / 60,
        "train_images_per_s": steps * 32 / train_seconds,
        "sample_images_per_s": state.get("sampled", 0) / max(sample_seconds, 1e-9),
        "evaluations_per_image": 100,
    }
    (out / "result.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
