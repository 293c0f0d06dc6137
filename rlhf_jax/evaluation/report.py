"""``rlhf-jax report RUN_DIR``: ``RUN_DIR/report.md`` with PNG plots (matplotlib) of the run's
metric curves from ``metrics.jsonl`` -- loss, reward, KL, accuracy, ... one figure per kind of
line (``dpo/train``, ``ppo/eval``, ...) -- the final evaluation, and sample completions: before
and after training side by side when ``rlhf-jax evaluate`` wrote ``RUN_DIR/evaluation/``, else
the completions the run sampled at its end (``samples.jsonl``)."""

from __future__ import annotations

import json
import math
from pathlib import Path

from rlhf_jax.config import ConfigError

# the curves worth a panel, in this order, when a kind of line has them
CURVES = ("loss", "reward_accuracy", "reward_margin", "accuracy", "margin", "score_mean", "kl", "beta", "entropy",
          "policy_loss", "value_loss", "clip_fraction", "completion_length", "grad_norm", "learning_rate",
          "perplexity", "win_rate")
SAMPLES = 4


def read_metrics(path: Path) -> dict[str, dict[str, list[tuple[int, float]]]]:
    """``{kind: {metric: [(step, value), ...]}}`` from a ``metrics.jsonl`` (finite numbers only).
    Raises ``ConfigError`` when the file is missing or a line is not JSON."""
    if not path.is_file():
        raise ConfigError(f"{path} does not exist; give the output_dir of a finished or running rlhf-jax run")
    series: dict[str, dict[str, list[tuple[int, float]]]] = {}
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            row = None
        if not isinstance(row, dict) or not isinstance(row.get("step", 0), int):
            raise ConfigError(f"{path} line {number} is not a metrics row (a JSON object with an integer step); "
                              "is this an rlhf-jax metrics file?")
        kind = series.setdefault(str(row.get("kind", "metrics")), {})
        for name, value in row.items():
            if name not in ("step", "kind") and isinstance(value, int | float) and math.isfinite(value):
                kind.setdefault(name, []).append((row.get("step", 0), float(value)))
    return series


def plot_kind(kind: str, metrics: dict[str, list[tuple[int, float]]], out: Path) -> Path | None:
    """One PNG of ``kind``'s :data:`CURVES` against the step; ``None`` when it has none of them
    with two or more points."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

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
    figure.tight_layout()
    path = out / f"{kind.replace('/', '_')}.png"
    figure.savefig(path, dpi=90)
    plt.close(figure)
    return path


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
        lines = ["## Before and after (`rlhf-jax evaluate`)", "",
                 f"Win rate of the trained policy over the starting one: **{_number(evaluation['win_rate'])}** "
                 f"(95% CI [{_number(evaluation['win_rate_low'])}, {_number(evaluation['win_rate_high'])}], "
                 f"n = {evaluation['win_rate_n']:.0f}); at matched length "
                 f"{_number(evaluation['matched_length_win_rate'])} over {evaluation['matched_length_win_rate_n']:.0f} "
                 f"pairs; KL {_number(evaluation['kl'])} nats.", ""]
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
