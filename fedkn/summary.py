"""summary.json as a type: a run's status and final figures, the one shape that ``fedkn run``,
``fedkn compare`` and ``fedkn report`` read (:class:`fedkn.recorder.RunRecorder` writes it).
No torch, so the CLI and the report load it fast."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

SUMMARY_FILE = "summary.json"
#: Summary fields written only when set (DP runs, FedBN, failures).
OPTIONAL_FIELDS: tuple[str, ...] = ("dp_epsilon", "dp_delta", "dp_statement", "client_dp", "note", "error")


@dataclass(frozen=True)
class RunSummary:
    """summary.json: a run's status and final figures (rewritten after every round)."""

    name: str = ""
    status: str = "missing"  # running | finished | failed | interrupted; missing = no summary.json
    run_dir: str = ""
    rounds_completed: int = 0
    num_rounds: int = 0
    dataset: str = ""
    model: str = ""
    norm: str = ""
    strategy: str = ""
    num_clients: int = 0
    final_test_accuracy: float | None = None
    final_test_loss: float | None = None
    final_fed_eval_accuracy: float | None = None
    final_fed_eval_loss: float | None = None
    final_train_loss: float | None = None
    best_test_accuracy: float | None = None
    best_round: int | None = None
    total_bytes_sent: int = 0
    elapsed_s: float | None = None
    model_parameters: int | None = None
    device: str = ""
    centralized_evaluation: bool = True
    fedkn_version: str = ""
    config: dict[str, Any] = field(default_factory=dict)
    dp_epsilon: float | None = None  # DP-SGD: cumulative epsilon, max over the clients
    dp_delta: float | None = None
    dp_statement: str | None = None
    client_dp: dict[str, Any] | None = None  # client-level DP: the guarantee
    note: str | None = None
    error: str | None = None

    @property
    def finished(self) -> bool:
        return self.status == "finished"

    def to_json(self) -> dict[str, Any]:
        """The summary.json object; the optional fields only where set."""
        out = asdict(self)
        for key in OPTIONAL_FIELDS:
            if out[key] is None:
                del out[key]
        return out

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> RunSummary:
        """From a summary.json object; keys this version does not know are ignored."""
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})

    @classmethod
    def read(cls, run_path: str | Path) -> RunSummary:
        """The summary of the run in ``run_path``; status ``missing`` if it has none (or it is unreadable)."""
        try:
            return cls.from_json(json.loads((Path(run_path) / SUMMARY_FILE).read_text(encoding="utf-8")))
        except (OSError, ValueError, TypeError):
            return cls()
