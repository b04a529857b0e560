"""How to invert: `InversionConfig`, the one set of inversion defaults, without torch.

The command line builds `tailseed invert`'s flags from these fields and their help, so this module
imports nothing heavy: `--help` answers without loading torch. The solvers themselves are in
pipeline/inversion.py (`SOLVERS`, whose names are SOLVER_NAMES).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

SOLVER_NAMES = ("ddim", "fixed_point", "anderson")
PREDICTORS = ("ddim", "previous", "extrapolate")


def _help(text: str) -> dict:
    """Field metadata: the command line's help for the field (`tailseed invert` builds its flags
    from these fields, so a new solver setting is a new flag without touching the CLI)."""
    return {"help": text}


@dataclass(frozen=True)
class InversionConfig:
    """How to invert. The defaults are `make augment`'s (configs/default.yaml), `tailseed invert`'s
    and the inversion benchmark's "tailseed_default" row: one set of defaults."""

    method: str = field(
        default="anderson",
        metadata=_help(
            "solver: ddim (one evaluation per step, no fixed point), fixed_point (the paper's "
            "iteration) or anderson (fixed point with Anderson acceleration: fewest evaluations)"
        ),
    )
    num_inference_steps: int = field(
        default=50,
        metadata=_help(
            "DDIM steps of the inversion grid (the paper's 50); generation uses the same"
        ),
    )
    guidance_scale: float = field(
        default=2.0,
        metadata=_help(
            "classifier-free guidance the seeds solve for (the paper's 2 for real images). 1 "
            "reconstructs best and costs half the evaluations, but its seeds follow the prompt "
            "less when walked and regenerated"
        ),
    )
    max_iters: int = field(
        default=8,
        metadata=_help("cap on evaluations of f per step, the first included; hard steps reach it"),
    )
    tol: float = field(
        default=1e-3,
        metadata=_help(
            "per-sample RMS residual |f(z) - z| at which a sample stops costing evaluations; "
            "smaller costs more evaluations for a closer round trip (research/bench_inversion.py "
            "sweeps it)"
        ),
    )
    anderson_m: int = field(
        default=3,
        metadata=_help("Anderson window: the last m residual differences (2-5 differ little)"),
    )
    adjust_strength: float = field(
        default=0.05,
        metadata=_help(
            "prompt-aware encoding adjustment, as img2img strength (the paper's 0.05; 0 disables "
            "it: better reconstruction of the image itself, seeds less consistent with the prompt)"
        ),
    )
    adjust_guidance: float = field(
        default=2.0, metadata=_help("guidance of the adjustment's denoising steps (the paper's 2)")
    )
    predictor: str = field(
        default="extrapolate",
        metadata=_help(
            "first iterate of each step after the first: ddim (the DDIM guess, the paper's; costs "
            "one evaluation), previous (the last step's noise) or extrapolate (linear in the step "
            "from the last two), both free"
        ),
    )

    def __post_init__(self) -> None:
        if self.method not in SOLVER_NAMES:
            raise ValueError(f"method: unknown {self.method!r}; use one of {list(SOLVER_NAMES)}")
        if self.num_inference_steps < 1 or self.max_iters < 1 or self.anderson_m < 1:
            raise ValueError("num_inference_steps, max_iters and anderson_m must be >= 1")
        if self.predictor not in PREDICTORS:
            raise ValueError(
                f"predictor: unknown {self.predictor!r}; use one of {list(PREDICTORS)}"
            )
        if not math.isfinite(self.tol) or self.tol < 0:
            raise ValueError(f"tol is {self.tol}; a finite number >= 0")
        if not 0 <= self.adjust_strength <= 1:
            raise ValueError(f"adjust_strength is {self.adjust_strength}; in [0, 1]")
        for name in ("guidance_scale", "adjust_guidance"):
            if not math.isfinite(getattr(self, name)):
                raise ValueError(f"{name} is {getattr(self, name)}; a finite number")
