"""The sub-configs of a run, one per layer that reads them; each checks its own values.

- :class:`DataConfig`: which dataset, how many clients, how it is partitioned and split.
- :class:`ModelConfig`: architecture, normalization, width.
- :class:`TrainConfig`: one client's local training (and evaluation batch size).
- :class:`FederationConfig`: the server's schedule and strategy (with each strategy's options).
- :class:`PrivacyConfig`: sample-level DP (DP-SGD in every client).
- :class:`ClientDPConfig`: client-level DP (Flower's DP strategy wrappers).

Names that a layer's registry owns (datasets, models, norms, partition specs) are checked against
that registry, imported when a section is checked (the registries import torch). Rules that span
sections (a norm a model lacks, BatchNorm under DP-SGD, ...) live in :mod:`fedkn.config.run`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from fedkn.config.values import Section, check
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
#: Client-level DP modes ("off" = no client-level DP).
CLIENT_DP_MODES: tuple[str, ...] = ("off", "server-fixed", "client-fixed", "server-adaptive", "client-adaptive")


def _fraction(value: float, *, closed: bool) -> bool:
    return 0.0 <= value <= 1.0 if closed else 0.0 <= value < 1.0


@dataclass(frozen=True)
class DataConfig(Section):
    dataset: str = "digits"
    data_dir: str = ""  # where non-embedded datasets live ("" = not needed for digits)
    num_clients: int = 10
    partition: str = "dir0.3"  # iid | dir<alpha> | shards<k> | classes-balance:... (fedkn.data)
    test_fraction: float = 0.2  # share of each client's data held out as its local test split
    val_fraction: float = 0.0  # share held out as validation (lr tuning scores on it; never trained on)
    augment: bool = False

    def validate(self) -> None:
        from fedkn.data import DATASETS, parse_partition, resolve_params

        self.check("num_clients", self.num_clients >= 1, "at least 1")
        self.check("test_fraction", _fraction(self.test_fraction, closed=False), "in [0, 1)")
        self.check("val_fraction", _fraction(self.val_fraction, closed=False), "in [0, 1)")
        check(self.test_fraction + self.val_fraction < 1.0, "test-fraction + val-fraction", "below 1 (room for training)",
              self.test_fraction + self.val_fraction)
        self.check("dataset", self.dataset in DATASETS, f"one of {', '.join(DATASETS)}")
        try:
            resolve_params(*parse_partition(self.partition))
        except FedknError as err:
            raise FedknError(f"config key 'partition': {err}") from None


@dataclass(frozen=True)
class ModelConfig(Section):
    name: str = field(default="resnet8", metadata={"key": "model"})
    norm: str = "kn"  # a layer norm of fedkn.nn.norms (rule norms such as fedbn are expanded by RunConfig)
    width: float = 0.25

    def validate(self) -> None:
        from fedkn.models import MODELS
        from fedkn.nn.norms import check_norm_name

        self.check("width", self.width > 0.0, "positive")
        self.check("name", self.name in MODELS, f"one of {', '.join(MODELS)}")
        check_norm_name(self.norm, also=tuple(RULE_NORMS), where=" (config key 'norm')")
        if self.norm in RULE_NORMS:  # only in code: flat keys expand it (RunConfig.of(norm=...))
            layer = RULE_NORMS[self.norm][0]
            raise FedknError(f"norm '{self.norm}' is norm '{layer}' with strategy '{self.norm}'; set those two")
        if self.norm not in MODELS[self.name].norms:
            raise FedknError(f"model '{self.name}' cannot use norm '{self.norm}'; it supports {', '.join(MODELS[self.name].norms)}")


@dataclass(frozen=True)
class TrainConfig(Section):
    batch_size: int = 8
    local_epochs: int = 1
    local_steps: int = 0  # > 0: this many SGD steps per round instead of local-epochs
    lr: float = 0.01  # one value that trains every norm on the default setting (kn also fine at 0.05)
    agc_clip: float = -1.0  # adaptive gradient clipping ratio; -1 = the norm's default (0.01 for nf, off otherwise), 0 = off
    momentum: float = 0.9
    weight_decay: float = 5e-4
    eval_batch_size: int = 256

    def validate(self) -> None:
        self.check("batch_size", self.batch_size >= 1, "at least 1")
        self.check("eval_batch_size", self.eval_batch_size >= 1, "at least 1")
        self.check("local_epochs", self.local_epochs >= 1, "at least 1")
        self.check("local_steps", self.local_steps >= 0, "0 (use local-epochs) or more")
        self.check("lr", self.lr > 0.0, "positive")
        self.check("momentum", _fraction(self.momentum, closed=False), "in [0, 1)")
        self.check("weight_decay", self.weight_decay >= 0.0, "0 or more")
        self.check("agc_clip", self.agc_clip == -1.0 or self.agc_clip >= 0.0, "-1 (the norm's default), 0 (off) or positive")


@dataclass(frozen=True)
class FederationConfig(Section):
    strategy: str = "fedavg"
    num_rounds: int = 15
    fraction_train: float = 1.0  # share of clients sampled for training each round
    fraction_evaluate: float = 1.0  # share of clients sampled for federated evaluation
    min_clients: int = 1  # a round needs replies from this many clients (lost SuperNodes are dropped)
    eval_every: int = 1  # centralized test evaluation every k rounds (round 0 and the last always)
    keep_models: int = 0  # also keep the global model of each of the last k rounds (models/): lr tuning averages their scores
    round_timeout: float = 600.0  # seconds to wait for the clients of one round
    proximal_mu: float = 0.01  # fedprox
    fixbn_round: int = 0  # fixbn: last round of plain FedAvg+BN before the statistics freeze; 0 = half of num-rounds
    server_lr: float = 1.0  # fedavgm
    server_momentum: float = 0.9  # fedavgm
    fedadam_eta: float = 0.01  # fedadam server learning rate
    fedadam_beta1: float = 0.9
    fedadam_beta2: float = 0.99
    fedadam_tau: float = 0.001

    def validate(self) -> None:
        self.check("strategy", self.strategy in STRATEGIES, f"one of {', '.join(STRATEGIES)}")
        self.check("num_rounds", self.num_rounds >= 1, "at least 1")
        self.check("fraction_train", 0.0 < self.fraction_train <= 1.0, "in (0, 1]")
        self.check("fraction_evaluate", _fraction(self.fraction_evaluate, closed=True), "in [0, 1]")
        self.check("min_clients", self.min_clients >= 1, "at least 1")
        self.check("eval_every", self.eval_every >= 1, "at least 1")
        self.check("keep_models", self.keep_models >= 0, "0 (off) or a number of rounds")
        self.check("round_timeout", self.round_timeout > 0.0, "positive (seconds)")
        self.check("proximal_mu", self.proximal_mu >= 0.0, "0 or more")
        self.check("fixbn_round", self.fixbn_round >= 0, "0 (half of num-rounds) or a round number")
        self.check("server_lr", self.server_lr > 0.0, "positive")
        self.check("server_momentum", _fraction(self.server_momentum, closed=False), "in [0, 1)")
        self.check("fedadam_eta", self.fedadam_eta > 0.0, "positive")
        self.check("fedadam_beta1", _fraction(self.fedadam_beta1, closed=False), "in [0, 1)")
        self.check("fedadam_beta2", _fraction(self.fedadam_beta2, closed=False), "in [0, 1)")
        self.check("fedadam_tau", self.fedadam_tau > 0.0, "positive")

    @property
    def keeps_local_state(self) -> bool:
        """True when part of the model (BatchNorm state under FedBN) never leaves the client."""
        return self.strategy == "fedbn"

    @property
    def fixbn_freeze_after(self) -> int:
        """FixBN's last exploration round (``fixbn-round``, 0 = half of num-rounds, at least 1)."""
        return self.fixbn_round or max(1, self.num_rounds // 2)

    def evaluates_centrally(self, server_round: int) -> bool:
        """Whether the global model is scored on the test set after ``server_round``: every
        ``eval-every`` rounds and after the last, never when clients keep part of the model."""
        due = server_round % self.eval_every == 0 or server_round == self.num_rounds
        return due and not self.keeps_local_state

    @property
    def first_kept_round(self) -> int:
        """The first round whose global model ``keep-models`` keeps (num-rounds + 1, none, when 0)."""
        return max(1, self.num_rounds - self.keep_models + 1)


@dataclass(frozen=True)
class PrivacyConfig(Section):
    """Sample-level DP: DP-SGD (Opacus) in every client's local training."""

    PREFIX = "dp-"

    enabled: bool = field(default=False, metadata={"key": "dp-sgd"})
    noise_multiplier: float = 0.0  # exactly one of these two > 0 when dp-sgd is on; the target
    target_epsilon: float = 0.0  # calibrates the noise to num-rounds x local steps per client
    max_grad_norm: float = 1.0  # per-sample clipping bound
    delta: float = 1e-5
    accountant: str = "rdp"  # rdp | prv | gdp

    def validate(self) -> None:
        self.check("noise_multiplier", self.noise_multiplier >= 0.0, "0 (off) or positive")
        self.check("target_epsilon", self.target_epsilon >= 0.0, "0 (off) or positive")
        if self.enabled and (self.noise_multiplier > 0) == (self.target_epsilon > 0):
            raise FedknError("dp-sgd needs exactly one of dp-noise-multiplier and dp-target-epsilon set above 0")


@dataclass(frozen=True)
class ClientDPConfig(Section):
    """Client-level DP: Flower's DP strategy wrappers (fedavg/fedprox only; see ``strategies.dp``)."""

    PREFIX = "client-dp-"

    mode: str = field(default="off", metadata={"key": "client-dp"})  # off | server-fixed | client-fixed | ...
    noise_multiplier: float = 1.0
    clipping_norm: float = 1.0  # the initial one for the adaptive modes
    target_quantile: float = 0.5  # adaptive: share of updates left unclipped
    clip_lr: float = 0.2  # adaptive: learning rate of the clipping norm
    count_stddev: float = 0.0  # adaptive: clipped-count noise; 0 = clients per round / 20 (Flower's default)
    delta: float = 1e-5

    def validate(self) -> None:
        self.check("mode", self.mode in CLIENT_DP_MODES, f"one of {', '.join(CLIENT_DP_MODES)}")
        self.check("noise_multiplier", self.noise_multiplier >= 0.0, "0 or more")
        self.check("clipping_norm", self.clipping_norm > 0.0, "positive")
        self.check("target_quantile", _fraction(self.target_quantile, closed=True), "in [0, 1]")
        self.check("clip_lr", self.clip_lr > 0.0, "positive")
        self.check("count_stddev", self.count_stddev >= 0.0, "0 (clients per round / 20) or more")
        self.check("delta", 0.0 < self.delta < 1.0, "in (0, 1)")

    @property
    def enabled(self) -> bool:
        return self.mode != "off"

    @property
    def adaptive(self) -> bool:
        return self.mode.endswith("adaptive")

    def count_noise(self, num_sampled_clients: int) -> float:
        """The clipped-count noise adaptive clipping uses (``count-stddev``, 0 = Flower's m / 20)."""
        return self.count_stddev if self.count_stddev > 0 else num_sampled_clients / 20

    def check_adaptive(self, num_sampled_clients: int) -> None:
        """Flower's condition for adaptive clipping: the clipped-count noise must exceed noise_multiplier / 2."""
        stddev = self.count_noise(num_sampled_clients)
        if self.adaptive and self.noise_multiplier > 0 and self.noise_multiplier >= 2 * stddev:
            raise FedknError(
                f"adaptive clipping with client-dp-noise-multiplier {self.noise_multiplier:g} needs a client-dp-count-stddev "
                f"above {self.noise_multiplier / 2:g} (it is {stddev:g}; the default 0 means clients per round / 20); "
                "set it higher, lower the noise multiplier or sample more clients per round"
            )


#: Every sub-config, in the order of their keys in ``to_flower()`` and config.toml.
SECTIONS: dict[str, type[Section]] = {
    "data": DataConfig,
    "model": ModelConfig,
    "train": TrainConfig,
    "federation": FederationConfig,
    "privacy": PrivacyConfig,
    "client_dp": ClientDPConfig,
}
