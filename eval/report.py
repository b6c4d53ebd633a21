"""The evaluation report: result dataclasses, the printed table, ``report.json`` and ``report.png``."""

from __future__ import annotations

import dataclasses
import json
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REFERENCE_ROW = "a"


@dataclass
class PromptResult:
    """One prompt through one row."""

    id: str
    tokens: list[int]
    new_tokens: int
    wall_time_s: float
    time_to_first_token_s: float
    tokens_per_s: float
    accepted_lengths: list[int]
    identical: bool  # tokens equal the reference row's for this prompt
    text: str | None = None


@dataclass
class RowResult:
    """One way of generating: its setting, per-prompt results and the summary numbers of the table."""

    key: str
    name: str
    lossless: bool  # a library speculative row: its greedy output must equal the reference row's
    setting: str  # how the row ran: its tree (nodes and where it came from) or the peer's tuned setting
    tree_size: int | None
    tree_source: (
        str | None
    )  # "tuned" (for this device), "calibrated" (saved at training), "default", "forced"
    predicted_tokens_per_step: float | None  # from the heads' calibrated hit rates, for the row's tree
    note: str | None  # e.g. plain decoding was predicted faster than any tree of >= 2 nodes
    tuning: list[dict[str, Any]]  # a peer's sweep on validation prompts (setting -> measured figures), or
    # the trees an auto tree was chosen from (nodes, predicted tokens per step, relative step cost)
    prompts: list[PromptResult]
    tokens_per_s: float  # median over prompts
    speedup: float  # tokens_per_s / the reference row's
    mean_accepted_length: float | None  # tokens per decoder forward after the prefill, over all prompts
    accepted_length_histogram: dict[int, int]
    identical: int
    quality: dict[str, float | int] | None = None  # the scorer's figures (rates in [0, 1] and n)

    @property
    def decode_tokens_per_s(self) -> float:
        """Median over prompts of the tokens emitted after the prefill's per second after it: speed without the
        prefill, the same for every row (a peer's prefill may emit several tokens at once)."""
        rates = [
            sum(p.accepted_lengths) / (p.wall_time_s - p.time_to_first_token_s)
            for p in self.prompts
            if p.accepted_lengths and p.wall_time_s > p.time_to_first_token_s
        ]
        return statistics.median(rates) if rates else 0.0

    @property
    def mismatched_ids(self) -> list[str]:
        return [p.id for p in self.prompts if not p.identical]

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RowResult:
        return cls(
            **{
                **data,
                "prompts": [PromptResult(**p) for p in data["prompts"]],
                "accepted_length_histogram": {
                    int(k): v for k, v in data["accepted_length_histogram"].items()
                },
            }
        )


@dataclass
class QualityRow:
    """A model's greedy answers to the test prompts, scored by the task scorer: the task model (its LoRA trained
    jointly with the heads) beside the same LoRA trained alone, so the table shows what the heads cost or add."""

    name: str
    setting: str
    quality: dict[str, float | int] | None
    texts: list[str | None]


@dataclass
class EvalReport:
    rows: list[RowResult]
    settings: dict[str, Any] = field(default_factory=dict)
    environment: dict[str, Any] = field(default_factory=dict)
    quality_rows: list[QualityRow] = field(default_factory=list)  # empty without --lora-alone

    def row(self, key: str) -> RowResult:
        return next(r for r in self.rows if r.key == key)

    @property
    def mismatches(self) -> dict[str, list[str]]:
        """Lossless rows whose output differs from the reference row: key -> prompt ids."""
        return {r.key: r.mismatched_ids for r in self.rows if r.lossless and r.mismatched_ids}

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> EvalReport:
        return cls(
            [RowResult.from_dict(r) for r in data["rows"]],
            data["settings"],
            data["environment"],
            [QualityRow(**q) for q in data.get("quality_rows", [])],
        )


def format_table(report: EvalReport) -> str:
    """The plain-text table (one line per row), then each row's setting and note."""
    same = f"same as ({REFERENCE_ROW})"
    metrics = sorted({k for r in report.rows if r.quality for k in r.quality if k != "n"})
    header = ("row", "setup", "tok/s", "speedup", "decode tok/s", "tok/step", "predicted", same, *metrics)
    lines = []
    for r in report.rows:
        n = len(r.prompts)
        predicted = r.predicted_tokens_per_step
        lines.append(
            (
                f"({r.key})",
                r.name,
                f"{r.tokens_per_s:.1f}",
                f"{r.speedup:.2f}x",
                f"{r.decode_tokens_per_s:.1f}",
                "n/a" if r.mean_accepted_length is None else f"{r.mean_accepted_length:.2f}",
                "-" if predicted is None else f"{predicted:.2f}",
                f"{r.identical}/{n} {100 * r.identical / n:.0f}%" if n else "0/0",
                *(
                    "n/a" if not r.quality or m not in r.quality else f"{100 * r.quality[m]:.0f}%"
                    for m in metrics
                ),
            )
        )
    widths = [max(len(row[i]) for row in [header, *lines]) for i in range(len(header))]

    def fmt(cells: tuple[str, ...]) -> str:  # text columns left-aligned, numbers right-aligned
        pairs = enumerate(zip(cells, widths, strict=True))
        return "  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in pairs)

    notes = [
        f"({r.key}) {r.setting}" + _trees_weighed(r.tuning) + (f". Note: {r.note}" if r.note else "")
        for r in report.rows
    ]
    return "\n".join([fmt(header), "  ".join("-" * w for w in widths), *map(fmt, lines), "", *notes])


def format_quality_table(report: EvalReport) -> str:
    """The quality table (one line per model, the scorer's rates), then the joint model's gap to the LoRA
    alone in points; empty without quality rows."""
    rows = [q for q in report.quality_rows if q.quality]
    if not rows:
        return ""
    metrics = sorted({k for q in rows for k in q.quality if k != "n"})
    header = ("model", *metrics, "setting")
    lines = [
        (q.name, *(f"{100 * q.quality[m]:.0f}%" if m in q.quality else "n/a" for m in metrics), q.setting)
        for q in rows
    ]
    widths = [max(len(row[i]) for row in [header, *lines]) for i in range(len(header))]

    def fmt(cells: tuple[str, ...]) -> str:
        pairs = enumerate(zip(cells, widths, strict=True))
        return "  ".join(c.ljust(w) if i in (0, len(cells) - 1) else c.rjust(w) for i, (c, w) in pairs)

    out = [fmt(header), "  ".join("-" * w for w in widths), *map(fmt, lines)]
    if len(rows) == 2 and rows[0].quality and rows[1].quality:
        joint, alone = rows[0].quality, rows[1].quality
        gaps = ", ".join(
            f"{m} {100 * (joint[m] - alone[m]):+.0f} points" for m in metrics if m in joint and m in alone
        )
        out += ["", f"{rows[0].name} against {rows[1].name}: {gaps} (n={joint.get('n', '?')})"]
    return "\n".join(out)


def _trees_weighed(tuning: list[dict[str, Any]], shown: int = 3) -> str:
    """For a row whose tree was tuned: the trees with the best expected speedups, as the tuning saw them."""
    trees = [t for t in tuning if "expected_speedup" in t]
    if not trees:
        return ""
    best = sorted(trees, key=lambda t: -t["expected_speedup"])[:shown]
    return f"; expected of {len(trees)} trees weighed: " + ", ".join(
        f"{t['nodes']} nodes {t['expected_speedup']:.2f}x" for t in best
    )


def write_json(report: EvalReport, path: str | Path) -> Path:
    path = Path(path)
    path.write_text(json.dumps(report.to_dict(), indent=1) + "\n")
    return path


def read_json(path: str | Path) -> EvalReport:
    return EvalReport.from_dict(json.loads(Path(path).read_text()))


def plot(report: EvalReport, path: str | Path) -> Path:
    """Tok/s bars labelled with the speedup, and the accepted-length histograms of the drafted rows."""
    from matplotlib.figure import Figure  # no pyplot: no global state, no GUI backend

    scored = [q for q in report.quality_rows if q.quality]
    fig = Figure(figsize=(15 if scored else 11, 4.2), layout="constrained")
    panels = fig.subplots(1, 3 if scored else 2, width_ratios=(1.2, 1, 0.8) if scored else (1.2, 1))
    speed, hist = panels[0], panels[1]
    labels = [f"({r.key}) {r.name}" for r in report.rows]
    bars = speed.barh(labels, [r.tokens_per_s for r in report.rows], color="tab:blue")
    speed.bar_label(bars, [f" {r.speedup:.2f}x" for r in report.rows])
    speed.invert_yaxis()
    speed.set_xlabel("tokens/s (median over prompts)")
    speed.set_title("Generation speed")
    speed.margins(x=0.2)
    drafted = [r for r in report.rows if r.lossless and r.accepted_length_histogram]
    lengths = sorted({k for r in drafted for k in r.accepted_length_histogram})
    width = 0.8 / max(len(drafted), 1)
    for i, r in enumerate(drafted):
        steps = sum(r.accepted_length_histogram.values())
        shares = [r.accepted_length_histogram.get(k, 0) / steps for k in lengths]
        hist.bar(
            [k + (i - (len(drafted) - 1) / 2) * width for k in lengths],
            shares,
            width,
            label=f"({r.key}) mean {r.mean_accepted_length:.2f}",
        )
    hist.set_xticks(lengths)
    hist.set_xlabel("tokens accepted per step")
    hist.set_ylabel("share of steps")
    hist.set_title("Accepted length")
    if drafted:
        hist.legend()
    if scored:
        _plot_quality(panels[2], scored)
    fig.savefig(path, dpi=110)
    return Path(path)


def _plot_quality(ax: Any, rows: list[QualityRow]) -> None:
    """Grouped bars: each scorer rate, one bar per model (the joint model beside the LoRA alone)."""
    metrics = sorted({k for q in rows for k in q.quality if k != "n"})
    width = 0.8 / len(rows)
    for i, q in enumerate(rows):
        bars = ax.bar(
            [m + (i - (len(rows) - 1) / 2) * width for m in range(len(metrics))],
            [100 * q.quality.get(k, 0) for k in metrics],
            width,
            label=q.name,
        )
        ax.bar_label(bars, fmt="%.0f%%")
    ax.set_xticks(range(len(metrics)), metrics)
    ax.set_ylim(0, 110)
    ax.set_ylabel("% of test prompts")
    ax.set_title("Task quality (greedy)")
    ax.legend(loc="lower right")
