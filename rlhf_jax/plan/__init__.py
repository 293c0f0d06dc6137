"""``rlhf-jax plan PHASE CONFIG``: does the run fit its devices? Every program the run will
compile is built with abstract parameters and batches (:mod:`.programs`), compiled for the
target (:mod:`.targets`: a Cloud TPU slice through libtpu on this host, or fake CPU devices)
and measured from XLA's own analysis -- per device: parameters, optimizer state, arguments,
outputs, temporaries and the peak; the collectives; the matrix-multiply FLOPs per step with
every loop counted as often as it runs (:mod:`.flops`; XLA's cost analysis counts a loop body
once), and the model-FLOPs share, what the models' passes need (PaLM's 6 N T plus attention)
over what the program computes (the rest is remat's recomputation) -- the way MaxText's
``train_compile`` checks a config for a pod before paying for it. A TPU program that cannot
fit fails to compile (RESOURCE_EXHAUSTED) and is reported with the bytes it needed."""

from __future__ import annotations

import dataclasses
import re

from rlhf_jax.memory import program_peak_bytes
from rlhf_jax.models.attention import compiling_for
from rlhf_jax.models.sharding import activation_sharding
from rlhf_jax.plan.flops import matmul_flops
from rlhf_jax.plan.programs import Program
from rlhf_jax.plan.targets import GIB, Target, cpu_target, tpu_target

COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")
SHRINK = {  # the largest term of a program that does not fit -> the knobs that shrink it
    "parameters": "more mesh.fsdp or mesh.tensor, LoRA (model.lora), bf16 weights (model.param_dtype: bfloat16)",
    "optimizer": "more mesh.fsdp or mesh.tensor, LoRA (model.lora: only the adapters carry Adam moments)",
    "temporaries": "model.remat: block (when none), more micro-batches (train.micro_batches; an online algorithm's "
                   "micro_batches), shorter sequences (data.max_length, rollout.max_new_tokens), a smaller "
                   "train.vocab_chunk, DPO's reference precomputed (dpo.reference_logps: precompute)",
    "batch": "more train.micro_batches or a smaller train.batch_size",
    "held beside it": "more mesh.fsdp or mesh.tensor, LoRA (model.lora), a smaller rollout.max_policy_lag (each "
                      "lag keeps a copy of the trained weights), no mesh.sampler_rules (a second copy of the policy)",
}


@dataclasses.dataclass(frozen=True)
class Measured:
    """One program's per-device bytes (``None`` where the compile failed), FLOPs and collectives:
    ``flops`` the matrix-multiply FLOPs per device per step, loops counted by their trip counts
    (a lower bound when ``uncounted_loops`` > 0: loops of unknown length counted once);
    ``xla_flops`` XLA's cost analysis (all operations, each loop body once); ``model_flops``
    what the models' passes need per device (``None`` where not counted: a sampler, a critic's
    update, LoRA, a GPU, whose matrix products are cuBLAS calls the count cannot see) and
    ``model_flops_share`` its ratio to ``flops`` (without attention on the model's side when
    the program's attention is a custom kernel, ``custom_kernels`` > 0, whose FLOPs the count
    cannot see either)."""

    name: str
    fits: bool
    peak_bytes: int | None
    parameter_bytes: int
    optimizer_bytes: int
    argument_bytes: int | None = None
    output_bytes: int | None = None
    temporary_bytes: int | None = None
    flops: float | None = None
    collectives: dict | None = None
    error: str | None = None
    resident_bytes: int = 0  # held beside the program while it runs (in peak_bytes)
    xla_flops: float | None = None
    uncounted_loops: int = 0
    custom_kernels: int = 0
    model_flops: float | None = None
    model_flops_share: float | None = None

    @classmethod
    def of_entry(cls, entry: dict) -> Measured:
        """A program's entry of :func:`plan`'s result (its fields and ``peak_bytes_per_device``)."""
        return cls(**{k: v for k, v in entry.items() if k != "peak_bytes_per_device"})

    def largest_term(self) -> str:
        """Which of parameters, optimizer state, temporaries, the batch and what the run holds
        beside the program weighs most."""
        batch = (self.argument_bytes or 0) - self.parameter_bytes - self.optimizer_bytes
        terms = {"parameters": self.parameter_bytes, "optimizer": self.optimizer_bytes,
                 "temporaries": self.temporary_bytes or 0, "batch": max(batch, 0),
                 "held beside it": self.resident_bytes}
        if self.temporary_bytes is None:  # the compile failed: its temporaries are what did not fit
            return "temporaries" if self.parameter_bytes + self.optimizer_bytes < 0.5 * (self.peak_bytes or 0) \
                else max(terms, key=terms.get)
        return max(terms, key=terms.get)


def _needed_bytes(message: str) -> int | None:
    """The bytes a RESOURCE_EXHAUSTED compile said it needed (``... (38.48G) exceeds ...``)."""
    found = re.search(r"\((\d+(?:\.\d+)?)([KMGT])\) exceeds", message) or re.search(
        r"[Uu]sed (\d+(?:\.\d+)?)([KMGT]) of", message)
    if found is None:
        return None
    return int(float(found.group(1)) * {"K": 2**10, "M": 2**20, "G": GIB, "T": 2**40}[found.group(2)])


def measure(program: Program, target: Target) -> Measured:
    """Compile ``program`` for ``target`` and read XLA's memory and cost analysis; a compile
    that runs out of device memory is a program that does not fit."""
    try:
        compiled = program.lower().compile()
    except Exception as error:  # XlaRuntimeError: what libtpu says when the program cannot fit
        message = str(error)
        if "RESOURCE_EXHAUSTED" not in message and "exceeds" not in message:
            raise
        line = next((x for x in message.splitlines() if "exceed" in x or "RESOURCE_EXHAUSTED" in x), message)
        return Measured(program.name, False, _needed_bytes(message), program.parameter_bytes, program.optimizer_bytes,
                        error=line.strip()[:300], resident_bytes=program.resident_bytes)
    memory, peak = compiled.memory_analysis(), program_peak_bytes(compiled)
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    text = compiled.as_text()
    collectives = {name: len(re.findall(rf"\b{name}(?:-start)?\(", text)) for name in COLLECTIVES}
    peak += program.resident_bytes
    counted = matmul_flops(text)
    model = share = None
    if program.model_flops is not None and target.platform in ("cpu", "tpu"):  # a GPU's dots are library calls
        model, attention = (x / len(target.devices) for x in program.model_flops)
        # a custom attention kernel's FLOPs are not in the count: compare the weights' with the weights'
        compared = model - attention if counted.custom_kernels else model
        share = compared / counted.flops if counted.flops and not counted.uncounted_loops else None
    return Measured(program.name, peak <= target.memory_bytes, int(peak), program.parameter_bytes,
                    program.optimizer_bytes, int(memory.argument_size_in_bytes), int(memory.output_size_in_bytes),
                    int(memory.temp_size_in_bytes), counted.flops, {k: v for k, v in collectives.items() if v},
                    resident_bytes=program.resident_bytes, xla_flops=float((cost or {}).get("flops", 0.0)),
                    uncounted_loops=counted.uncounted_loops, custom_kernels=counted.custom_kernels,
                    model_flops=model, model_flops_share=share)


def plan(phase_name: str, config, target: Target) -> dict:
    """The plan of running ``phase_name`` on ``config`` on ``target``: ``{"fits", "target",
    "device_memory_bytes", "devices", "mesh", "programs": [...]}``. Raises ``ConfigError`` for
    a config the target's mesh cannot hold and for a phase not planned yet."""
    from rlhf_jax.phases import PHASES
    from rlhf_jax.phases.setup import make_mesh
    from rlhf_jax.plan.programs import offline_programs, online_programs

    with activation_sharding(), compiling_for(target.platform):  # kernels chosen for the target, not this host
        mesh = make_mesh(config.mesh, devices=target.devices)
        built = online_programs(config, mesh) if phase_name not in PHASES else offline_programs(
            PHASES[phase_name], config, mesh)
        programs = [measure(p, target) for p in built]
    return {"fits": all(p.fits for p in programs), "target": target.name, "device_memory_bytes": target.memory_bytes,
            "devices": len(target.devices), "mesh": dict(mesh.shape),
            "programs": [dataclasses.asdict(p) | {"peak_bytes_per_device": p.peak_bytes} for p in programs]}


def describe(result: dict) -> list[str]:
    """The plan as console lines: one per program, then the verdict and, for a program that
    does not fit, its largest term and the knobs that shrink it."""
    def gb(n):
        if n is None:
            return "?"
        return f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.2f} MB"

    mesh = " x ".join(f"{k}={v}" for k, v in result["mesh"].items())
    lines = [f"plan for {result['target']} ({result['devices']} devices of {gb(result['device_memory_bytes'])}, "
             f"mesh {mesh}), per device:"]
    for p in result["programs"]:
        measured = Measured.of_entry(p)
        if p["error"] is not None:
            lines.append(f"  {p['name']}: does not fit: needs {gb(p['peak_bytes'])} ({p['error']}); parameters "
                         f"{gb(p['parameter_bytes'])}, optimizer state {gb(p['optimizer_bytes'])}")
        else:
            flops = (f"{'>= ' if p['uncounted_loops'] else ''}{p['flops']:.3g}" if p["flops"] else "?") + (
                f" (model FLOPs {p['model_flops_share']:.0%} of them"
                + (", attention in custom kernels left out of both" if p["custom_kernels"] else "") + ")"
                if p["model_flops_share"] else "")
            lines.append(f"  {p['name']}: peak {gb(p['peak_bytes'])} = arguments {gb(p['argument_bytes'])} (parameters "
                         f"{gb(p['parameter_bytes'])}, optimizer state {gb(p['optimizer_bytes'])}) + outputs "
                         f"{gb(p['output_bytes'])} - donated + temporaries {gb(p['temporary_bytes'])}"
                         + (f" + held beside it {gb(p['resident_bytes'])}" if p["resident_bytes"] else "")
                         + f"; {flops} matmul FLOPs "
                         f"per device per step; collectives {p['collectives'] or 'none'}")
        if not p["fits"]:
            term = measured.largest_term()
            lines.append(f"    the largest term is {term}; to shrink it: {SHRINK[term]}")
    lines.append("fits" if result["fits"] else "does not fit")
    return lines


__all__ = ["Measured", "Target", "cpu_target", "describe", "measure", "plan", "tpu_target"]
