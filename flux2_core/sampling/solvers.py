"""ODE solvers for the flow-matching sampler: Euler and the multistep solvers FLUX.2 users pick.

Every solver advances x from sigma_i to sigma_{i+1} given the model's velocity v = v(x_i, sigma_i)
(flow matching: v ~ noise - data). The denoised estimate is x0 = x - sigma v. The multistep solvers
are written in k-diffusion's formulation, as ComfyUI runs them on FLUX.2 (comfy/k_diffusion/sampling.py:
``sample_dpmpp_2m``, ``sample_res_multistep``), with t = -log(sigma) and h = t_{i+1} - t_i; they
treat x0 and x exactly as those functions do, so the same schedule gives the same latents.

- euler: x_{i+1} = x_i + (sigma_{i+1} - sigma_i) v_i.
- dpmpp_2m (DPM-Solver++ 2M): x_{i+1} = (sigma_{i+1} / sigma_i) x_i - expm1(-h) D_i with
  D_i = (1 + 1/(2r)) x0_i - 1/(2r) x0_{i-1}, r = h_{i-1} / h_i; D_0 = x0_0 and the last step
  (sigma_{i+1} = 0) returns x0_i.
- res_multistep (RES 2nd order, deterministic): x_{i+1} = e^{-h} x_i + h (b1 x0_i + b2 x0_{i-1}),
  c2 = (t_{i-1} - t_i) / h, b1 = phi1(-h) - phi2(-h) / c2, b2 = phi2(-h) / c2,
  phi1(z) = expm1(z) / z, phi2(z) = (phi1(z) - 1) / z; the first and the last step are Euler steps.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from torch import Tensor

from ..errors import InputError


class Solver:
    """One run's solver state; ``step`` is called once per schedule interval, in order."""

    #: model evaluations per step
    evaluations = 1

    def step(self, x: Tensor, v: Tensor, sigmas: Sequence[float], i: int) -> Tensor:
        """x at sigmas[i + 1] from x and the velocity v at sigmas[i]."""
        raise NotImplementedError


class Euler(Solver):
    def step(self, x, v, sigmas, i):
        return x + (sigmas[i + 1] - sigmas[i]) * v


class DPMPP2M(Solver):
    def __init__(self) -> None:
        self.old_denoised: Tensor | None = None

    def step(self, x, v, sigmas, i):
        s, s_next = sigmas[i], sigmas[i + 1]
        denoised = x - s * v
        if s_next == 0:
            out = denoised  # sigma ratio 0 and expm1(-inf) = -1: x0 itself
        else:
            h = math.log(s) - math.log(s_next)
            d = denoised
            if self.old_denoised is not None:
                r = (math.log(sigmas[i - 1]) - math.log(s)) / h
                d = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * self.old_denoised
            out = (s_next / s) * x - math.expm1(-h) * d
        self.old_denoised = denoised
        return out


class ResMultistep(Solver):
    def __init__(self) -> None:
        self.old_denoised: Tensor | None = None

    def step(self, x, v, sigmas, i):
        s, s_next = sigmas[i], sigmas[i + 1]
        denoised = x - s * v
        if s_next == 0 or self.old_denoised is None:
            out = x + (s_next - s) * v
        else:
            t, t_next, t_prev = -math.log(s), -math.log(s_next), -math.log(sigmas[i - 1])
            h = t_next - t
            c2 = (t_prev - t) / h
            phi1 = math.expm1(-h) / -h
            phi2 = (phi1 - 1.0) / -h
            b1, b2 = phi1 - phi2 / c2, phi2 / c2
            out = math.exp(-h) * x + h * (b1 * denoised + b2 * self.old_denoised)
        self.old_denoised = denoised
        return out


SOLVERS: dict[str, type[Solver]] = {
    "euler": Euler,
    "dpmpp_2m": DPMPP2M,
    "res_multistep": ResMultistep,
}


def make_solver(name: str) -> Solver:
    """A fresh solver for one run.

    Raises:
        InputError: an unknown name (the message lists the known ones).
    """
    try:
        return SOLVERS[name]()
    except KeyError:
        raise InputError(f"unknown sampler '{name}'; choose one of: {', '.join(SOLVERS)}.") from None
