"""The run configuration: frozen sub-configs composed into one :class:`RunConfig`, parsed once at the edge.

- :mod:`fedkn.config.values`: typing of the flat values users type, and :class:`Section`, the
  base of every sub-config.
- :mod:`fedkn.config.sections`: the sub-configs (data, model, local training, federation,
  sample-level DP, client-level DP), each checking its own values.
- :mod:`fedkn.config.run`: :class:`RunConfig`, the flat key table, the rules that span
  sub-configs, TOML presets and ``--set``.
"""

from fedkn.config.run import (
    AVERAGING_STRATEGIES,
    KEYS,
    RunConfig,
    RunSettings,
    check_client_dp_strategy,
    load_toml,
    parse_sets,
    valid_keys,
)
from fedkn.config.sections import (
    CLIENT_DP_MODES,
    RULE_NORMS,
    STRATEGIES,
    ClientDPConfig,
    DataConfig,
    FederationConfig,
    ModelConfig,
    PrivacyConfig,
    TrainConfig,
)

__all__ = [
    "AVERAGING_STRATEGIES",
    "CLIENT_DP_MODES",
    "KEYS",
    "RULE_NORMS",
    "STRATEGIES",
    "ClientDPConfig",
    "DataConfig",
    "FederationConfig",
    "ModelConfig",
    "PrivacyConfig",
    "RunConfig",
    "RunSettings",
    "TrainConfig",
    "check_client_dp_strategy",
    "load_toml",
    "parse_sets",
    "valid_keys",
]
