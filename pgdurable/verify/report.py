"""The verifier's report: one run's figures and violations as the text table it prints."""

from __future__ import annotations

from collections import Counter

from .checker import KINDS, Stats, Violation
from .run import FAULT_KINDS
from .watch import HOLDERS

FEATURES = (
    "retried steps (attempt > 1)",
    "retry attempts (all RETRY nodes)",
    "retries exhausted (instance failed, df.error named)",
    "keyed starts",
    "keyed starts (one after the other)",
    "keyed starts (concurrent)",
    "keyed starts deduplicated (both calls, one id)",
    "restarts called",
    "restarted instances (>= 2 runs)",
    "restarted instances completed",
    "foreach instances completed (rows once each, in order)",
)


def render(stats: Stats, violations: list[Violation], seed: int) -> str:
    """The report: faults, statuses, steps, violations by kind, the soak watch, notes; its
    last line is ``violations: N``."""
    lines = [f"pgdurable verify (seed {seed})", "", "faults injected"]
    for k in FAULT_KINDS:
        extra = "  (skipped: --dsn, external server)" if stats.skipped[k] else ""
        lines.append(f"  {k:<34}{stats.faults[k]:>6}{extra}")
    lines.append(f"  {'total':<34}{sum(stats.faults.values()):>6}")
    lines += ["", "instances by status"]
    for k in ("completed", "failed", "cancelled", "running", "pending"):
        if stats.statuses[k] or k in ("completed", "failed"):
            lines.append(f"  {k:<34}{stats.statuses[k]:>6}")
    lines += ["", "steps"]
    for k, v in stats.steps.items():
        lines.append(f"  {k:<34}{v:>6}")
    lines += ["", "df.retry, idempotent starts, df.restart, df.foreach"]
    for k in FEATURES:
        lines.append(f"  {k:<52}{stats.features[k]:>6}")
    lines += ["", "violations by kind"]
    by_kind = Counter(v.kind for v in violations)
    for k in KINDS:
        lines.append(f"  {k:<34}{by_kind[k]:>6}")
    if violations:
        lines += ["", "violations (first 50)"]
        lines += [f"  {v.kind} {v.instance_id}: {v.detail}" for v in violations[:50]]
    if stats.samples:
        lines += ["", "soak watch (first / max / last sample; the last after the settle phase)"]
        for i, name in (
            (1, "worker RSS MB (all workers)"),
            (2, "connections to the db"),
            (3, "dead tuples in df + engine"),
            (4, "df + engine size kB"),
        ):
            vals = [smp[i] for smp in stats.samples]
            lines.append(f"  {name:<34}{vals[0]:>8.0f} {max(vals):>8.0f} {vals[-1]:>8.0f}")
        if stats.holders:
            lines.append("  connections by holder")
            for name in (*HOLDERS, "orphaned worker processes"):
                vals = [h[name] for h in stats.holders]
                if any(vals):
                    lines.append(
                        f"    {name:<32}{vals[0]:>8.0f} {max(vals):>8.0f} {vals[-1]:>8.0f}"
                    )
    if stats.notes:
        lines += ["", "notes"] + [f"  {n}" for n in stats.notes]
    lines += ["", f"violations: {len(violations)}"]
    return "\n".join(lines)
