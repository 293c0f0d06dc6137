"""An offline phase (SFT, reward model, DPO) as a job of the one run loop
(:mod:`rlhf_jax.phases.loop`): its tokenizer, data, model, optimiser and reference built from
the config, its step over the loader's batches, its held-out evaluation, and its ending
(samples, the Hugging Face export).

The batch at step k is a pure function of (seed, epoch, k) and the train state (params,
optimiser state, step, RNG) is checkpointed whole, so resuming is exact."""

from __future__ import annotations

import dataclasses
import functools
import json
from pathlib import Path
from typing import Any

import jax
import numpy as np

from rlhf_jax import __version__
from rlhf_jax.config import ConfigError
from rlhf_jax.data import Loader, load_data
from rlhf_jax.data.tokenizer import renders_prompts
from rlhf_jax.memory import program_peak_bytes
from rlhf_jax.metrics import peak_memory
from rlhf_jax.export import write_hf
from rlhf_jax.models.lora import merge_lora, without_lora
from rlhf_jax.models.pure_jit import pure_jit
from rlhf_jax.models.sharding import activation_sharding, place, rules_of
from rlhf_jax.phases import samples as sampling
from rlhf_jax.phases.audit import audit_offline
from rlhf_jax.phases.config import resolved_shared_prompt, resolved_vocab_chunk
from rlhf_jax.phases.console import log
from rlhf_jax.phases.loop import Job, RunResult, StepInfo, run_loop
from rlhf_jax.phases.protocol import Phase, ReferencePhase
from rlhf_jax.phases.reference_cache import cached_columns, ordered_batches
from rlhf_jax.plan.preflight import preflight
from rlhf_jax.rl.scorer_prompts import write_prompt_format
from rlhf_jax.run_lock import OutputDirLock
from rlhf_jax.hosts import barrier, to_host
from rlhf_jax.data.fingerprint import fingerprint as data_fingerprint
from rlhf_jax.phases.setup import (build_model, host_model, make_mesh, phase_tokenizer, put_batch, put_shared_rows,
                                   stop_token_ids)
from rlhf_jax.train import TrainState, jit_train_step, learning_rate_schedule, make_optimizer, make_train_step
from rlhf_jax.train.guard import check_nonfinite_streak


def export_hf(model, tokenizer, out: Path, what: str, *, stop_ids: tuple[int, ...], source: str | None,
              chat_prompts: bool | None = None) -> None:
    """Write ``model`` (LoRA merged), ``tokenizer`` and generation_config.json in Hugging Face
    format to ``out / "hf"`` (``export.write_hf``: ``source``'s generation config with
    ``stop_ids`` as its EOS ids); for a scorer, how its training rendered prompts
    (``chat_prompts``: its chat template, else the data's text; ``rl.scorer_prompts``).
    Every process calls it: the parameters are gathered (collective), process 0 writes, and
    the others wait for the files (a next phase reads them)."""
    model = host_model(merge_lora(model))
    if jax.process_index() == 0:
        write_hf(model, tokenizer, out / "hf", stop_ids=stop_ids, source=source)
        if chat_prompts is not None:
            write_prompt_format(out / "hf", chat=chat_prompts)
        log(f"exported the {what} model in Hugging Face format to {out / 'hf'}")
    barrier(f"{what} exported")


def run_phase(phase: Phase, config, *, resume: bool = False, stop_after: int | None = None) -> RunResult:
    """Run ``phase`` (an :class:`SFTPhase`, :class:`RMPhase` or :class:`DPOPhase`) on ``config``:
    the config audited (``phases.audit``) before anything is read, then the run, holding the
    output directory's lock (``run_lock``). Raises ``ConfigError``, ``DataError``,
    ``CheckpointError`` (user faults) and ``TrainingDiverged``."""
    audit_offline(config, phase)
    with OutputDirLock(config.output_dir, enabled=jax.process_index() == 0), activation_sharding():
        return _train(phase, config, resume=resume, stop_after=stop_after)


def _train(phase: Phase, config, *, resume: bool, stop_after: int | None) -> RunResult:
    config, job = _job(phase, config, resume=resume)
    return run_loop(job, config, resume=resume, stop_after=stop_after)


def _abstract(array: jax.Array) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(array.shape, array.dtype, sharding=array.sharding)


def _job(phase: Phase, config, *, resume: bool) -> tuple[Any, Job]:
    """``(config with its "auto" settings resolved, the phase's job)``. The job's closures hold
    the only references to the step, the reference model and the data, so the loop frees
    them by dropping the job's step and evaluation."""
    out = Path(config.output_dir)
    train_cfg = config.train
    mesh = make_mesh(config.mesh)
    preflight(phase.name, config, mesh)
    tokenizer = phase_tokenizer(config.tokenizer, config.model, needs_eos=phase.head != "score")
    model = build_model(config.model, phase.head, tokenizer=tokenizer, seed=config.seed)
    shared = resolved_shared_prompt(config.data.shared_prompt, config.data.format, model)
    config = dataclasses.replace(config, data=dataclasses.replace(config.data, shared_prompt=shared))
    scores = phase.head == "score"  # a reward model: its inputs keep their responses whole
    train_data, eval_data, reports = load_data(config.data, tokenizer, keep_responses=scores)
    for report in reports:
        log(report.summary())
    log(f"truncation policy: {config.data.truncation} ({config.data.max_length} tokens)"
        + ("; each prompt once, its responses after it (data.shared_prompt)" if shared else ""))
    chunk = resolved_vocab_chunk(config.train.vocab_chunk, model.config.vocab_size)
    config = dataclasses.replace(config, train=dataclasses.replace(config.train, vocab_chunk=chunk))
    optimizer_cfg = train_cfg.optimizer
    if optimizer_cfg.total_steps is None:
        try:
            optimizer_cfg = dataclasses.replace(optimizer_cfg, total_steps=train_cfg.steps)
        except ValueError as error:
            raise ConfigError(f"train.optimizer: {error} (train.steps)") from None
    tx = make_optimizer(optimizer_cfg)
    schedule = learning_rate_schedule(optimizer_cfg)
    state = place(TrainState.create(model, tx, jax.random.key(config.seed)), mesh)
    del model  # the state holds the arrays (placed copies on a mesh): no second reference
    reference, reference_is_base = None, False
    if isinstance(phase, ReferencePhase):
        # a LoRA policy's reference is its own base under the adapters: the same arrays, no second copy
        reference_is_base = config.model.lora is not None and phase.reference_path(config) is None
        if reference_is_base:
            reference = without_lora(state.model())
        else:
            ref_model_cfg = dataclasses.replace(config.model, lora=None)
            reference = place(build_model(ref_model_cfg, phase.head, tokenizer=tokenizer, seed=config.seed,
                                          what="reference", path=phase.reference_path(config)), mesh,
                              rules_of(mesh, frozen=True))
        if phase.precomputes_reference(config):  # the reference's outputs become data; the model goes
            splits = {"train": train_data} | ({"eval": eval_data} if eval_data is not None else {})
            fingerprint = json.dumps({"reference": phase.reference_path(config), "seed": config.seed,
                                      "model": dataclasses.asdict(config.model),
                                      "data": dataclasses.asdict(config.data),
                                      "prepare": phase.prepare_fingerprint(config)}, sort_keys=True)
            splits = cached_columns(out / "reference_logps.npz", functools.partial(phase.prepare, config), reference,
                                    splits, train_cfg.batch_size, mesh, fingerprint=fingerprint, reuse=resume)
            train_data, eval_data, reference, reference_is_base = splits["train"], splits.get("eval"), None, False
    loader = Loader(train_data, train_cfg.batch_size, train_cfg.micro_batches, seed=config.seed,
                    process_index=jax.process_index(), process_count=jax.process_count())
    step_fn = jit_train_step(make_train_step(phase.loss_fn(config, reference), tx), reference=reference,
                             prepare=functools.partial(phase.prepare, config) if reference is not None else None,
                             reference_is_base=reference_is_base)
    eval_rows = pure_jit(functools.partial(phase.eval_rows, config))
    programs: dict[tuple, int] = {}  # batch shape -> its compiled step program's peak bytes per device

    def step(state: TrainState, index: int, report: bool):
        host_batch = loader.batch(index)
        shape = (type(host_batch), tuple(np.shape(v) for v in jax.tree.leaves(host_batch)))
        batch = put_batch(host_batch, mesh)
        arguments = None if shape in programs else jax.tree.map(_abstract, state)  # before the state is donated
        state, metrics = step_fn(state, batch)
        if arguments is not None:  # XLA's analysis of the program just compiled: a cache hit, not a second compile
            programs[shape] = program_peak_bytes(step_fn.lower(arguments, batch).compile())
        if not report:
            return state, StepInfo(host_batch.tokens())
        values = {k: float(v) for k, v in to_host(metrics).items()}
        values |= {"learning_rate": float(schedule(index)), "epoch": index / loader.steps_per_epoch,
                   **peak_memory(), "step_programs": len(programs),
                   "step_program_peak_gb": max(programs.values()) / 2**30}
        check_nonfinite_streak(int(values["nonfinite_streak"]), train_cfg.max_nonfinite, step=index + 1, unit="step")
        return state, StepInfo(host_batch.tokens(), values)

    def evaluate(state: TrainState) -> dict:
        if eval_data is None:
            return {}
        model = state.model()
        frozen = without_lora(model) if reference_is_base else reference
        rows = []
        for batch, valid in ordered_batches(eval_data, train_cfg.batch_size, train_cfg.eval_batches):
            values = to_host(eval_rows(model, frozen, put_shared_rows(batch, mesh)))
            rows.append({k: v[valid] for k, v in values.items()})
        return phase.summarise(config, {k: np.concatenate([r[k] for r in rows]) for k in rows[0]})

    config_dict = dataclasses.asdict(config)
    # what fixes the data order (a resume refuses other values): recorded in every checkpoint
    data_order = {"examples": len(train_data), "seed": config.seed, "fingerprint": data_fingerprint(train_data.items)}

    def meta(position: int) -> dict:
        return {"phase": phase.name, "step": position, "version": __version__, "config": config_dict,
                "data": data_order | {"batch_size": train_cfg.batch_size, "epoch": position // loader.steps_per_epoch,
                                      "steps_per_epoch": loader.steps_per_epoch}}

    stop_ids = stop_token_ids(tokenizer, config.tokenizer, config.model.path)

    def finish(trained) -> None:
        if phase.samples and jax.process_index() == 0:
            sampling.write_samples(trained, tokenizer, eval_data or train_data, out / "samples.jsonl",
                                   count=train_cfg.samples, max_new_tokens=train_cfg.sample_tokens, seed=config.seed,
                                   stop_ids=stop_ids)
        if config.checkpoint.export_hf:
            export_hf(trained, tokenizer, out, phase.name, stop_ids=stop_ids, source=config.model.path,
                      chat_prompts=renders_prompts(tokenizer, config.data.chat_template) if phase.head == "score"
                      else None)

    data_record = {r.source: r.kept for r in reports} | {
        "skipped_malformed": sum(r.skipped_malformed for r in reports),
        "dropped_overlength": sum(r.dropped_overlength for r in reports),
        "prompts_truncated": sum(r.prompts_truncated for r in reports),
        "responses_truncated": sum(r.responses_truncated for r in reports)}
    job = Job(phase.name, "step", train_cfg.steps, train_cfg.log_every, train_cfg.eval_every,
              {"loss": "loss", "tok/s": "tokens_per_second"}, position=lambda state: int(state.step), step=step,
              evaluate=evaluate, meta=meta, trained_model=lambda state: host_model(merge_lora(state.model())),
              finish=finish, state=state, data=data_order,
              start_records={f"{phase.name}/data": data_record})
    return config, job


__all__ = ["RunResult", "run_phase"]
