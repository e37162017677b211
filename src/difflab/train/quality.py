"""FID / KID of a few hundred samples while training (off by default: costly on a CPU)."""

from __future__ import annotations

import torch

from difflab.classes import labels_for
from difflab.config import Config
from difflab.denoisers import Denoiser
from difflab.plans import SamplingPlan
from difflab.sampling import generate
from difflab.seeds import derive_seed


class QualityProbe:
    """Loads the reference statistics and the Inception network once, then scores samples."""

    def __init__(self, config: Config, plan: SamplingPlan) -> None:
        from difflab.metrics import load_stats

        self.config, self.plan = config, plan
        self.ref = load_stats(config.train.eval_ref)
        self.extractor = None

    def measure(
        self, denoiser: Denoiser, device: torch.device, guide: Denoiser | None = None
    ) -> dict[str, float]:
        from difflab.data import fit_size
        from difflab.metrics import InceptionFeatures, extract_features, fid_kid
        from difflab.viz import to_uint8

        if self.extractor is None:
            self.extractor = InceptionFeatures(device=device)
        size = self.config.data.image_size
        seeds = [derive_seed(0, "eval", i) for i in range(self.config.train.eval_num)]
        names = self.config.data.class_names  # a conditional run: equal numbers per class
        labels = labels_for("all", names, len(seeds)) if names else None
        images = generate(
            denoiser,
            self.plan,
            (3, size, size),
            seeds,
            device=device,
            labels=labels,
            guidance=self.config.sampler.guidance,
            guide=guide,
        ).images  # in eval mode, as generate samples
        scored = self.ref.image_size or size  # as eval scores: at the reference's size
        features = extract_features(
            fit_size(to_uint8(images), scored), self.extractor, progress=False
        )
        scores = fid_kid(features, self.ref, subset_size=min(1000, len(seeds)))
        return {"fid": scores["fid"], "kid": scores["kid_mean"]}
