"""The run directory: resolved config, per-round metrics, summary, plot and checkpoints.

Layout of ``<output-dir>/<timestamp>-<name>/``::

    config.toml        the resolved RunConfig (what --resume reads back)
    metrics.csv        one row per finished round (round 0 = the initial model), appended as
                       rounds finish so a crash never loses them; loads with pandas.read_csv
    summary.json       final figures and run status, rewritten after every round
    metrics.png        accuracy and loss per round
    model.pt           the latest global model + server strategy state, loadable with
                       torch.load(..., weights_only=True)
    client_state/      client-local state (FedBN's BatchNorm layers), only for strategies that
                       keep state on clients; used to resume such runs exactly

No Flower here: the server app calls these functions.
"""

from __future__ import annotations

import csv
import json
import math
import os
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fedkn.config import RunConfig
from fedkn.errors import FedknError
from fedkn.summary import SUMMARY_FILE

#: metrics.csv columns, in order.
METRIC_COLUMNS: tuple[str, ...] = (
    "round",
    "test_loss",  # centralized: global model on the global test set
    "test_accuracy",
    "fed_eval_loss",  # federated: clients' local test splits, weighted by examples
    "fed_eval_accuracy",
    "train_loss",  # clients' local training, weighted by examples
    "train_accuracy",
    "clients_trained",
    "bytes_sent",  # model arrays server->clients plus clients->server this round
    "round_time_s",
    "elapsed_s",
    "dp_epsilon_round",  # DP-SGD: this round's epsilon, max over the clients that trained (empty without dp-sgd)
    "dp_epsilon",  # DP-SGD: cumulative epsilon at dp-delta, max over all clients so far (empty without dp-sgd)
)
_INT_COLUMNS = ("round", "clients_trained", "bytes_sent")
#: Columns that measure wall time (and so differ between otherwise identical runs).
TIME_COLUMNS: tuple[str, ...] = ("round_time_s", "elapsed_s")

CONFIG_FILE = "config.toml"
METRICS_FILE = "metrics.csv"
PLOT_FILE = "metrics.png"
CHECKPOINT_FILE = "model.pt"
CLIENT_STATE_DIR = "client_state"
MODELS_DIR = "models"  # the global models that ``keep-models`` keeps, one per round: round-<r>.pt
CHECKPOINT_FORMAT = "fedkn-checkpoint-1"


@dataclass(frozen=True)
class Checkpoint:
    round: int
    model: dict[str, torch.Tensor]  # the global model's state_dict
    strategy: dict[str, torch.Tensor]  # server optimizer state (FedAvgM momentum, FedAdam moments)


def csv_cell(value: Any, missing: str = "nan") -> str:
    """One CSV cell: floats exactly (``repr``), NaN as ``nan``, None as ``missing``."""
    if value is None:
        return missing
    if isinstance(value, float):
        return "nan" if math.isnan(value) else repr(value)
    return str(value)


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class RunDir:
    """One run's results directory."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.config_path = self.path / CONFIG_FILE
        self.metrics_path = self.path / METRICS_FILE
        self.summary_path = self.path / SUMMARY_FILE
        self.plot_path = self.path / PLOT_FILE
        self.checkpoint_path = self.path / CHECKPOINT_FILE
        self.client_state_dir = self.path / CLIENT_STATE_DIR
        self.models_dir = self.path / MODELS_DIR

    # -- creation / opening ------------------------------------------------------------------------
    @classmethod
    def create(cls, cfg: RunConfig, *, root: str | Path | None = None) -> RunDir:
        """A fresh ``<root>/<YYYYmmdd-HHMMSS>-<name>`` directory holding ``config.toml``."""
        base = Path(root if root is not None else cfg.run.output_dir).expanduser()
        stamp = time.strftime("%Y%m%d-%H%M%S")
        name = re.sub(r"[^A-Za-z0-9._+-]", "_", cfg.run_name)
        try:
            base.mkdir(parents=True, exist_ok=True)
            for attempt in range(1, 1000):
                path = base / (f"{stamp}-{name}" if attempt == 1 else f"{stamp}-{name}-{attempt}")
                try:
                    path.mkdir()
                    break
                except FileExistsError:
                    continue
            else:  # pragma: no cover
                raise FedknError(f"could not create a new run directory under '{base}'")
        except OSError as err:
            raise FedknError(f"cannot create run directory under '{base}': {err.strerror or err}") from None
        run = cls(path.resolve())
        run.write_config(cfg)
        return run

    @classmethod
    def open(cls, path: str | Path) -> RunDir:
        """An existing run directory, for ``--resume``."""
        p = Path(path).expanduser()
        if not p.is_dir():
            raise FedknError(f"run directory '{path}' does not exist")
        if not (p / CONFIG_FILE).is_file():
            raise FedknError(f"'{path}' is not a fedkn run directory (no {CONFIG_FILE})")
        return cls(p.resolve())

    # -- config --------------------------------------------------------------------------------------
    def write_config(self, cfg: RunConfig) -> None:
        import tomli_w

        text = "# Resolved fedkn run config (fedkn run --resume reads it back).\n"
        text += tomli_w.dumps(cfg.to_flower())
        _atomic_write_bytes(self.config_path, text.encode("utf-8"))

    def read_config(self) -> RunConfig:
        from fedkn.config import load_toml

        return RunConfig.from_dict(load_toml(self.config_path), source=str(self.config_path))

    # -- metrics ---------------------------------------------------------------------------------------
    def append_metrics(self, row: Mapping[str, Any]) -> None:
        """Append one round's row (header first if the file is new) and flush it to disk."""
        unknown = set(row) - set(METRIC_COLUMNS)
        if unknown:
            raise ValueError(f"unknown metric columns {sorted(unknown)}")
        new = not self.metrics_path.exists() or self.metrics_path.stat().st_size == 0
        with open(self.metrics_path, "a", newline="", encoding="utf-8") as f:
            writer = csv.writer(f)
            if new:
                writer.writerow(METRIC_COLUMNS)
            writer.writerow([csv_cell(row.get(c, 0 if c in _INT_COLUMNS else None)) for c in METRIC_COLUMNS])
            f.flush()
            os.fsync(f.fileno())

    def read_metrics(self) -> list[dict[str, float]]:
        if not self.metrics_path.exists():
            return []
        try:
            with open(self.metrics_path, newline="", encoding="utf-8") as f:
                rows = list(csv.DictReader(f))
            out = []
            for r in rows:
                out.append({k: (int(v) if k in _INT_COLUMNS else float(v)) for k, v in r.items()})
            return out
        except (ValueError, TypeError, csv.Error) as err:
            raise FedknError(f"'{self.metrics_path}' is corrupt: {err}") from None

    def truncate_metrics(self, last_round: int) -> list[dict[str, float]]:
        """Keep only rows up to ``last_round`` (rows of an unfinished round go); returns them."""
        rows = [r for r in self.read_metrics() if r["round"] <= last_round]
        tmp_text = []
        if rows:
            import io

            buf = io.StringIO()
            writer = csv.writer(buf)
            writer.writerow(METRIC_COLUMNS)
            for r in rows:
                writer.writerow([csv_cell(r.get(c)) for c in METRIC_COLUMNS])
            tmp_text.append(buf.getvalue())
        _atomic_write_bytes(self.metrics_path, "".join(tmp_text).encode("utf-8"))
        return rows

    # -- checkpoint -----------------------------------------------------------------------------------
    def save_checkpoint(
        self, round: int, model_state: Mapping[str, torch.Tensor], strategy_state: Mapping[str, torch.Tensor] | None = None
    ) -> None:
        save_checkpoint(self.checkpoint_path, round, model_state, strategy_state)

    def save_kept_model(self, round: int, model_state: Mapping[str, torch.Tensor]) -> None:
        """Keep the global model of ``round`` beside the checkpoint (``keep-models``), which each
        round overwrites; the model only, as a checkpoint file."""
        self.models_dir.mkdir(exist_ok=True)
        save_checkpoint(self.models_dir / f"round-{round}.pt", round, model_state)

    def kept_models(self) -> list[Path]:
        """The kept global models (``keep-models``), oldest round first; [] when none were kept."""
        if not self.models_dir.is_dir():
            return []
        found = [(int(m.group(1)), f) for f in self.models_dir.iterdir() if (m := _KEPT_RE.match(f.name))]
        return [f for _, f in sorted(found)]

    def load_checkpoint(self) -> Checkpoint | None:
        if not self.checkpoint_path.exists():
            return None
        return load_checkpoint(self.checkpoint_path)

    # -- summary and plot -----------------------------------------------------------------------------
    def write_summary(self, summary: Mapping[str, Any]) -> None:
        def clean(v: Any) -> Any:
            if isinstance(v, float) and not math.isfinite(v):
                return None
            if isinstance(v, Mapping):
                return {k: clean(x) for k, x in v.items()}
            if isinstance(v, (list, tuple)):
                return [clean(x) for x in v]
            return v

        text = json.dumps(clean(dict(summary)), indent=2, sort_keys=False) + "\n"
        _atomic_write_bytes(self.summary_path, text.encode("utf-8"))

    def plot(self, title: str = "") -> Path | None:
        rows = self.read_metrics()
        if not rows:
            return None
        return plot_metrics(rows, self.plot_path, title=title)


def save_checkpoint(
    path: str | Path,
    round: int,
    model_state: Mapping[str, torch.Tensor],
    strategy_state: Mapping[str, torch.Tensor] | None = None,
) -> None:
    payload = {
        "format": CHECKPOINT_FORMAT,
        "round": int(round),
        "model": {k: v.detach().cpu().clone() for k, v in model_state.items()},
        "strategy": {k: v.detach().cpu().clone() for k, v in (strategy_state or {}).items()},
    }
    p = Path(path)
    tmp = p.with_name(f".{p.name}.tmp")
    torch.save(payload, tmp)
    os.replace(tmp, p)


def load_checkpoint(path: str | Path) -> Checkpoint:
    """Load a checkpoint with ``weights_only=True``; anything unreadable is one FedknError line."""
    p = Path(path)
    if not p.is_file():
        raise FedknError(f"checkpoint '{path}' not found")
    try:
        payload = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unpickling/zip error means a bad file
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise FedknError(f"checkpoint '{path}' is corrupt or not a fedkn checkpoint ({first[:200]})") from None
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise FedknError(f"checkpoint '{path}' is not a fedkn checkpoint (format {CHECKPOINT_FORMAT})")
    model, strategy, rnd = payload.get("model"), payload.get("strategy", {}), payload.get("round")
    if not isinstance(rnd, int) or not isinstance(model, dict) or not isinstance(strategy, dict):
        raise FedknError(f"checkpoint '{path}' is incomplete")
    if not all(isinstance(v, torch.Tensor) for v in [*model.values(), *strategy.values()]):
        raise FedknError(f"checkpoint '{path}' holds non-tensor weights")
    return Checkpoint(round=rnd, model=model, strategy=strategy)


def plot_metrics(rows: list[Mapping[str, float]], path: str | Path, *, title: str = "") -> Path:
    """Accuracy (left) and loss (right) per round, centralized and federated."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    fig, (ax_acc, ax_loss) = plt.subplots(1, 2, figsize=(10, 4))
    def series(key: str) -> tuple[list[int], list[float]]:
        # Rounds without a value (no evaluation that round, eval-every > 1) are left out, not gaps.
        pts = [(r["round"], v) for r in rows if math.isfinite(v := float(r.get(key, math.nan)))]
        return [p[0] for p in pts], [p[1] for p in pts]

    for key, label in (("test_accuracy", "global test"), ("fed_eval_accuracy", "clients' test"), ("train_accuracy", "train")):
        ax_acc.plot(*series(key), marker="o", ms=3, label=label)
    for key, label in (("test_loss", "global test"), ("fed_eval_loss", "clients' test"), ("train_loss", "train")):
        ax_loss.plot(*series(key), marker="o", ms=3, label=label)
    ax_acc.set(xlabel="round", ylabel="accuracy", ylim=(0, 1), title="accuracy")
    ax_loss.set(xlabel="round", ylabel="cross-entropy", title="loss")
    for ax in (ax_acc, ax_loss):
        ax.grid(alpha=0.3)
        ax.legend()
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    p = Path(path)
    fig.savefig(p, dpi=100)
    plt.close(fig)
    return p


# ------------------------------------------------------------------------------------------------------
# client-local state (FedBN): kept on the client; mirrored to disk only so a resumed run is exact
# ------------------------------------------------------------------------------------------------------

_STATE_RE = re.compile(r"^partition-(\d+)\.round-(\d+)\.pt$")
_KEPT_RE = re.compile(r"^round-(\d+)\.pt$")


def save_client_state(
    directory: str | Path, partition_id: int, round: int, state: Mapping[str, torch.Tensor], *, keep_from: int = 0
) -> None:
    """Write ``state`` as of the end of ``round``; keeps this client's two newest files, and with
    ``keep_from`` > 0 also every file from that round on and the newest before it.

    Two suffice to resume: at most one round (the one a crash interrupted) is newer than the last
    finished round, so the newest file at or before any resume point is never deleted. ``keep_from``
    serves ``keep-models``: scoring the global model of any round from ``keep_from`` on needs each
    client's state as of that round (:func:`load_client_state`).
    """
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    path = d / f"partition-{partition_id}.round-{round}.pt"
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save({k: v.detach().cpu().clone() for k, v in state.items()}, tmp)
    os.replace(tmp, path)
    rounds = sorted(_client_state_rounds(d, partition_id))
    keep = set(rounds[-2:])
    if keep_from > 0:
        keep |= {r for r in rounds if r >= keep_from}
        keep |= set([r for r in rounds if r < keep_from][-1:])
    for old in rounds:
        if old not in keep:
            (d / f"partition-{partition_id}.round-{old}.pt").unlink(missing_ok=True)


def _client_state_rounds(d: Path, partition_id: int) -> list[int]:
    out = []
    if d.is_dir():
        for f in d.iterdir():
            m = _STATE_RE.match(f.name)
            if m and int(m.group(1)) == partition_id:
                out.append(int(m.group(2)))
    return out


def load_client_state(directory: str | Path, partition_id: int, up_to_round: int) -> dict[str, torch.Tensor] | None:
    """The newest state this client saved at or before ``up_to_round``, or None."""
    d = Path(directory)
    rounds = [r for r in _client_state_rounds(d, partition_id) if r <= up_to_round]
    if not rounds:
        return None
    path = d / f"partition-{partition_id}.round-{max(rounds)}.pt"
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001
        raise FedknError(f"client state '{path}' is corrupt ({str(err).splitlines()[0][:200] if str(err) else type(err).__name__})") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise FedknError(f"client state '{path}' is not a tensor dict")
    return state
