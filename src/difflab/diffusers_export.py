"""A run as a Hugging Face diffusers folder: ``UNet2DModel`` + ``DDPMScheduler`` (+ a model card).

Written without diffusers installed (the folder is JSON and safetensors); loaded by
``DDPMPipeline.from_pretrained(DIR)`` or ``UNet2DModel.from_pretrained(DIR, subfolder="unet")``.

difflab's U-Net is DDPM's layout, which is also ``UNet2DModel``'s, so the weights map block for
block. Two conventions differ and are folded into the weights exactly:

- Time. difflab gives the network step i in 1..T (i = 0 is the clean image); diffusers gives
  timestep i - 1 for the same noise level (its timestep 0 is the first noising step). The
  sinusoidal embedding of i is a rotation of the embedding of i - 1 (each frequency pair turns
  by its own frequency), and a rotation is linear: it is multiplied into the first layer of the
  time MLP.
- "No class". A conditional network's label -1 is an extra class embedding of zeros, index C.

Only networks whose condition is DDPM's step index through the sinusoidal embedding map
(``embedding = "positional"``, methods ``ddpm`` and ``ddpm-cosine``: the presets ddpm-paper and
ddpm-cosine-paper). UNet2DModel's "fourier" mode takes log(timestep) and divides its output by
the timestep (NCSN++'s score convention), so Fourier-embedded networks (the -cpu presets, EDM,
flow) have no exact counterpart.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import Tensor

from difflab.config import Config
from difflab.errors import DifflabError, counted
from difflab.io import publish_folder
from difflab.models.layers import group_count, positional_frequencies
from difflab.models.unet import Downsample, Stage, UNet, Upsample
from difflab.train.logs import read_metrics

EXPORTABLE = ("ddpm-paper", "ddpm-cosine-paper")
DIFFUSERS_VERSION = "0.30.0"  # the oldest diffusers these configs were checked against


def check_exportable(config: Config, net: torch.nn.Module, process: object) -> None:
    """A one-line error unless the run maps exactly onto UNet2DModel and DDPMScheduler."""
    preset = config.preset
    refuse = f"this {preset} run cannot be exported to diffusers: "
    presets = f"; runs of {' and '.join(EXPORTABLE)} export with the presets' networks"
    if config.method.name not in ("ddpm", "ddpm-cosine") or not isinstance(net, UNet):
        raise DifflabError(
            f"{refuse}only DDPM runs (method ddpm or ddpm-cosine, network unet) map onto "
            f"UNet2DModel and DDPMScheduler, this is {config.method.name} on "
            f"{config.network.name}{presets}"
        )
    cfg = net.config
    if cfg.embedding != "positional":
        raise DifflabError(
            f"{refuse}its U-Net embeds time with Fourier features, which UNet2DModel cannot "
            f"hold (its 'fourier' mode takes log(t) and divides the output by t){presets}"
        )
    if cfg.embedding_scale != process.num_timesteps:
        raise DifflabError(
            f"{refuse}its time embedding scale ({cfg.embedding_scale:g}) must equal the number of "
            f"DDPM steps ({process.num_timesteps}) for the network to see step indices{presets}"
        )
    widths = [cfg.channels * m for m in cfg.channel_mult]
    if any(group_count(w) != 32 for w in [cfg.channels, *widths]):
        raise DifflabError(f"{refuse}every width must be a multiple of 32 (GroupNorm(32)){presets}")
    attended = {
        w for w, r in zip(widths, _resolutions(net), strict=True) if r in cfg.attention_resolutions
    }
    if cfg.num_heads > 1 and len(attended | {widths[-1]}) > 1:
        raise DifflabError(
            f"{refuse}several attention heads need one width at every attention{presets}"
        )
    if not cfg.resample_with_conv:
        raise DifflabError(f"{refuse}UNet2DModel resamples with convolutions{presets}")


def _resolutions(net: UNet) -> list[int]:
    return [net.image_size // 2**i for i in range(len(net.config.channel_mult))]


def unet_config(net: UNet) -> dict:
    """UNet2DModel's config.json for ``net``."""
    cfg = net.config
    attention = [r in cfg.attention_resolutions for r in _resolutions(net)]
    widths = [cfg.channels * m for m in cfg.channel_mult]
    down = ["AttnDownBlock2D" if a else "DownBlock2D" for a in attention]
    up = ["AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attention)]
    return {
        "_class_name": "UNet2DModel",
        "_diffusers_version": DIFFUSERS_VERSION,
        "sample_size": net.image_size,
        "in_channels": net.image_channels,
        "out_channels": net.image_channels,
        "center_input_sample": False,
        "time_embedding_type": "positional",
        "flip_sin_to_cos": False,  # [sin, cos], as DDPM
        "freq_shift": 1,  # frequencies 10000^(-i/(h-1)), as DDPM
        "down_block_types": down,
        "up_block_types": up,
        "block_out_channels": widths,
        "layers_per_block": cfg.num_blocks,
        "mid_block_scale_factor": 1,
        "downsample_padding": 1,
        "downsample_type": "conv",
        "upsample_type": "conv",
        "dropout": cfg.dropout,
        "act_fn": "silu",
        "attention_head_dim": None if cfg.num_heads == 1 else widths[-1] // cfg.num_heads,
        "norm_num_groups": 32,
        "attn_norm_num_groups": 32,
        "norm_eps": 1e-5,
        "resnet_time_scale_shift": "scale_shift"
        if cfg.conditioning == "scale-shift"
        else "default",
        "add_attention": True,
        "class_embed_type": None,
        "num_class_embeds": cfg.num_classes + 1 if cfg.num_classes else None,
        "num_train_timesteps": None,
    }


def unet_weights(net: UNet) -> dict[str, Tensor]:
    """``net``'s weights under UNet2DModel's names, the time shift folded in (module doc)."""
    out: dict[str, Tensor] = {}

    def put(prefix: str, module: torch.nn.Module) -> None:
        for name, value in module.state_dict().items():
            out[f"{prefix}.{name}"] = value.detach().clone()

    def res(prefix: str, block: torch.nn.Module) -> None:
        names = {
            "norm1": "norm1",
            "conv1": "conv1",
            "emb_proj": "time_emb_proj",
            "norm2": "norm2",
            "conv2": "conv2",
        }
        for ours, theirs in names.items():
            put(f"{prefix}.{theirs}", getattr(block, ours))
        if isinstance(block.skip, torch.nn.Conv2d):
            put(f"{prefix}.conv_shortcut", block.skip)

    def attn(prefix: str, block: torch.nn.Module) -> None:
        put(f"{prefix}.group_norm", block.norm)
        weight, bias = block.qkv.weight[:, :, 0, 0], block.qkv.bias
        for k, name in enumerate(("to_q", "to_k", "to_v")):
            rows = slice(k * weight.shape[1], (k + 1) * weight.shape[1])
            out[f"{prefix}.{name}.weight"] = weight[rows].detach().clone()
            out[f"{prefix}.{name}.bias"] = bias[rows].detach().clone()
        out[f"{prefix}.to_out.0.weight"] = block.proj.weight[:, :, 0, 0].detach().clone()
        out[f"{prefix}.to_out.0.bias"] = block.proj.bias.detach().clone()

    put("conv_in", net.conv_in)
    put("time_embedding.linear_1", net.time_mlp[0])
    put("time_embedding.linear_2", net.time_mlp[2])
    shift = _time_shift(net.config.channels)
    out["time_embedding.linear_1.weight"] = out["time_embedding.linear_1.weight"] @ shift
    if net.label_emb is not None:
        no_class = torch.zeros_like(net.label_emb.weight[:1])
        out["class_embedding.weight"] = torch.cat([net.label_emb.weight.detach(), no_class])
    for side, modules in (("down_blocks", net.down), ("up_blocks", net.up)):
        level = index = 0
        for module in modules:
            prefix = f"{side}.{level}"
            if isinstance(module, Stage):
                res(f"{prefix}.resnets.{index}", module.res)
                if module.attn is not None:
                    attn(f"{prefix}.attentions.{index}", module.attn)
                index += 1
            elif isinstance(module, (Downsample, Upsample)):
                sampler = "downsamplers" if isinstance(module, Downsample) else "upsamplers"
                put(f"{prefix}.{sampler}.0.conv", module.conv)
                level, index = level + 1, 0
    res("mid_block.resnets.0", net.mid[0])
    attn("mid_block.attentions.0", net.mid[1])
    res("mid_block.resnets.1", net.mid[2])
    put("conv_norm_out", net.norm_out)
    put("conv_out", net.conv_out)
    return {key: value.float().contiguous() for key, value in out.items()}


def _time_shift(dim: int) -> Tensor:
    """R with emb(i) = R emb(i - 1) for the sinusoidal embedding ``[sin(i w), cos(i w)]``
    (``positional_embedding`` of i / T at scale T): each pair turns by its frequency w_k."""
    half = dim // 2
    freqs = positional_frequencies(half, dtype=torch.float64)
    cos, sin = torch.cos(freqs), torch.sin(freqs)
    rotation = torch.zeros(dim, dim, dtype=torch.float64)
    k = torch.arange(half)
    rotation[k, k], rotation[k, k + half] = cos, sin  # sin(a + b) = sin a cos b + cos a sin b
    rotation[k + half, k], rotation[k + half, k + half] = -sin, cos  # cos(a + b)
    return rotation.float()


#: diffusers' name for what the network predicts (difflab's parameterization names).
PREDICTION_TYPES = {"eps": "epsilon", "v": "v_prediction", "x0": "sample"}


def scheduler_config(config: Config, betas: Tensor, prediction: str) -> dict:
    """DDPMScheduler's config: the run's own betas, target and ancestral variance."""
    return {
        "_class_name": "DDPMScheduler",
        "_diffusers_version": DIFFUSERS_VERSION,
        "num_train_timesteps": len(betas),
        "trained_betas": betas.tolist(),
        "beta_schedule": "linear",  # ignored: trained_betas are the run's
        "variance_type": "fixed_large" if config.sampler.variance == "large" else "fixed_small",
        "clip_sample": config.sampler.clip_x0,
        "prediction_type": PREDICTION_TYPES[prediction],
        "timestep_spacing": "trailing",  # difflab's respaced grid starts at T
        "steps_offset": 0,
    }


def write_diffusers(run, out: Path, run_dir: Path) -> None:
    """Write ``run`` (an ``api.Run`` of ``run_dir``) as a DDPMPipeline folder at ``out``
    (atomically), with a model card."""
    process, prediction = run.method.process, run.method.parameterization.name
    check_exportable(run.config, run.net, process)  # before anything reads DDPM's settings
    card = model_card(run, run_dir)
    if out.is_dir() and any(out.iterdir()) and not (out / "model_index.json").exists():
        raise DifflabError(
            f"--out {out} is a folder with other files in it; give a new or empty folder (an "
            "earlier diffusers export there is replaced)"
        )
    files = {
        "unet/config.json": unet_config(run.net),
        "scheduler/scheduler_config.json": scheduler_config(
            run.config, process.betas(), prediction
        ),
        "model_index.json": {
            "_class_name": "DDPMPipeline",
            "_diffusers_version": DIFFUSERS_VERSION,
            "scheduler": ["diffusers", "DDPMScheduler"],
            "unet": ["diffusers", "UNet2DModel"],
        },
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}-") as folder:
        tmp = Path(folder) / "export"
        for name, values in files.items():
            (tmp / name).parent.mkdir(parents=True, exist_ok=True)
            (tmp / name).write_text(json.dumps(values, indent=2) + "\n")
        weights = unet_weights(run.net)
        save_file(weights, str(tmp / "unet" / "diffusion_pytorch_model.safetensors"))
        (tmp / "README.md").write_text(card)
        publish_folder(tmp, out)


def model_card(run, run_dir: Path) -> str:
    """The folder's README.md: what was trained on what, for how long, how well, how to load."""
    config = run.config
    data = config.data
    classes = data.class_name or (
        "all classes" if not data.class_names else ", ".join(data.class_names)
    )
    scores = [row for row in read_metrics(run_dir / "log.jsonl") if "fid" in row]
    quality = (
        f"FID {scores[-1]['fid']:.1f} at {scores[-1]['kimg']:.0f} kimg (difflab's in-training "
        f"probe, {config.train.eval_num} samples against {config.train.eval_ref})"
        if scores
        else "not measured during training (`difflab eval RUN --ref REF.npz` measures it)"
    )
    prediction = PREDICTION_TYPES[run.method.parameterization.name]
    return f"""---
library_name: diffusers
{"tags: [difflab, ddpm, class-conditional]" if data.class_names else UNCONDITIONAL}
---

# {config.preset} trained with difflab

- **Method**: {config.method.name} (prediction type `{prediction}`), {run.method.process.num_timesteps} steps;
  scheduler: `DDPMScheduler` with the run's own betas.
- **Network**: difflab's U-Net ({config.network.unet.channels} channels,
  mult {list(config.network.unet.channel_mult)}), exported block for block as `UNet2DModel`.
- **Data**: {data.source}, {classes}, {data.image_size}x{data.image_size}.
- **Budget**: {counted(run.step, "optimizer step")} of batch {config.train.batch_size}; {"raw" if run.weights == "raw" else "EMA"} weights.
- **Quality**: {quality}.

{_conditional_usage(data.class_names, data.image_size) if data.class_names else USAGE}
`UNet2DModel.from_pretrained(PATH, subfolder="unet")` loads the network alone. difflab's time
input (step 1..T) is folded into the weights: the model takes diffusers' timesteps 0..T-1.
"""


UNCONDITIONAL = "pipeline_tag: unconditional-image-generation\ntags: [difflab, ddpm]"
USAGE = """```python
from diffusers import DDPMPipeline

pipeline = DDPMPipeline.from_pretrained("PATH/TO/THIS/FOLDER")
images = pipeline(batch_size=16, num_inference_steps=1000).images
```
"""


def _conditional_usage(class_names: list[str], size: int) -> str:
    """DDPMPipeline passes no class labels, so a conditional network samples by its own loop."""
    table = "\n".join(f"| {i} | {name} |" for i, name in enumerate(class_names))
    none = len(class_names)
    return f"""The network is class-conditional: `DDPMPipeline` passes no `class_labels` (it refuses
to run), so sample with the scheduler's loop. `class_labels` are these indices; {none} is "no
class" (the label dropout's unconditional model).

| index | class |
|---:|---|
{table}
| {none} | no class |

```python
import torch
from diffusers import DDPMScheduler, UNet2DModel

unet = UNet2DModel.from_pretrained("PATH/TO/THIS/FOLDER", subfolder="unet")
scheduler = DDPMScheduler.from_pretrained("PATH/TO/THIS/FOLDER", subfolder="scheduler")
labels = torch.tensor([0] * 16)  # 16 images of class 0
x = torch.randn(16, 3, {size}, {size}, generator=torch.Generator().manual_seed(0))
scheduler.set_timesteps(1000)
for t in scheduler.timesteps:
    with torch.no_grad():
        model_output = unet(x, t, class_labels=labels).sample
    x = scheduler.step(model_output, t, x).prev_sample
images = (x.clamp(-1, 1) + 1) / 2  # [16, 3, {size}, {size}] in [0, 1]
```
"""
