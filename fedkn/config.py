"""The run configuration: one typed, frozen :class:`RunConfig`, parsed once at the edge.

Sources, later ones winning: the field defaults here <- a TOML preset file (``configs/*.toml``)
<- ``--set key=value`` overrides (``fedkn run``) or Flower's run config (``flwr run``, whose
values come from ``[tool.flwr.app.config]`` in ``pyproject.toml`` plus ``--run-config``).

Keys are kebab-case everywhere a user types them (``num-clients``), like Flower's run config;
``num_clients`` is accepted too. Every problem (unknown key, wrong type, value out of range,
unknown name) raises :class:`~fedkn.errors.FedknError` with one line saying what to change.

``norm = "fedbn"`` is shorthand for ``norm = "bn"`` plus ``strategy = "fedbn"``, and ``norm =
"fixbn"`` for ``norm = "bn"`` plus ``strategy = "fixbn"`` (:data:`RULE_NORMS`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from fedkn.errors import FedknError

#: Server strategies (``strategies.build_strategy`` implements each).
STRATEGIES: tuple[str, ...] = ("fedavg", "fedprox", "fedavgm", "fedadam", "fedbn", "fixbn")

#: Norm names that are a layer norm trained with a rule of the same name (a strategy, plus what the
#: clients do under it): name -> (layer norm, what the rule does). Everywhere a user names a norm
#: (``--norm``, ``--norms``, ``norm = ...``) these names are accepted too.
RULE_NORMS: dict[str, tuple[str, str]] = {
    "fedbn": ("bn", "keeps BatchNorm state local"),
    "fixbn": ("bn", "freezes the global BatchNorm statistics after fixbn-round"),
}


@dataclass(frozen=True)
class RunConfig:
    """Everything one federated run needs. Defaults = the README's quick CPU run on ``digits``."""

    # --- experiment identity -------------------------------------------------------------------
    name: str = ""  # run name for the results directory; "" -> "<model>-<norm>-<strategy>"
    seed: int = 0  # fixes partitions, model init, client sampling and local shuffling
    # --- data ----------------------------------------------------------------------------------
    dataset: str = "digits"
    data_dir: str = ""  # where non-embedded datasets live ("" = not needed for digits)
    num_clients: int = 10
    partition: str = "dir0.3"  # iid | dir<alpha> | shards<k> | classes-balance:... (fedkn.data)
    test_fraction: float = 0.2  # share of each client's data held out as its local test split
    val_fraction: float = 0.0  # share held out as validation (lr tuning scores on it; never trained on)
    augment: bool = False
    # --- model ---------------------------------------------------------------------------------
    model: str = "resnet8"
    norm: str = "kn"
    width: float = 0.25
    # --- federated schedule ----------------------------------------------------------------------
    strategy: str = "fedavg"
    num_rounds: int = 15
    fraction_train: float = 1.0  # share of clients sampled for training each round
    fraction_evaluate: float = 1.0  # share of clients sampled for federated evaluation
    min_clients: int = 1  # a round needs replies from this many clients (lost SuperNodes are dropped)
    # --- local training --------------------------------------------------------------------------
    batch_size: int = 8
    local_epochs: int = 1
    local_steps: int = 0  # > 0: this many SGD steps per round instead of local-epochs
    lr: float = 0.01  # one value that trains every norm on the default setting (kn also fine at 0.05)
    agc_clip: float = -1.0  # adaptive gradient clipping ratio; -1 = the norm's default (0.01 for nf, off otherwise), 0 = off
    momentum: float = 0.9
    weight_decay: float = 5e-4
    eval_batch_size: int = 256
    eval_every: int = 1  # centralized test evaluation every k rounds (round 0 and the last always)
    # --- strategy options ------------------------------------------------------------------------
    proximal_mu: float = 0.01  # fedprox
    fixbn_round: int = 0  # fixbn: last round of plain FedAvg+BN before the statistics freeze; 0 = half of num-rounds
    server_lr: float = 1.0  # fedavgm
    server_momentum: float = 0.9  # fedavgm
    fedadam_eta: float = 0.01  # fedadam server learning rate
    fedadam_beta1: float = 0.9
    fedadam_beta2: float = 0.99
    fedadam_tau: float = 0.001
    # --- sample-level DP: DP-SGD (Opacus) in every client's local training -----------------------
    dp_sgd: bool = False
    dp_noise_multiplier: float = 0.0  # exactly one of these two > 0 when dp-sgd is on; the target
    dp_target_epsilon: float = 0.0  # calibrates the noise to num-rounds x local steps per client
    dp_max_grad_norm: float = 1.0  # per-sample clipping bound
    dp_delta: float = 1e-5
    dp_accountant: str = "rdp"  # rdp | prv | gdp
    # --- client-level DP: Flower's DP strategy wrappers (fedavg/fedprox only) ---------------------
    client_dp: str = "off"  # off | server-fixed | client-fixed | server-adaptive | client-adaptive
    client_dp_noise_multiplier: float = 1.0
    client_dp_clipping_norm: float = 1.0  # the initial one for the adaptive modes
    client_dp_target_quantile: float = 0.5  # adaptive: share of updates left unclipped
    client_dp_clip_lr: float = 0.2  # adaptive: learning rate of the clipping norm
    client_dp_count_stddev: float = 0.0  # adaptive: clipped-count noise; 0 = clients per round / 20
    client_dp_delta: float = 1e-5
    # --- simulation --------------------------------------------------------------------------------
    client_num_cpus: float = 1.0  # Ray resources per ClientApp (fedkn run; flwr run: --federation-config)
    client_num_gpus: float = 0.0  # e.g. 0.25 = four clients share one GPU
    round_timeout: float = 600.0  # seconds to wait for the clients of one round
    output_dir: str = "runs"  # each run writes <output-dir>/<timestamp>-<name>/

    def __post_init__(self) -> None:
        _validate(self)

    # -- constructors -----------------------------------------------------------------------------
    @classmethod
    def from_sources(
        cls,
        preset: str | Path | None = None,
        overrides: Mapping[str, Any] | None = None,
        sets: list[str] | tuple[str, ...] = (),
    ) -> RunConfig:
        """defaults <- ``preset`` TOML file <- ``overrides`` (typed mapping) <- ``sets`` ("k=v")."""
        values: dict[str, Any] = {}
        if preset is not None:
            values.update(_normalize_keys(load_toml(preset), source=str(preset)))
        if overrides:
            values.update(_normalize_keys(overrides, source="overrides"))
        values.update(parse_sets(sets))
        return cls.from_dict(values)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any], *, source: str = "config") -> RunConfig:
        """Build from a mapping of kebab- or snake-case keys (a Flower run config, a TOML table)."""
        values = _normalize_keys(values, source=source)
        values = _expand_rule_norm(values)
        typed = {name: _coerce(name, value) for name, value in values.items()}
        return cls(**typed)

    @classmethod
    def from_flower(cls, run_config: Mapping[str, Any]) -> RunConfig:
        """From Flower's ``context.run_config`` or a message ConfigRecord (kebab-case keys)."""
        return cls.from_dict(run_config, source="run config")

    # -- views --------------------------------------------------------------------------------------
    def to_flower(self) -> dict[str, bool | int | float | str]:
        """Kebab-case dict, the shape of ``[tool.flwr.app.config]`` and of a ConfigRecord."""
        return {_kebab(f.name): getattr(self, f.name) for f in fields(self)}

    def replace(self, **changes: Any) -> RunConfig:
        return dataclasses.replace(self, **changes)

    @property
    def run_name(self) -> str:
        return self.name or f"{self.model}-{self.norm}-{self.strategy}"

    @property
    def local_keys_stay_local(self) -> bool:
        """True when part of the model (BatchNorm state under FedBN) never leaves the client."""
        return self.strategy == "fedbn"

    @property
    def agc_ratio(self) -> float:
        """The AGC clipping ratio local training uses (``agc-clip``, or the norm's default); 0 = off."""
        from fedkn.nn.norms import NORMS

        return self.agc_clip if self.agc_clip >= 0 else NORMS[self.norm].agc_clip

    @property
    def fixbn_freeze_after(self) -> int:
        """FixBN's last exploration round (``fixbn-round``, 0 = half of num-rounds, at least 1)."""
        return self.fixbn_round or max(1, self.num_rounds // 2)


# ----------------------------------------------------------------------------------------------------
# key handling
# ----------------------------------------------------------------------------------------------------

_FIELDS: dict[str, dataclasses.Field[Any]] = {f.name: f for f in fields(RunConfig)}


def _kebab(name: str) -> str:
    return name.replace("_", "-")


def valid_keys() -> list[str]:
    return [_kebab(n) for n in _FIELDS]


def _normalize_keys(values: Mapping[str, Any], *, source: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in values.items():
        if not isinstance(key, str):
            raise FedknError(f"config keys must be strings, got {key!r} in {source}")
        name = key.strip().replace("-", "_")
        if name not in _FIELDS:
            raise FedknError(f"unknown config key '{key}'; valid keys: {', '.join(valid_keys())}")
        if isinstance(value, Mapping):
            raise FedknError(f"config key '{key}' in {source} must be a single value, not a table")
        out[name] = value
    return out


def _rule_norm(norm: Any, strategy: Any) -> tuple[str, str] | None:
    """(layer norm, strategy) for a :data:`RULE_NORMS` name, else None. The default strategy
    (fedavg) gives way, since Flower's run config always carries every key; an explicit other
    strategy is a contradiction."""
    if norm not in RULE_NORMS:
        return None
    layer = RULE_NORMS[norm][0]
    if strategy not in ("fedavg", norm):
        raise FedknError(f"norm '{norm}' means norm '{layer}' with strategy '{norm}', but strategy is '{strategy}'")
    return layer, norm


def _expand_rule_norm(values: dict[str, Any]) -> dict[str, Any]:
    """``norm = "fedbn"`` -> bn + fedbn (and likewise every :data:`RULE_NORMS` name)."""
    rule = _rule_norm(values.get("norm"), values.get("strategy", values.get("norm")))
    return values if rule is None else {**values, "norm": rule[0], "strategy": rule[1]}


def parse_sets(sets: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """``["lr=0.1", "norm=gn"]`` -> ``{"lr": "0.1", "norm": "gn"}`` (typed later by :func:`_coerce`)."""
    out: dict[str, Any] = {}
    for item in sets:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise FedknError(f"--set expects key=value, got '{item}'")
        out.update(_normalize_keys({key.strip(): value.strip()}, source="--set"))
    return out


def load_toml(path: str | Path) -> dict[str, Any]:
    """Read a preset TOML file: flat ``key = value`` lines (an optional ``[config]`` table too)."""
    p = Path(path)
    if not p.is_file():
        raise FedknError(f"config file '{path}' not found")
    try:
        data = tomllib.loads(p.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
        raise FedknError(f"config file '{path}' is not valid TOML: {err}") from None
    if set(data) == {"config"} and isinstance(data["config"], dict):
        data = data["config"]
    return data


# ----------------------------------------------------------------------------------------------------
# typing and validation
# ----------------------------------------------------------------------------------------------------

_TRUE = {"true", "yes", "on", "1"}
_FALSE = {"false", "no", "off", "0"}


def _integer(value: Any) -> int:
    """An int, a whole float, or a string of an int (not of a float: "1.5" and "1.0" are rejected)."""
    if isinstance(value, float):
        if not value.is_integer():
            raise ValueError(value)
        return int(value)
    if isinstance(value, (int, str)):
        return int(value)
    raise TypeError(value)


def _coerce(name: str, value: Any) -> Any:
    """Turn ``value`` into the field's type; strings (from ``--set``) are parsed."""
    kind = _FIELDS[name].type
    key = _kebab(name)
    if kind == "bool":
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in _TRUE | _FALSE:
            return value.lower() in _TRUE
        raise FedknError(f"config key '{key}' must be true or false, got {value!r}")
    if kind in ("int", "float"):
        what = "an integer" if kind == "int" else "a number"
        if not isinstance(value, bool):  # a bool is an int to Python, never to a config
            with contextlib.suppress(ValueError, TypeError):
                return _integer(value) if kind == "int" else float(value)
        raise FedknError(f"config key '{key}' must be {what}, got {value!r}")
    if kind == "str":
        if isinstance(value, str):
            return value
        raise FedknError(f"config key '{key}' must be a string, got {value!r}")
    raise AssertionError(f"unhandled field type {kind} for {name}")  # pragma: no cover


def _check(ok: bool, key: str, what: str, value: Any) -> None:
    if not ok:
        raise FedknError(f"config key '{key}' must be {what}, got {value!r}")


def _validate(cfg: RunConfig) -> None:
    rule = _rule_norm(cfg.norm, cfg.strategy)  # built in code: RunConfig(norm="fedbn") means bn + fedbn as well
    if rule is not None:
        object.__setattr__(cfg, "norm", rule[0])
        object.__setattr__(cfg, "strategy", rule[1])
    # Types first: a RunConfig built in code (not via from_dict) gets the same checks.
    for f in fields(cfg):
        value = getattr(cfg, f.name)
        coerced = _coerce(f.name, value)
        if coerced != value or type(coerced) is not type(value):
            object.__setattr__(cfg, f.name, coerced)
    for f in fields(cfg):
        value = getattr(cfg, f.name)
        if isinstance(value, float) and not math.isfinite(value):
            raise FedknError(f"config key '{_kebab(f.name)}' must be a finite number, got {value!r}")

    _check(cfg.num_clients >= 1, "num-clients", "at least 1", cfg.num_clients)
    _check(cfg.num_rounds >= 1, "num-rounds", "at least 1", cfg.num_rounds)
    _check(cfg.batch_size >= 1, "batch-size", "at least 1", cfg.batch_size)
    _check(cfg.eval_batch_size >= 1, "eval-batch-size", "at least 1", cfg.eval_batch_size)
    _check(cfg.eval_every >= 1, "eval-every", "at least 1", cfg.eval_every)
    _check(cfg.local_epochs >= 1, "local-epochs", "at least 1", cfg.local_epochs)
    _check(cfg.local_steps >= 0, "local-steps", "0 (use local-epochs) or more", cfg.local_steps)
    _check(0.0 < cfg.fraction_train <= 1.0, "fraction-train", "in (0, 1]", cfg.fraction_train)
    _check(0.0 <= cfg.fraction_evaluate <= 1.0, "fraction-evaluate", "in [0, 1]", cfg.fraction_evaluate)
    _check(0.0 <= cfg.test_fraction < 1.0, "test-fraction", "in [0, 1)", cfg.test_fraction)
    _check(0.0 <= cfg.val_fraction < 1.0, "val-fraction", "in [0, 1)", cfg.val_fraction)
    _check(cfg.test_fraction + cfg.val_fraction < 1.0, "test-fraction + val-fraction", "below 1 (room for training)",
           cfg.test_fraction + cfg.val_fraction)
    _check(cfg.lr > 0.0, "lr", "positive", cfg.lr)
    _check(0.0 <= cfg.momentum < 1.0, "momentum", "in [0, 1)", cfg.momentum)
    _check(cfg.weight_decay >= 0.0, "weight-decay", "0 or more", cfg.weight_decay)
    _check(cfg.width > 0.0, "width", "positive", cfg.width)
    _check(cfg.agc_clip == -1.0 or cfg.agc_clip >= 0.0, "agc-clip", "-1 (the norm's default), 0 (off) or positive",
           cfg.agc_clip)
    _check(cfg.proximal_mu >= 0.0, "proximal-mu", "0 or more", cfg.proximal_mu)
    _check(cfg.fixbn_round >= 0, "fixbn-round", "0 (half of num-rounds) or a round number", cfg.fixbn_round)
    _check(cfg.server_lr > 0.0, "server-lr", "positive", cfg.server_lr)
    _check(0.0 <= cfg.server_momentum < 1.0, "server-momentum", "in [0, 1)", cfg.server_momentum)
    _check(cfg.fedadam_eta > 0.0, "fedadam-eta", "positive", cfg.fedadam_eta)
    _check(0.0 <= cfg.fedadam_beta1 < 1.0, "fedadam-beta1", "in [0, 1)", cfg.fedadam_beta1)
    _check(0.0 <= cfg.fedadam_beta2 < 1.0, "fedadam-beta2", "in [0, 1)", cfg.fedadam_beta2)
    _check(cfg.fedadam_tau > 0.0, "fedadam-tau", "positive", cfg.fedadam_tau)
    _check(cfg.client_num_cpus > 0.0, "client-num-cpus", "positive", cfg.client_num_cpus)
    _check(cfg.client_num_gpus >= 0.0, "client-num-gpus", "0 or more", cfg.client_num_gpus)
    _check(1 <= cfg.min_clients <= cfg.num_clients, "min-clients", f"in 1..num-clients ({cfg.num_clients})", cfg.min_clients)
    _check(cfg.round_timeout > 0.0, "round-timeout", "positive (seconds)", cfg.round_timeout)
    _check(bool(cfg.output_dir.strip()), "output-dir", "a directory path", cfg.output_dir)
    _check(cfg.seed >= 0, "seed", "0 or more", cfg.seed)
    if cfg.name and (set(cfg.name) & set('/\\:*?"<>|') or cfg.name.startswith(".")):
        raise FedknError(f"config key 'name' must be usable as a directory name, got {cfg.name!r}")

    _check(cfg.dp_noise_multiplier >= 0.0, "dp-noise-multiplier", "0 (off) or positive", cfg.dp_noise_multiplier)
    _check(cfg.dp_target_epsilon >= 0.0, "dp-target-epsilon", "0 (off) or positive", cfg.dp_target_epsilon)

    if cfg.strategy not in STRATEGIES:
        raise FedknError(f"config key 'strategy' must be one of {', '.join(STRATEGIES)}, got {cfg.strategy!r}")
    _validate_names(cfg)
    _validate_privacy(cfg)


def _validate_names(cfg: RunConfig) -> None:
    """Names that other layers own; their registries are the single source of truth."""
    from fedkn.data import DATASETS, parse_partition, resolve_params
    from fedkn.models import MODELS
    from fedkn.nn.norms import NORMS, check_norm_name

    if cfg.dataset not in DATASETS:
        raise FedknError(f"config key 'dataset' must be one of {', '.join(DATASETS)}, got {cfg.dataset!r}")
    if cfg.model not in MODELS:
        raise FedknError(f"config key 'model' must be one of {', '.join(MODELS)}, got {cfg.model!r}")
    check_norm_name(cfg.norm, also=tuple(RULE_NORMS), where=" (config key 'norm')")
    spec = MODELS[cfg.model]
    if cfg.norm not in spec.norms:
        raise FedknError(f"model '{cfg.model}' cannot use norm '{cfg.norm}'; it supports {', '.join(spec.norms)}")
    try:
        resolve_params(*parse_partition(cfg.partition))
    except FedknError as err:
        raise FedknError(f"config key 'partition': {err}") from None
    if cfg.strategy in RULE_NORMS and cfg.norm != RULE_NORMS[cfg.strategy][0]:
        layer = RULE_NORMS[cfg.strategy][0]
        raise FedknError(f"strategy '{cfg.strategy}' {RULE_NORMS[cfg.strategy][1]}, so it needs norm '{layer}' "
                         f"(got norm '{cfg.norm}')")
    if cfg.batch_size == 1 and not NORMS[cfg.norm].batch_independent:
        independent = ", ".join(n for n, spec in NORMS.items() if spec.batch_independent)
        raise FedknError(
            f"batch-size 1 does not work with norm '{cfg.norm}' (BatchNorm needs 2+ samples per batch); "
            f"use batch-size >= 2 or a batch-independent norm: {independent}"
        )


def _validate_privacy(cfg: RunConfig) -> None:
    """DP settings, checked by the privacy layers themselves (imported only when DP is on: Opacus is heavy)."""
    if cfg.dp_sgd:
        from fedkn.privacy.dpsgd import settings_from_config

        settings_from_config(cfg)  # also rejects BatchNorm, naming the batch-independent norms
    if cfg.client_dp != "off":
        from strategies.dp import settings_from_config as client_settings

        client_settings(cfg)
