"""``rlhf-jax report RUN_DIR``: ``RUN_DIR/report.md`` with PNG plots (matplotlib) of the run's
metric curves from ``metrics.jsonl`` -- loss, reward, KL, accuracy, ... one figure per kind of
line (``dpo/train``, ``ppo/eval``, ...) -- the final evaluation, and sample completions: before
and after training side by side when ``rlhf-jax evaluate`` wrote ``RUN_DIR/evaluation/``, else
the completions the run sampled at its end (``samples.jsonl``).

:func:`write_pipeline_report`: the report ``rlhf-jax pipeline`` ends with -- the policy's gold
and proxy reward and its KL per iteration, the reward model's accuracy, and the SFT and final
policies' answers to the same held-out prompts."""

from __future__ import annotations

import json
import math
from pathlib import Path

from rlhf_jax.config import ConfigError
from rlhf_jax.evaluation.judge_validity import judge_verdict
from rlhf_jax.metrics import read_rows
from rlhf_jax.phases.console import log

# the curves worth a panel, in this order, when a kind of line has them
CURVES = ("loss", "reward_accuracy", "reward_margin", "accuracy", "margin", "score_mean", "kl", "beta", "entropy",
          "policy_loss", "value_loss", "clip_fraction", "completion_length", "grad_norm", "learning_rate",
          "perplexity", "win_rate")
SAMPLES = 4


def read_metrics(path: Path) -> dict[str, dict[str, list[tuple[int, float]]]]:
    """``{kind: {metric: [(step, value), ...]}}`` from a ``metrics.jsonl`` (finite numbers only;
    the cut last line a killed run leaves is left out, and said so). Raises ``ConfigError``
    when the file is missing or another line is not a metrics row."""
    if not path.is_file():
        raise ConfigError(f"{path} does not exist; give the output_dir of a finished or running rlhf-jax run")
    try:
        rows, cut = read_rows(path)
    except ValueError as error:
        raise ConfigError(f"{error}; is this an rlhf-jax metrics file?") from None
    if cut:
        log(f"{path}: its last line is cut short (the run was killed while writing it); left out")
    series: dict[str, dict[str, list[tuple[int, float]]]] = {}
    for row in rows:
        kind = series.setdefault(str(row.get("kind", "metrics")), {})
        for name, value in row.items():
            if name not in ("step", "kind") and isinstance(value, int | float) and math.isfinite(value):
                kind.setdefault(name, []).append((row.get("step", 0), float(value)))
    return series


def _pyplot():
    """matplotlib's pyplot on the file-only Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(figure, path: Path) -> Path:
    """``figure`` laid out, written to ``path`` as a PNG and closed."""
    figure.tight_layout()
    figure.savefig(path, dpi=90)
    _pyplot().close(figure)
    return path


def _figure(panels: list[tuple[str, dict[str, list[tuple[int, float]]]]], title: str, path: Path) -> Path:
    """One PNG of ``panels`` side by side, each ``(title, {label: [(step, value), ...]})`` with
    a line per label against the step."""
    plt = _pyplot()

    figure, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 3.2), squeeze=False)
    for axis, (name, lines) in zip(axes.flat, panels):
        for label, points in lines.items():
            steps, values = zip(*points)
            axis.plot(steps, values, marker="." if len(steps) < 30 else None, label=label)
        axis.set_title(name)
        axis.set_xlabel("step")
        axis.grid(alpha=0.3)
        if len(lines) > 1:
            axis.legend()
    figure.suptitle(title)
    return _save(figure, path)


def plot_kind(kind: str, metrics: dict[str, list[tuple[int, float]]], out: Path) -> Path | None:
    """One PNG of ``kind``'s :data:`CURVES` against the step; ``None`` when it has none of them
    with two or more points."""
    plt = _pyplot()

    names = [name for name in CURVES if len(metrics.get(name, ())) >= 2]
    if not names:
        return None
    columns = min(3, len(names))
    rows = -(-len(names) // columns)
    figure, axes = plt.subplots(rows, columns, figsize=(4 * columns, 2.8 * rows), squeeze=False)
    for axis, name in zip(axes.flat, names):
        steps, values = zip(*metrics[name])
        axis.plot(steps, values, marker="." if len(steps) < 30 else None)
        axis.set_title(name)
        axis.set_xlabel("step")
        axis.grid(alpha=0.3)
    for axis in list(axes.flat)[len(names):]:
        axis.set_visible(False)
    figure.suptitle(kind)
    return _save(figure, out / f"{kind.replace('/', '_')}.png")


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


def _quote(text: str, limit: int = 600) -> str:
    text = text if len(text) <= limit else text[:limit] + " [...]"
    return "\n".join("> " + line for line in (text.strip() or "(empty)").splitlines())


def _number(value, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def _evaluation(run_dir: Path) -> dict | None:
    """``RUN_DIR/evaluation/evaluation.json``'s metrics; ``None`` when there is no evaluation.
    Raises ``ConfigError`` for an evaluation directory without a readable one."""
    folder = run_dir / "evaluation"
    if not folder.is_dir():
        return None
    try:
        return json.loads((folder / "evaluation.json").read_text())["metrics"]
    except (OSError, json.JSONDecodeError, KeyError, TypeError):
        raise ConfigError(f"{folder} has no readable evaluation.json; rerun rlhf-jax evaluate with output_dir "
                          f"{folder}, or move the folder away") from None


def _samples_section(run_dir: Path) -> list[str]:
    evaluation = _evaluation(run_dir)
    pairs = _jsonl(run_dir / "evaluation" / "evaluation_samples.jsonl") if evaluation is not None else []
    if pairs:
        lines = ["## Before and after (`rlhf-jax evaluate`)", "", f"**{judge_verdict(evaluation)}.**", "",
                 f"Win rate of the trained policy over the starting one: **{_number(evaluation['win_rate'])}** "
                 f"(95% CI [{_number(evaluation['win_rate_low'])}, {_number(evaluation['win_rate_high'])}], "
                 f"n = {evaluation['win_rate_n']:.0f}); at matched length "
                 f"{_number(evaluation['matched_length_win_rate'])} over {evaluation['matched_length_win_rate_n']:.0f} "
                 f"pairs; KL {_number(evaluation['kl'])} nats.", ""]
        if evaluation.get("accuracy_gain") is not None:
            lines[-1:-1] = [f"Accuracy (a 0/1 judge): **{_number(evaluation['accuracy_policy'])}** after against "
                            f"{_number(evaluation['accuracy_baseline'])} before, a gain of "
                            f"{_number(evaluation['accuracy_gain'])} (95% CI [{_number(evaluation['accuracy_gain_low'])}, "
                            f"{_number(evaluation['accuracy_gain_high'])}]).", ""]
        for i, pair in enumerate(pairs[:SAMPLES], start=1):
            lines += [f"### Prompt {i}", "", _quote(pair["prompt"]), "",
                      f"**Before** (judge score {pair['score_baseline']:.3f}):", "", _quote(pair["completion_baseline"]), "",
                      f"**After** (judge score {pair['score_policy']:.3f}):", "", _quote(pair["completion_policy"]), ""]
        return lines
    samples = _jsonl(run_dir / "samples.jsonl")
    if not samples:
        return []
    lines = ["## Samples at the end of the run", "",
             "(run `rlhf-jax evaluate` with output_dir RUN_DIR/evaluation for before / after pairs)", ""]
    for i, sample in enumerate(samples[:SAMPLES], start=1):
        score = f" (score {sample['score']:.3f})" if "score" in sample else ""
        lines += [f"### Prompt {i}", "", _quote(sample["prompt"]), "", f"**Completion**{score}:", "",
                  _quote(sample["completion"]), ""]
    return lines


def write_report(run_dir: str | Path) -> Path:
    """Write ``run_dir/report.md`` and its plots under ``run_dir/report/``; returns the report's
    path. Raises ``ConfigError`` when ``run_dir`` has no readable ``metrics.jsonl``."""
    run_dir = Path(run_dir)
    series = read_metrics(run_dir / "metrics.jsonl")
    figures = run_dir / "report"
    figures.mkdir(exist_ok=True)
    lines = [f"# Run report: {run_dir.name}", ""]
    for kind, metrics in series.items():
        plot = plot_kind(kind, metrics, figures)
        if plot is not None:
            lines += [f"## {kind}", "", f"![{kind}](report/{plot.name})", ""]
        if kind.endswith("/train") and all(len(metrics.get(name, ())) >= 5 for name in
                                           ("kl", "score_mean", "monitor_score_mean")):
            lines += _overoptimisation_section(overoptimisation_curve(metrics), figures)
    if not any(name.endswith(".png") for name in map(str, figures.iterdir())):
        lines += ["(No curve has two points yet: nothing to plot.)", ""]
    finals = {kind: {name: values[-1] for name, values in metrics.items()}
              for kind, metrics in series.items() if kind.endswith("/eval")}
    for kind, final in finals.items():
        lines += [f"## Final {kind}", "", "| metric | value | step |", "| ------ | ----: | ---: |"]
        lines += [f"| {name} | {value:.4g} | {step} |" for name, (step, value) in final.items()] + [""]
    lines += _samples_section(run_dir)
    path = run_dir / "report.md"
    path.write_text("\n".join(lines))
    return path


def overoptimisation_curve(metrics: dict[str, list[tuple[int, float]]], window: int = 5) -> dict:
    """Reward over-optimisation (Gao et al., 2022) read off a policy phase's per-iteration
    training metrics: the KL to the reference (``kl``, nats), the proxy it optimised
    (``score_mean``) and the gold reward it never saw (``monitor_score_mean``), each a moving
    average over ``window`` iterations (the batches are small); the gold's peak, the KL and
    proxy there, and the last values. Raises ``ConfigError`` when a series is missing."""
    import numpy as np

    names = {"kl": "kl", "proxy": "score_mean", "gold": "monitor_score_mean"}
    if any(len(metrics.get(name, ())) < window for name in names.values()):
        raise ConfigError(f"the over-optimisation curve needs kl, score_mean and monitor_score_mean (reward.monitor) "
                          f"over at least {window} iterations")
    kernel = np.ones(window) / window
    curve = {key: np.convolve([v for _, v in metrics[name]], kernel, mode="valid") for key, name in names.items()}
    peak = int(np.argmax(curve["gold"]))
    return {"series": {key: values.tolist() for key, values in curve.items()}, "window": window,
            "gold_peak": float(curve["gold"][peak]), "kl_at_gold_peak": float(curve["kl"][peak]),
            "proxy_at_gold_peak": float(curve["proxy"][peak]), "gold_final": float(curve["gold"][-1]),
            "kl_final": float(curve["kl"][-1]), "proxy_final": float(curve["proxy"][-1])}


def _overoptimisation_figure(curve: dict, path: Path) -> Path:
    """Gold (left axis) and proxy (right axis) reward against the KL reached."""
    plt = _pyplot()

    series = curve["series"]
    figure, gold_axis = plt.subplots(figsize=(6, 3.6))
    gold_axis.plot(series["kl"], series["gold"], color="tab:blue", label="gold (task)")
    gold_axis.set_xlabel(f"KL to the reference (nats; {curve['window']}-iteration moving averages)")
    gold_axis.set_ylabel("gold reward", color="tab:blue")
    proxy_axis = gold_axis.twinx()
    proxy_axis.plot(series["kl"], series["proxy"], color="tab:orange", label="proxy (reward model)")
    proxy_axis.set_ylabel("proxy reward", color="tab:orange")
    gold_axis.axvline(curve["kl_at_gold_peak"], color="grey", linestyle=":", linewidth=1)
    gold_axis.grid(alpha=0.3)
    figure.suptitle("reward over-optimisation: gold and proxy against KL")
    return _save(figure, path)


def _overoptimisation_section(curve: dict, figures: Path, title: str = "Gold and proxy against the KL") -> list[str]:
    """The report's lines on an over-optimisation curve (:func:`overoptimisation_curve`): its
    plot, the gold reward's peak and its last value, each with the KL and the proxy there."""
    path = _overoptimisation_figure(curve, figures / "overoptimisation.png")
    return [f"## {title}", "", f"![over-optimisation](report/{path.name})", "",
            f"The gold reward peaked at {curve['gold_peak']:.3f} at KL {curve['kl_at_gold_peak']:.1f} nats (proxy "
            f"{curve['proxy_at_gold_peak']:.3f}) and ended at {curve['gold_final']:.3f} at KL {curve['kl_final']:.1f} "
            f"(proxy {curve['proxy_final']:.3f}); moving averages over {curve['window']} iterations.", ""]


def write_pipeline_report(out: Path, phases: tuple[str, ...], summary: dict, examples: dict[str, list[dict]],
                          curve: dict | None = None, *, start: str = "sft", reward_model: str | None = None) -> Path:
    """``out/report.md`` of a built-in pipeline run and its plots under ``out/report/``: the final
    phase's gold reward (the task's, ``reward.monitor``) beside the proxy it optimised (the
    reward model's score) and its KL to the reference, per iteration; the held-out accuracy of
    the phase ``reward_model`` (None: none); the summary's table; and the starting phase's
    (``start``, SFT) and the final policy's answers to the same held-out prompts (``examples``:
    policy name -> ``[{prompt, completion, gold_reward}]``); with an over-optimisation run's
    ``curve`` (:func:`overoptimisation_curve`), its plot. Returns the report's path."""
    out, final = Path(out), phases[-1]
    figures = out / "report"
    figures.mkdir(exist_ok=True)
    lines = [f"# Pipeline report: {' -> '.join(phases)} on the {summary['task']} task", ""]
    policy = read_metrics(out / final / "metrics.jsonl").get(f"{final}/train", {})
    rewards = {label: policy[name] for label, name in (("gold (task)", "monitor_score_mean"),
                                                        ("proxy (reward model)", "score_mean")) if policy.get(name)}
    panels = [("reward", rewards)] if rewards else []
    if policy.get("kl"):
        panels.append(("KL to the reference (nats)", {"kl": policy["kl"]}))
    if panels:
        path = _figure(panels, f"{final}: per iteration", figures / f"{final}_rewards.png")
        lines += [f"## {final}: gold and proxy reward, KL", "", f"![{final}](report/{path.name})", ""]
    if curve is not None:
        lines += _overoptimisation_section(curve, figures, title="Over-optimisation (no KL penalty)")
    if reward_model is not None:
        rm = read_metrics(out / reward_model / "metrics.jsonl")
        accuracy = {kind.split("/")[1]: m["accuracy"] for kind, m in rm.items() if m.get("accuracy")}
        if accuracy:
            path = _figure([("accuracy", accuracy)], "reward model: pairwise accuracy", figures / "rm_accuracy.png")
            lines += ["## Reward model", "", f"![reward model](report/{path.name})", ""]
    lines += [f"## Held-out judgement ({summary['held_out_prompts']} prompts x {summary['samples_per_prompt']} samples)",
              "", f"| policy | gold reward | KL to {start} | EOS rate | length |", "| --- | ---: | ---: | ---: | ---: |"]
    lines += [f"| {name} | {row['gold_reward']:.3f} | {row['kl_to_sft']:.2f} | {row['eos_rate']:.2f} | "
              f"{row['completion_length']:.1f} |" for name, row in summary["policies"].items()] + [""]
    lines += [f"## Before ({start}) and after", ""]
    for i, (before, after) in enumerate(zip(examples[start], examples[final]), start=1):
        lines += [f"### Prompt {i}", "", _quote(before["prompt"]), "",
                  f"**{start}** (gold {before['gold_reward']:.3f}):", "", _quote(before["completion"]), "",
                  f"**{final}** (gold {after['gold_reward']:.3f}):", "", _quote(after["completion"]), ""]
    path = out / "report.md"
    path.write_text("\n".join(lines))
    return path
