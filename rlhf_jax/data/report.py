"""What happened to the data: every row read is accounted for as kept, skipped (malformed,
by an explicit option) or dropped (over-length, by the stated truncation policy)."""

from __future__ import annotations

import dataclasses


class DataError(ValueError):
    """Bad data, named by file (or dataset) and row, with what is wrong and the fix."""


@dataclasses.dataclass
class DataReport:
    """Counts for one data source; ``notes`` holds the first few reasons for skipped rows."""

    source: str
    rows: int = 0
    kept: int = 0
    held_out: int = 0  # rows set aside for evaluation (reported by their own report)
    skipped_malformed: int = 0
    dropped_overlength: int = 0
    prompts_truncated: int = 0
    responses_truncated: int = 0
    notes: list[str] = dataclasses.field(default_factory=list)
    max_notes: int = 5
    warnings: list[str] = dataclasses.field(default_factory=list)  # the data is usable, but likely not as meant

    def skip(self, reason: str) -> None:
        self.skipped_malformed += 1
        if len(self.notes) < self.max_notes:
            self.notes.append(reason)

    def as_dict(self) -> dict:
        fields = dataclasses.asdict(self)
        fields.pop("max_notes")
        return fields

    def summary(self) -> str:
        held = f" (+{self.held_out} held out)" if self.held_out else ""
        text = (f"{self.source}: {self.rows} rows -> {self.kept} examples{held}; "
                f"{self.skipped_malformed} skipped as malformed, {self.dropped_overlength} dropped as over-length; "
                f"{self.prompts_truncated} prompts and {self.responses_truncated} responses truncated")
        return (text + "".join(f"\n  skipped: {note}" for note in self.notes)
                + "".join(f"\n  warning: {warning}" for warning in self.warnings))
