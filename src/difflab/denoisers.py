"""Parameterizations: what a raw network predicts, and how that becomes (x0, eps).

A raw network maps ``(x, noise_condition, labels)`` to a tensor. A parameterization says what
that tensor means: noise (eps), the clean image (x0), v, the flow velocity, the tutorial's next
image, or EDM's preconditioned output. Each one knows

- ``network_input``: how x_t is scaled before the network sees it (only EDM scales),
- ``to_x0_eps``: how the output becomes the pair (x0, eps) with x_t = alpha x0 + sigma eps,
- ``target``: what the output should be for a known (x0, eps), used by the objectives,
- ``snr_weight``: the weight its MSE implicitly puts on the x0 error (for min-SNR weighting).

Every sampler works with (x0, eps), so any parameterization runs with any compatible sampler.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor, nn

from difflab.schedules import ForwardProcess, _per_sample


class Prediction(NamedTuple):
    x0: Tensor
    eps: Tensor


@dataclass
class Coefficients:
    """alpha, sigma (and derivatives) at t, already shaped to broadcast over images."""

    alpha: Tensor
    sigma: Tensor
    dalpha: Tensor | None = None
    dsigma: Tensor | None = None

    @classmethod
    def at(cls, process: ForwardProcess, t: Tensor, ndim: int, derivatives: bool = False):
        alpha, sigma = (_per_sample(v, ndim) for v in process.alpha_sigma(t))
        if not derivatives:
            return cls(alpha, sigma)
        dalpha, dsigma = (_per_sample(v, ndim) for v in process.derivatives(t))
        return cls(alpha, sigma, dalpha, dsigma)


class Parameterization:
    name = "base"
    needs_derivatives = False

    def network_input(self, x: Tensor, c: Coefficients) -> Tensor:
        return x

    def to_x0_eps(self, out: Tensor, x: Tensor, c: Coefficients) -> Prediction:
        raise NotImplementedError

    def target(self, x0: Tensor, eps: Tensor, c: Coefficients) -> Tensor:
        raise NotImplementedError

    def snr_weight(self, snr: Tensor) -> Tensor:
        raise NotImplementedError(f"min-SNR weighting is not defined for {self.name}")


class EpsilonPrediction(Parameterization):
    """Predict the noise (Ho et al. 2020, eq. 11-12)."""

    name = "eps"

    def to_x0_eps(self, out: Tensor, x: Tensor, c: Coefficients) -> Prediction:
        return Prediction((x - c.sigma * out) / c.alpha, out)

    def target(self, x0: Tensor, eps: Tensor, c: Coefficients) -> Tensor:
        return eps

    def snr_weight(self, snr: Tensor) -> Tensor:
        return snr  # ||eps - eps_hat||^2 = snr * ||x0 - x0_hat||^2


class SamplePrediction(Parameterization):
    """Predict the clean image x0."""

    name = "x0"

    def to_x0_eps(self, out: Tensor, x: Tensor, c: Coefficients) -> Prediction:
        return Prediction(out, (x - c.alpha * out) / c.sigma)

    def target(self, x0: Tensor, eps: Tensor, c: Coefficients) -> Tensor:
        return x0

    def snr_weight(self, snr: Tensor) -> Tensor:
        return torch.ones_like(snr)


class VPrediction(Parameterization):
    """Predict v = alpha eps - sigma x0 (Salimans & Ho 2022, sec. 4; eq. for general alpha, sigma)."""

    name = "v"

    def to_x0_eps(self, out: Tensor, x: Tensor, c: Coefficients) -> Prediction:
        norm = c.alpha**2 + c.sigma**2
        return Prediction(
            (c.alpha * x - c.sigma * out) / norm, (c.sigma * x + c.alpha * out) / norm
        )

    def target(self, x0: Tensor, eps: Tensor, c: Coefficients) -> Tensor:
        return c.alpha * eps - c.sigma * x0

    def snr_weight(self, snr: Tensor) -> Tensor:
        return snr + 1


class VelocityPrediction(Parameterization):
    """Predict the path velocity u = dx_t/dt = alpha' x0 + sigma' eps (Lipman et al. 2022, eq. 21)."""

    name = "velocity"
    needs_derivatives = True

    def to_x0_eps(self, out: Tensor, x: Tensor, c: Coefficients) -> Prediction:
        # Solve x = alpha x0 + sigma eps, u = alpha' x0 + sigma' eps for (x0, eps).
        det = c.alpha * c.dsigma - c.sigma * c.dalpha
        return Prediction(
            (c.dsigma * x - c.sigma * out) / det, (c.alpha * out - c.dalpha * x) / det
        )

    def target(self, x0: Tensor, eps: Tensor, c: Coefficients) -> Tensor:
        return c.dalpha * x0 + c.dsigma * eps


class NextStepPrediction(Parameterization):
    """The tutorial's target: the same image one level cleaner, built from the same noise.

    With x_a = alpha_a x0 + sigma_a eps and the prediction y = x_b at the next level b = a - step,
    the pair (x0, eps) solves two linear equations. On the straight path y = x_a - step * (eps -
    x0): one Euler step of the flow-matching ODE, learned directly instead of its velocity.
    """

    name = "next"

    def __init__(self, process: ForwardProcess, step: float) -> None:
        self.process, self.step = process, step

    def _next(self, c: Coefficients) -> Coefficients:
        t_next = (1 - c.alpha.flatten()) - self.step  # linear path: t = 1 - alpha
        alpha, sigma = self.process.alpha_sigma(t_next.clamp_min(0))
        return Coefficients(alpha.reshape(c.alpha.shape), sigma.reshape(c.sigma.shape))

    def to_x0_eps(self, out: Tensor, x: Tensor, c: Coefficients) -> Prediction:
        n = self._next(c)
        det = c.alpha * n.sigma - c.sigma * n.alpha
        return Prediction((n.sigma * x - c.sigma * out) / det, (c.alpha * out - n.alpha * x) / det)

    def target(self, x0: Tensor, eps: Tensor, c: Coefficients) -> Tensor:
        n = self._next(c)
        return n.alpha * x0 + n.sigma * eps


class EDMPreconditioning(Parameterization):
    """D(x) = c_skip x + c_out F(c_in x, c_noise) (Karras et al. 2022, eq. 7 and Table 1).

    The target of F is (x0 - c_skip x) / c_out, so a plain MSE on F carries EDM's loss weight
    lambda(sigma) = 1 / c_out^2 exactly (eq. 8).
    """

    name = "edm"

    def __init__(self, sigma_data: float = 0.5) -> None:
        self.sigma_data = sigma_data

    def _scales(self, c: Coefficients) -> tuple[Tensor, Tensor, Tensor]:
        sd2, s2 = self.sigma_data**2, c.sigma**2
        c_skip = sd2 / (s2 + sd2)
        c_out = c.sigma * self.sigma_data / (s2 + sd2).sqrt()
        c_in = 1 / (s2 + sd2).sqrt()
        return c_skip, c_out, c_in

    def network_input(self, x: Tensor, c: Coefficients) -> Tensor:
        return self._scales(c)[2] * x

    def to_x0_eps(self, out: Tensor, x: Tensor, c: Coefficients) -> Prediction:
        c_skip, c_out, _ = self._scales(c)
        x0 = c_skip * x + c_out * out
        return Prediction(x0, (x - x0) / c.sigma)

    def target(self, x0: Tensor, eps: Tensor, c: Coefficients) -> Tensor:
        c_skip, c_out, _ = self._scales(c)
        x = x0 + c.sigma * eps
        return (x0 - c_skip * x) / c_out


def times_like(t: Tensor | float, x: Tensor) -> Tensor:
    """Time(s) ``t`` (a number, a 0-d or [1] tensor, or one per image; any device) as a float
    vector [N] on the device of the images ``x``.

    This is where a sampler's time grid, kept on the host in float64, meets the images: the
    one place time crosses to the device, so no sampler has to remember it.
    """
    dtype = x.dtype if x.dtype in (torch.float32, torch.float64) else torch.float32
    t = torch.as_tensor(t).to(device=x.device, dtype=dtype).reshape(-1)
    return t.expand(x.shape[0]) if t.numel() == 1 else t


class ConsistencyParameterization(Parameterization):
    """A diffusion parameterization made a consistency function f(x, sigma) (Song et al. 2023,
    eq. 7): in EDM's variables y = x / alpha, s = sigma / alpha,

        f = y + g(s) (x0 - y),   g(s) = (s - s_min) / s,

    where x0 is what the wrapped parameterization (``inner``) predicts. At s_min, g = 0 and f = y
    exactly, whatever the network says (the boundary condition, their eq. 5); a little above
    s_min, g is already about 1 and f is the diffusion model's own x0, so a diffusion run's
    weights are the student's start, exactly as trained (ECT, Geng et al. 2024, starts from a
    pretrained diffusion model the same way). On EDM's preconditioning this is f = c_skip x +
    c_out F with c_out = sd (s - s_min) / sqrt(sd^2 + s^2), Song et al.'s App. C c_out, and
    c_skip = (sd^2 + s_min s) / (sd^2 + s^2) (theirs: sd^2 / ((s - s_min)^2 + sd^2); both are
    1 at s_min and differ by less than s_min elsewhere). It has no per-sample regression target:
    the consistency objective compares two of its outputs.
    """

    name = "consistency"

    def __init__(self, inner: Parameterization, sigma_min: float = 0.002) -> None:
        self.inner, self.sigma_min = inner, sigma_min
        self.needs_derivatives = inner.needs_derivatives

    def network_input(self, x: Tensor, c: Coefficients) -> Tensor:
        return self.inner.network_input(x, c)

    def to_x0_eps(self, out: Tensor, x: Tensor, c: Coefficients) -> Prediction:
        x0 = self.inner.to_x0_eps(out, x, c).x0
        y, s = x / c.alpha, c.sigma / c.alpha
        x0 = y + (1 - self.sigma_min / s).clamp_min(0) * (x0 - y)
        return Prediction(x0, (x - c.alpha * x0) / c.sigma)

    def target(self, x0: Tensor, eps: Tensor, c: Coefficients) -> Tensor:
        raise NotImplementedError("a consistency model has no per-sample regression target")


class Denoiser(nn.Module):
    """A raw network wrapped with a forward process and a parameterization.

    ``raw(x, t)`` is the network output (what objectives regress); ``forward(x, t)`` is the
    prediction (x0, eps) that samplers use. t is one time for the batch or one per sample, on
    any device (see ``times_like``).
    """

    def __init__(self, net: nn.Module, process: ForwardProcess, parameterization: Parameterization):
        super().__init__()
        self.net, self.process, self.parameterization = net, process, parameterization

    def coefficients(self, t: Tensor, ndim: int) -> Coefficients:
        return Coefficients.at(self.process, t, ndim, self.parameterization.needs_derivatives)

    def raw(self, x: Tensor, t: Tensor | float, labels: Tensor | None = None) -> Tensor:
        t = times_like(t, x)
        c = self.coefficients(t, x.ndim)
        cond = self.process.noise_condition(t).to(x.dtype)
        inp = self.parameterization.network_input(x, c)  # a network of (x, cond) is unconditional
        return self.net(inp, cond) if labels is None else self.net(inp, cond, labels)

    def to_x0_eps(self, out: Tensor, x: Tensor, t: Tensor | float) -> Prediction:
        """The prediction (x0, eps) that a raw output ``out`` at (x, t) stands for."""
        return self.parameterization.to_x0_eps(out, x, self.coefficients(times_like(t, x), x.ndim))

    def forward(self, x: Tensor, t: Tensor | float, labels: Tensor | None = None) -> Prediction:
        return self.to_x0_eps(self.raw(x, t, labels), x, t)

    def bind(
        self, labels: Tensor | None, guidance: float = 1.0, guide: Denoiser | None = None
    ) -> Denoiser:
        """This denoiser with class labels (one per image, -1 for "no class"), a guidance weight
        and a guide bound, for samplers that call ``denoiser(x, t)``; itself when there are no
        labels and no guide."""
        return self if labels is None and guide is None else Guided(self, labels, guidance, guide)


class Guided(Denoiser):
    """A denoiser with its class labels bound, guided away from a second branch:

        out = out_guide + w (out - out_guide).

    Without a guide the second branch is the model itself without a class: classifier-free
    guidance (Ho & Salimans 2022, eq. 6 written for any parameterization; w = 1 is the plain
    conditional model and w = 0 the unconditional one). With a guide, a weaker model of the same
    method (a smaller one, or the run's own earlier checkpoint) given the same labels:
    autoguidance (Karras et al. 2024, arXiv:2406.02507, "Guiding a diffusion model with a bad
    version of itself"), which works for unconditional models too. Every parameterization is
    affine in the raw output with weights that do not depend on it, and (1 - w) + w = 1, so
    mixing raw outputs mixes x0 and eps the same way.
    """

    def __init__(
        self,
        base: Denoiser,
        labels: Tensor | None,
        guidance: float = 1.0,
        guide: Denoiser | None = None,
    ) -> None:
        super().__init__(base.net, base.process, base.parameterization)
        self.base, self.labels, self.guidance, self.guide = base, labels, float(guidance), guide

    def raw(self, x: Tensor, t: Tensor | float, labels: Tensor | None = None) -> Tensor:
        t = times_like(t, x)
        labels = None if self.labels is None else self.labels.to(x.device)
        if self.guide is not None:
            out = self.base.raw(x, t, labels)
            if self.guidance == 1.0:
                return out
            return torch.lerp(self.guide.raw(x, t, labels), out, self.guidance)
        if self.guidance in (0.0, 1.0):  # one branch only
            return self.base.raw(x, t, labels if self.guidance else torch.full_like(labels, -1))
        # One network call on the doubled batch: conditional half, then unconditional half.
        both = self.base.raw(
            torch.cat([x, x]), torch.cat([t, t]), torch.cat([labels, torch.full_like(labels, -1)])
        )
        cond, uncond = both.chunk(2)
        return uncond + self.guidance * (cond - uncond)
