"""The loop every offline phase shares: build, restore or start, step, log, evaluate,
checkpoint, stop cleanly on SIGTERM/SIGINT, export.

Resume is exact: the train state (params, optimiser state, step, RNG) is checkpointed whole,
and the batch at step k is a pure function of (seed, epoch, k), so a run stopped at step k
and resumed in a new process reaches the same state, bit for bit on CPU, as one that never
stopped."""

from __future__ import annotations

import dataclasses
import functools
import json
import signal
import threading
import time
from pathlib import Path

import jax
import numpy as np
from flax import nnx

from rlhf_jax import __version__
from rlhf_jax.checkpoint import Checkpointer, CheckpointError
from rlhf_jax.config import ConfigError
from rlhf_jax.data import Loader, load_data
from rlhf_jax.memory import release_freed_memory
from rlhf_jax.metrics import MetricsWriter, Progress, peak_rss_gb
from rlhf_jax.export import write_hf
from rlhf_jax.models.lora import merge_lora, without_lora
from rlhf_jax.models.sharding import place
from rlhf_jax.phases import samples as sampling
from rlhf_jax.phases.audit import audit_offline
from rlhf_jax.phases.config import resolved_shared_prompt, resolved_vocab_chunk
from rlhf_jax.phases.console import log
from rlhf_jax.phases.protocol import Phase, ReferencePhase
from rlhf_jax.phases.reference_cache import cached_columns, ordered_batches
from rlhf_jax.run_lock import OutputDirLock
from rlhf_jax.hosts import barrier, to_host
from rlhf_jax.phases.setup import build_model, host_model, make_mesh, phase_tokenizer, put_batch, put_shared_rows
from rlhf_jax.train import TrainState, jit_train_step, learning_rate_schedule, make_optimizer, make_train_step
from rlhf_jax.train.guard import check_nonfinite_streak


@dataclasses.dataclass
class RunResult:
    step: int
    stopped_by: str | None  # "SIGTERM", "SIGINT", "stop_after", or None when the phase finished
    eval: dict
    output_dir: Path


class StopRequests:
    """Turns SIGTERM / SIGINT into a flag the loop checks after each step."""

    def __init__(self):
        self.signal: str | None = None
        self._previous = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGTERM, signal.SIGINT):
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def _handle(self, signum, frame):
        self.signal = signal.Signals(signum).name

    def __exit__(self, *exc):
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)


def _config_differences(saved: dict, current: dict, prefix: str = "") -> list[str]:
    keys = sorted(set(saved) | set(current))
    out = []
    for key in keys:
        a, b = saved.get(key), current.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _config_differences(a, b, f"{prefix}{key}.")
        elif a != b and not (isinstance(a, list) and isinstance(b, tuple) and a == list(b)):
            out.append(f"{prefix}{key}: {a!r} -> {b!r}")
    return out


def restore_or_start(checkpointer: Checkpointer, state, *, resume: bool, config_dict: dict, data: dict):
    """The latest checkpoint's state with ``--resume`` (an error when ``data`` -- the numbers
    that fix the data order -- differs from the checkpoint's, since resuming would not be
    exact); ``state`` itself when starting. Starting over existing checkpoints is refused."""
    existing = checkpointer.steps()
    if resume and existing:
        state, meta = checkpointer.restore(state)
        saved = {key: meta["data"].get(key) for key in data}
        if saved != data:
            raise CheckpointError(f"the data changed since the checkpoint ({saved} then, {data} now), so resuming "
                                  "would not be exact")
        for difference in _config_differences(meta["config"], config_dict):
            log(f"config differs from the checkpoint's: {difference}")
        log(f"resumed from {checkpointer.directory / str(meta['step'])} at step {meta['step']}")
    elif resume:
        log(f"--resume: no checkpoint in {checkpointer.directory}, starting at step 0")
    elif existing:
        raise CheckpointError(f"{checkpointer.directory} already holds checkpoints (steps {existing}); pass --resume "
                              "to continue that run, or choose another output_dir")
    return state


def close_checkpoints(checkpointer, writer, state, step: int, saved_step, meta, stopped_by, unit: str,
                      out: Path) -> RunResult | None:
    """End of a loop: save ``state`` unless step ``step`` is saved already, wait for the
    writes; after a stop, close the metrics, say how to resume and return the result."""
    if saved_step != step:
        checkpointer.save(step, state, meta(step), force=True)
    checkpointer.close()
    if stopped_by is None:
        return None
    writer.close()
    log(f"stopped at {unit} {step} ({stopped_by}); checkpoint saved in {checkpointer.directory}. "
        "Resume with the same command plus --resume")
    return RunResult(step, stopped_by, {}, out)


def log_evaluation(writer, step: int, values: dict, kind: str) -> None:
    if values:
        writer.write(step, values, kind)
        log("held-out: " + ", ".join(f"{k} {v:.4g}" for k, v in values.items()))


def export_hf(model, tokenizer, out: Path, what: str) -> None:
    """Write ``model`` (LoRA merged), ``tokenizer`` and generation_config.json in Hugging Face
    format to ``out / "hf"`` (``export.write_hf``).
    Every process calls it: the parameters are gathered (collective), process 0 writes, and
    the others wait for the files (a next stage reads them)."""
    model = host_model(merge_lora(model))
    if jax.process_index() == 0:
        write_hf(model, tokenizer, out / "hf")
        log(f"exported the {what} model in Hugging Face format to {out / 'hf'}")
    barrier(f"{what} exported")


def run_phase(phase: Phase, config, *, resume: bool = False, stop_after: int | None = None) -> RunResult:
    """Run ``phase`` (an :class:`SFTPhase`, :class:`RMPhase` or :class:`DPOPhase`) on ``config``:
    the config audited (``phases.audit``) before anything is read, then the run, holding the
    output directory's lock (``run_lock``). Raises ``ConfigError``, ``DataError``,
    ``CheckpointError`` (user faults) and ``TrainingDiverged``."""
    audit_offline(config, phase)
    with OutputDirLock(config.output_dir, enabled=jax.process_index() == 0):
        return _train(phase, config, resume=resume, stop_after=stop_after)


def _train(phase: Phase, config, *, resume: bool, stop_after: int | None) -> RunResult:
    out = Path(config.output_dir)
    train_cfg = config.train
    mesh = make_mesh(config.mesh)
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
                                          what="reference", path=phase.reference_path(config)), mesh)
        if phase.precomputes_reference(config):  # the reference's outputs become data; the model goes
            splits = {"train": train_data} | ({"eval": eval_data} if eval_data is not None else {})
            fingerprint = json.dumps({"reference": phase.reference_path(config), "model": dataclasses.asdict(config.model),
                                      "data": dataclasses.asdict(config.data), "seed": config.seed}, sort_keys=True)
            splits = cached_columns(out / "reference_logps.npz", functools.partial(phase.prepare, config), reference,
                                    splits, train_cfg.batch_size, mesh, fingerprint=fingerprint, reuse=resume)
            train_data, eval_data, reference, reference_is_base = splits["train"], splits.get("eval"), None, False
    loader = Loader(train_data, train_cfg.batch_size, train_cfg.micro_batches, seed=config.seed,
                    process_index=jax.process_index(), process_count=jax.process_count())

    config_dict = dataclasses.asdict(config)
    checkpointer = Checkpointer(out / "checkpoints", every=config.checkpoint.every, keep=config.checkpoint.keep,
                                async_save=config.checkpoint.async_save)
    existing = checkpointer.steps()
    state = restore_or_start(checkpointer, state, resume=resume, config_dict=config_dict,
                             data={"examples": len(train_data), "seed": config.seed})

    step_fn = jit_train_step(make_train_step(phase.loss_fn(config, reference), tx), reference=reference,
                             prepare=functools.partial(phase.prepare, config) if reference is not None else None,
                             reference_is_base=reference_is_base)
    eval_rows = nnx.jit(functools.partial(phase.eval_rows, config))

    def evaluate(state) -> dict:
        if eval_data is None:
            return {}
        model = state.model()
        frozen = without_lora(model) if reference_is_base else reference
        rows = []
        for batch, valid in ordered_batches(eval_data, train_cfg.batch_size, train_cfg.eval_batches):
            values = to_host(eval_rows(model, frozen, put_shared_rows(batch, mesh)))
            rows.append({k: v[valid] for k, v in values.items()})
        return phase.summarise(config, {k: np.concatenate([r[k] for r in rows]) for k in rows[0]})

    def meta(step: int) -> dict:
        return {"phase": phase.name, "step": step, "version": __version__, "config": config_dict,
                "data": {"seed": config.seed, "examples": len(train_data), "batch_size": train_cfg.batch_size,
                         "epoch": step // loader.steps_per_epoch, "steps_per_epoch": loader.steps_per_epoch}}

    writer = MetricsWriter(config.metrics, out, run_config=config_dict, enabled=jax.process_index() == 0)
    start = int(state.step)
    if start == 0:
        writer.write(0, {r.source: r.kept for r in reports} | {"skipped_malformed": sum(r.skipped_malformed for r in reports),
                         "dropped_overlength": sum(r.dropped_overlength for r in reports),
                         "prompts_truncated": sum(r.prompts_truncated for r in reports),
                         "responses_truncated": sum(r.responses_truncated for r in reports)}, f"{phase.name}/data")
    progress = Progress(config.metrics.progress and jax.process_index() == 0, total=train_cfg.steps, initial=start,
                        description=phase.name)
    stopped_by, saved_step = None, start if resume and existing else None
    tick, tokens = time.perf_counter(), 0
    shapes: set[tuple] = set()  # the batch shapes met: one compiled step program each
    with StopRequests() as stop:
        for step in range(start, train_cfg.steps):
            host_batch = loader.batch(step)
            tokens += host_batch.tokens()
            shapes.add((type(host_batch), tuple(np.shape(v) for v in jax.tree.leaves(host_batch))))
            state, metrics = step_fn(state, put_batch(host_batch, mesh))
            release_freed_memory()  # the last step's freed scratch, before this one's lands on top of it
            done = step + 1
            if done % train_cfg.log_every == 0 or done == train_cfg.steps:
                values = {k: float(v) for k, v in to_host(metrics).items()}
                elapsed = time.perf_counter() - tick
                values |= {"learning_rate": float(schedule(step)), "tokens_per_second": tokens / elapsed,
                           "seconds_per_step": elapsed / train_cfg.log_every, "epoch": step / loader.steps_per_epoch,
                           "peak_rss_gb": peak_rss_gb(), "step_programs": len(shapes)}
                writer.write(done, values, f"{phase.name}/train")
                progress.update({"loss": values["loss"], "tok/s": values["tokens_per_second"]})
                tick, tokens = time.perf_counter(), 0
                check_nonfinite_streak(int(values["nonfinite_streak"]), train_cfg.max_nonfinite, step=done,
                                       unit="step", checkpoint_dir=checkpointer.directory)
            if train_cfg.eval_every and done % train_cfg.eval_every == 0 and done < train_cfg.steps:
                writer.write(done, evaluate(state), f"{phase.name}/eval")
            if checkpointer.save(done, state, meta(done)):
                saved_step = done
            if stop.signal or (stop_after is not None and done >= stop_after and done < train_cfg.steps):
                stopped_by = stop.signal or "stop_after"
                break
    progress.close()
    step = int(state.step)
    try:  # the final evaluation first, so the final checkpoint is written without the reference in memory
        final = evaluate(state) if stopped_by is None else {}
        step_fn = reference = None
    finally:
        stopped = close_checkpoints(checkpointer, writer, state, step, saved_step, meta, stopped_by, "step", out)
    if stopped is not None:
        return stopped
    log_evaluation(writer, step, final, f"{phase.name}/eval")
    trained = host_model(merge_lora(state.model()))
    state = None  # the optimiser moments freed before the samples and the export
    if phase.samples and jax.process_index() == 0:
        sampling.write_samples(trained, tokenizer, eval_data or train_data, out / "samples.jsonl",
                               count=train_cfg.samples, max_new_tokens=train_cfg.sample_tokens, seed=config.seed)
    if config.checkpoint.export_hf:
        export_hf(trained, tokenizer, out, phase.name)
    writer.close()
    return RunResult(step, None, final, out)


__all__ = ["RunResult", "run_phase"]
