""":class:`RunConfig`: one run's sub-configs, filled from the flat keys users type; the rules
that span sub-configs live here, in :func:`cross_checks`, and nowhere else.

Sources, later ones winning: the field defaults <- a TOML preset file (``configs/*.toml``) <-
``--set key=value`` overrides (``fedkn run``) or Flower's run config (``flwr run``, whose values
come from ``[tool.flwr.app.config]`` in ``pyproject.toml`` plus ``--run-config``).

Keys are flat and kebab-case everywhere a user types them (``num-clients``, ``dp-delta``), like
Flower's run config; ``num_clients`` is accepted too. Each key is one field of one sub-config
(:data:`KEYS`). Every problem (unknown key, wrong type, value out of range, unknown name) raises
:class:`~fedkn.errors.FedknError` with one line saying what to change.

A rule norm (:data:`~fedkn.config.sections.RULE_NORMS`) is shorthand for its layer norm plus the
strategy of the same name.
"""

from __future__ import annotations

import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from fedkn.config import sections as sec
from fedkn.config.values import Section, check
from fedkn.errors import FedknError
from fedkn.sampling import sample_size

#: Strategies whose aggregate is a plain (uniform) mean of the client models: the only ones that
#: keep client-level DP's guarantee (``strategies.dp``).
AVERAGING_STRATEGIES: tuple[str, ...] = ("fedavg", "fedprox")


@dataclass(frozen=True)
class RunSettings(Section):
    """What belongs to the run itself rather than to a layer: its name, seed, where results go,
    and the simulation engine's resources per client."""

    name: str = ""  # run name for the results directory; "" -> "<model>-<norm>-<strategy>"
    seed: int = 0  # fixes partitions, model init, client sampling and local shuffling
    client_num_cpus: float = 1.0  # Ray resources per ClientApp (fedkn run; flwr run: --federation-config)
    client_num_gpus: float = 0.0  # e.g. 0.25 = four clients share one GPU
    output_dir: str = "runs"  # each run writes <output-dir>/<timestamp>-<name>/

    def validate(self) -> None:
        self.check("seed", self.seed >= 0, "0 or more")
        self.check("client_num_cpus", self.client_num_cpus > 0.0, "positive")
        self.check("client_num_gpus", self.client_num_gpus >= 0.0, "0 or more")
        self.check("output_dir", bool(self.output_dir.strip()), "a directory path")
        if self.name and (set(self.name) & set('/\\:*?"<>|') or self.name.startswith(".")):
            raise FedknError(f"config key 'name' must be usable as a directory name, got {self.name!r}")


_ALL_SECTIONS: dict[str, type[Section]] = {"run": RunSettings, **sec.SECTIONS}

#: Every flat key (snake case) -> (sub-config attribute of RunConfig, field), in the order of
#: ``to_flower()`` and config.toml.
KEYS: dict[str, tuple[str, str]] = {
    cls.key_of(f).replace("-", "_"): (section, f.name) for section, cls in _ALL_SECTIONS.items() for f in fields(cls)
}


def valid_keys() -> list[str]:
    return [k.replace("_", "-") for k in KEYS]


@dataclass(frozen=True)
class RunConfig:
    """Everything one federated run needs. Defaults = the README's quick CPU run on ``digits``.

    Each layer receives the sub-config it reads: the data layer :attr:`data`, model building
    :attr:`model`, local training :attr:`train`, the strategies :attr:`federation` (and
    :attr:`client_dp`), DP-SGD :attr:`privacy`. Build one from flat keys with :meth:`of`,
    :meth:`from_dict`, :meth:`from_sources` or :meth:`from_flower`.
    """

    run: RunSettings = field(default_factory=RunSettings)
    data: sec.DataConfig = field(default_factory=sec.DataConfig)
    model: sec.ModelConfig = field(default_factory=sec.ModelConfig)
    train: sec.TrainConfig = field(default_factory=sec.TrainConfig)
    federation: sec.FederationConfig = field(default_factory=sec.FederationConfig)
    privacy: sec.PrivacyConfig = field(default_factory=sec.PrivacyConfig)
    client_dp: sec.ClientDPConfig = field(default_factory=sec.ClientDPConfig)

    def __post_init__(self) -> None:
        for name, cls in _ALL_SECTIONS.items():
            if not isinstance(getattr(self, name), cls):
                raise FedknError(f"RunConfig.{name} must be a {cls.__name__}, got {type(getattr(self, name)).__name__}")
        cross_checks(self)

    # -- constructors -----------------------------------------------------------------------------
    @classmethod
    def of(cls, **values: Any) -> RunConfig:
        """From flat keys as keyword arguments: ``RunConfig.of(norm="gn", lr=0.1)``."""
        return cls.from_dict(values)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any], *, source: str = "config") -> RunConfig:
        """Build from a mapping of flat kebab- or snake-case keys (a Flower run config, a TOML table)."""
        flat = _expand_rule_norm(normalize_keys(values, source=source))
        parts: dict[str, dict[str, Any]] = {name: {} for name in _ALL_SECTIONS}
        for key, value in flat.items():
            section, attr = KEYS[key]
            parts[section][attr] = value
        return cls(run=RunSettings(**parts["run"]), data=sec.DataConfig(**parts["data"]), model=sec.ModelConfig(**parts["model"]),
                   train=sec.TrainConfig(**parts["train"]), federation=sec.FederationConfig(**parts["federation"]),
                   privacy=sec.PrivacyConfig(**parts["privacy"]), client_dp=sec.ClientDPConfig(**parts["client_dp"]))

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
            values.update(normalize_keys(load_toml(preset), source=str(preset)))
        if overrides:
            values.update(normalize_keys(overrides, source="overrides"))
        values.update(parse_sets(sets))
        return cls.from_dict(values)

    @classmethod
    def from_flower(cls, run_config: Mapping[str, Any]) -> RunConfig:
        """From Flower's ``context.run_config`` or a message ConfigRecord (kebab-case keys)."""
        return cls.from_dict(run_config, source="run config")

    # -- views --------------------------------------------------------------------------------------
    def to_flower(self) -> dict[str, bool | int | float | str]:
        """Flat kebab-case dict, the shape of ``[tool.flwr.app.config]`` and of a ConfigRecord."""
        return {k.replace("_", "-"): getattr(getattr(self, section), attr) for k, (section, attr) in KEYS.items()}

    def replace(self, **changes: Any) -> RunConfig:
        """A copy with flat keys changed (``cfg.replace(lr=0.1, seed=2)``), checked like any config."""
        return RunConfig.from_dict({**self.to_flower(), **normalize_keys(changes, source="replace")})

    @property
    def run_name(self) -> str:
        return self.run.name or f"{self.model.name}-{self.model.norm}-{self.federation.strategy}"

    @property
    def agc_ratio(self) -> float:
        """The AGC clipping ratio local training uses (``agc-clip``, or the norm's default); 0 = off."""
        from fedkn.nn.norms import NORMS

        return self.train.agc_clip if self.train.agc_clip >= 0 else NORMS[self.model.norm].agc_clip

    @property
    def clients_per_round(self) -> int:
        """Clients sampled for training each round (Flower's rule, :func:`fedkn.sampling.sample_size`)."""
        return sample_size(self.data.num_clients, self.federation.fraction_train)


# ----------------------------------------------------------------------------------------------------
# rules that span sub-configs
# ----------------------------------------------------------------------------------------------------


def cross_checks(cfg: RunConfig) -> None:
    """Every rule that relates two sub-configs; each sub-config has checked its own values."""
    from fedkn.nn.norms import NORMS

    data, model, fed = cfg.data, cfg.model, cfg.federation
    check(fed.min_clients <= data.num_clients, "min-clients", f"in 1..num-clients ({data.num_clients})", fed.min_clients)
    if fed.strategy in sec.RULE_NORMS and model.norm != sec.RULE_NORMS[fed.strategy][0]:
        layer = sec.RULE_NORMS[fed.strategy][0]
        raise FedknError(f"strategy '{fed.strategy}' {sec.RULE_NORMS[fed.strategy][1]}, so it needs norm '{layer}' "
                         f"(got norm '{model.norm}')")
    if cfg.train.batch_size == 1 and not NORMS[model.norm].batch_independent:
        independent = ", ".join(n for n, spec in NORMS.items() if spec.batch_independent)
        raise FedknError(
            f"batch-size 1 does not work with norm '{model.norm}' (BatchNorm needs 2+ samples per batch); "
            f"use batch-size >= 2 or a batch-independent norm: {independent}"
        )
    if cfg.privacy.enabled:  # the privacy layer checks its settings and the norm (Opacus: imported only now)
        from fedkn.privacy.dpsgd import settings_from_config
        from fedkn.privacy.validate import check_norm

        check_norm(model.norm)
        settings_from_config(cfg.privacy)
    if cfg.client_dp.enabled:
        check_client_dp_strategy(fed.strategy)
    cfg.client_dp.check_adaptive(cfg.clients_per_round)


def check_client_dp_strategy(strategy: str) -> None:
    """Client-level DP's guarantee holds only for a plain (uniform) mean of the client models."""
    if strategy not in AVERAGING_STRATEGIES:
        raise FedknError(
            f"client-level DP needs strategy {' or '.join(AVERAGING_STRATEGIES)} (plain averaging); "
            f"strategy '{strategy}' changes the aggregate after averaging or keeps layers local"
        )


# ----------------------------------------------------------------------------------------------------
# flat keys from files, --set and mappings
# ----------------------------------------------------------------------------------------------------


def normalize_keys(values: Mapping[str, Any], *, source: str) -> dict[str, Any]:
    """Snake-case flat keys; an unknown key or a table value is one line naming the valid keys."""
    out: dict[str, Any] = {}
    for key, value in values.items():
        if not isinstance(key, str):
            raise FedknError(f"config keys must be strings, got {key!r} in {source}")
        name = key.strip().replace("-", "_")
        if name not in KEYS:
            raise FedknError(f"unknown config key '{key}'; valid keys: {', '.join(valid_keys())}")
        if isinstance(value, Mapping):
            raise FedknError(f"config key '{key}' in {source} must be a single value, not a table")
        out[name] = value
    return out


def _expand_rule_norm(values: dict[str, Any]) -> dict[str, Any]:
    """A rule norm -> its layer norm + the strategy of its name (:data:`~fedkn.config.sections.RULE_NORMS`). The default
    strategy (fedavg) gives way, since Flower's run config always carries every key; an explicit
    other strategy is a contradiction."""
    norm = values.get("norm")
    if norm not in sec.RULE_NORMS:
        return values
    layer, strategy = sec.RULE_NORMS[norm][0], values.get("strategy", norm)
    if strategy not in ("fedavg", norm):
        raise FedknError(f"norm '{norm}' means norm '{layer}' with strategy '{norm}', but strategy is '{strategy}'")
    return {**values, "norm": layer, "strategy": norm}


def parse_sets(sets: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """``["lr=0.1", "norm=gn"]`` -> ``{"lr": "0.1", "norm": "gn"}`` (typed by the sub-configs)."""
    out: dict[str, Any] = {}
    for item in sets:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise FedknError(f"--set expects key=value, got '{item}'")
        out.update(normalize_keys({key.strip(): value.strip()}, source="--set"))
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
