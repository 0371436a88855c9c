"""Sampler registry: a name -> which diffusers scheduler class, with which extra settings.

Schedulers are built with `from_config(model_scheduler.config)`, so the model's noise schedule and
its prediction type (epsilon or v-prediction for SD 2.x 768 models) carry over to every sampler.
`flow_euler` is for flow-matching families (SD3); each family lists the samplers that fit it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from synthcxr.errors import did_you_mean


@dataclass(frozen=True)
class SchedulerSpec:
    class_name: str
    """Name of the scheduler class in `diffusers`."""
    options: dict[str, Any] = field(default_factory=dict)
    """Settings that distinguish this sampler from the class defaults."""


SCHEDULERS: dict[str, SchedulerSpec] = {
    "ddim": SchedulerSpec("DDIMScheduler"),
    "dpmsolver++": SchedulerSpec("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2}),
    "euler": SchedulerSpec("EulerDiscreteScheduler"),
    "euler_a": SchedulerSpec("EulerAncestralDiscreteScheduler"),
    "pndm": SchedulerSpec("PNDMScheduler", {"skip_prk_steps": True}),
    "unipc": SchedulerSpec("UniPCMultistepScheduler"),
    "flow_euler": SchedulerSpec("FlowMatchEulerDiscreteScheduler"),
}


def check_scheduler_name(name: str) -> str:
    """Return `name` when known; otherwise raise ValueError with a "did you mean" (for config validation)."""
    if name in SCHEDULERS:
        return name
    hint = did_you_mean(name.lower(), SCHEDULERS, cutoff=0.5)
    raise ValueError(f"unknown scheduler {name!r}{hint}; choose one of {', '.join(SCHEDULERS)}")


def make_scheduler(name: str, model_scheduler_config: Any):
    """A fresh scheduler of the named kind, configured like the model's own scheduler."""
    import diffusers

    spec = SCHEDULERS[check_scheduler_name(name)]
    cls = getattr(diffusers, spec.class_name)
    options = dict(spec.options)
    flow_shift = dict(model_scheduler_config).get("flow_shift")
    if spec.class_name == "FlowMatchEulerDiscreteScheduler" and flow_shift and "shift" not in model_scheduler_config:
        options["shift"] = flow_shift  # a DPM-Solver flow config (Sana) names its shift flow_shift
    return cls.from_config(model_scheduler_config, **options)
