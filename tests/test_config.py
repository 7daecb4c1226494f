"""RunConfig: defaults, precedence, kebab-case keys, validation with one clear line."""

from __future__ import annotations

import dataclasses
import tomllib
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedkn.cli import main
from fedkn.config import RULE_NORMS, STRATEGIES, RunConfig, load_toml, parse_sets, valid_keys
from fedkn.errors import FedknError

ROOT = Path(__file__).resolve().parents[1]


def test_defaults_are_valid_and_match_pyproject_run_config():
    cfg = RunConfig()
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    flower = pyproject["tool"]["flwr"]["app"]["config"]
    assert flower == cfg.to_flower(), "[tool.flwr.app.config] must list every RunConfig key with its default"
    assert RunConfig.from_flower(flower) == cfg
    assert pyproject["tool"]["flwr"]["app"]["components"] == {
        "serverapp": "fedkn.app.server_app:app",
        "clientapp": "fedkn.app.client_app:app",
    }
    # The README's defaults: digits, small KN model, 10 clients, Dirichlet 0.3, batch 8.
    assert (cfg.data.dataset, cfg.model.name, cfg.model.norm, cfg.data.num_clients, cfg.data.partition, cfg.train.batch_size) == (
        "digits", "resnet8", "kn", 10, "dir0.3", 8,
    )
    assert cfg.model.width <= 0.5 and cfg.federation.strategy == "fedavg"


@pytest.mark.parametrize("preset", sorted((ROOT / "configs").glob("*.toml")), ids=lambda p: p.name)
def test_every_preset_parses(preset):
    cfg = RunConfig.from_sources(preset)
    assert cfg.run_name


def test_precedence_defaults_preset_overrides_sets(tmp_path):
    preset = tmp_path / "p.toml"
    preset.write_text('lr = 0.2\nnum-rounds = 7\nnorm = "gn"\n')
    cfg = RunConfig.from_sources(preset, {"norm": "ln", "num_rounds": 9}, ["num-rounds=11"])
    assert (cfg.train.lr, cfg.model.norm, cfg.federation.num_rounds, cfg.train.batch_size) == (0.2, "ln", 11, 8)


def test_sets_are_typed_and_kebab_or_snake():
    cfg = RunConfig.from_sources(sets=["num_clients=4", "lr=1e-3", "augment=true", "name=x", "width=1"])
    assert cfg.data.num_clients == 4 and isinstance(cfg.data.num_clients, int)
    assert cfg.train.lr == 1e-3 and cfg.data.augment is True and cfg.run.name == "x"
    assert cfg.model.width == 1.0 and isinstance(cfg.model.width, float)


def test_norm_fedbn_means_bn_with_fedbn_strategy():
    cfg = RunConfig.from_sources(sets=["norm=fedbn"])
    assert (cfg.model.norm, cfg.federation.strategy) == ("bn", "fedbn")
    assert RunConfig.of(norm="fedbn").federation.strategy == "fedbn"
    # Flower's run config carries every key, so the default strategy must give way:
    assert RunConfig.from_flower({**RunConfig().to_flower(), "norm": "fedbn"}).federation.strategy == "fedbn"
    assert cfg.run_name == "resnet8-bn-fedbn"


@pytest.mark.parametrize(
    "sets, fragment",
    [
        (["foo=1"], "unknown config key 'foo'; valid keys: name, seed"),
        (["num-clients=0"], "'num-clients' must be at least 1"),
        (["num-clients=2.5"], "'num-clients' must be an integer"),
        (["lr=-1"], "'lr' must be positive"),
        (["lr=fast"], "'lr' must be a number"),
        (["lr=nan"], "'lr' must be a finite number"),
        (["fraction-train=1.5"], "'fraction-train' must be in (0, 1]"),
        (["momentum=1"], "'momentum' must be in [0, 1)"),
        (["val-fraction=-0.1"], "'val-fraction' must be in [0, 1)"),
        (["test-fraction=0.5", "val-fraction=0.5"], "'test-fraction + val-fraction' must be below 1"),
        (["eval-every=0"], "'eval-every' must be at least 1"),
        (["augment=maybe"], "'augment' must be true or false"),
        (["norm=bogus"], "unknown norm 'bogus' (config key 'norm'); valid norms: kn, bn"),
        (["model=alexnet"], "'model' must be one of resnet8"),
        (["dataset=imagenet"], "'dataset' must be one of digits"),
        (["strategy=scaffold"], "'strategy' must be one of fedavg"),
        (["partition=dir-1"], "config key 'partition'"),
        (["partition=zipf"], "config key 'partition'"),
        (["norm=bn", "batch-size=1"], "batch-size 1 does not work with norm 'bn'"),
        (["norm=fedbn", "batch-size=1"], "batch-independent norm: kn"),
        (["norm=kn", "strategy=fedbn"], "strategy 'fedbn' keeps BatchNorm state local, so it needs norm 'bn'"),
        (["norm=fedbn", "strategy=fedprox"], "norm 'fedbn' means norm 'bn' with strategy 'fedbn'"),
        (["model=knresnet18", "norm=gn"], "model 'knresnet18' cannot use norm 'gn'"),
        (["name=a/b"], "'name' must be usable as a directory name"),
        (["lr"], "--set expects key=value"),
    ],
)
def test_bad_values_are_one_clear_line(sets, fragment):
    with pytest.raises(FedknError) as info:
        RunConfig.from_sources(sets=sets)
    message = str(info.value)
    assert fragment in message
    assert "\n" not in message


def test_bool_is_not_an_int_and_toml_types_are_checked(tmp_path):
    with pytest.raises(FedknError, match="'num-rounds' must be an integer"):
        RunConfig.from_dict({"num-rounds": True})
    bad = tmp_path / "bad.toml"
    bad.write_text('num-rounds = "many"\n')
    with pytest.raises(FedknError, match="'num-rounds' must be an integer, got 'many'"):
        RunConfig.from_sources(bad)
    table = tmp_path / "table.toml"
    table.write_text("[lr]\nvalue = 1\n")
    with pytest.raises(FedknError, match="must be a single value"):
        RunConfig.from_sources(table)


def test_preset_file_errors(tmp_path):
    with pytest.raises(FedknError, match="not found"):
        load_toml(tmp_path / "missing.toml")
    broken = tmp_path / "broken.toml"
    broken.write_text("lr = = 1\n")
    with pytest.raises(FedknError, match="is not valid TOML"):
        load_toml(broken)
    wrapped = tmp_path / "wrapped.toml"
    wrapped.write_text("[config]\nlr = 0.3\n")
    assert RunConfig.from_sources(wrapped).train.lr == 0.3


def test_frozen_and_replace():
    cfg = RunConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.train.lr = 1.0  # type: ignore[misc]
    assert cfg.replace(lr=0.5).train.lr == 0.5
    with pytest.raises(FedknError):
        cfg.replace(num_rounds=0)


def test_parse_sets_and_valid_keys():
    with pytest.raises(FedknError, match="unknown config key 'a-b'"):
        parse_sets(["a-b=1"])
    assert parse_sets(["seed = 3"]) == {"seed": "3"}
    assert "num-clients" in valid_keys() and "num_clients" not in valid_keys()


@settings(max_examples=40, deadline=None)
@given(
    num_clients=st.integers(1, 500),
    lr=st.floats(1e-6, 10.0, allow_nan=False),
    fraction=st.floats(0.01, 1.0),
    strategy=st.sampled_from([s for s in STRATEGIES if s not in RULE_NORMS]),  # those need norm bn
    norm=st.sampled_from(["kn", "gn", "ln", "none", "nf", "bn"]),
    batch=st.integers(2, 64),
)
def test_round_trip_through_flower_and_sets(num_clients, lr, fraction, strategy, norm, batch):
    cfg = RunConfig.of(num_clients=num_clients, lr=lr, fraction_train=fraction, strategy=strategy, norm=norm, batch_size=batch)
    assert RunConfig.from_flower(cfg.to_flower()) == cfg
    sets = [f"{k}={v}" for k, v in cfg.to_flower().items()]
    assert RunConfig.from_sources(sets=sets) == cfg


def test_cli_rejects_bad_config_with_one_line_and_no_run_dir(tmp_path, capsys):
    out = tmp_path / "runs"
    code = main(["run", "--set", f"output-dir={out}", "--set", "lr=-0.1"])
    err = capsys.readouterr().err
    assert code == 2
    assert err.strip() == "fedkn: error: config key 'lr' must be positive, got -0.1"
    assert not out.exists()
    code = main(["run", "--config", str(tmp_path / "nope.toml")])
    assert code == 2 and "not found" in capsys.readouterr().err


def test_cli_resume_errors(tmp_path, capsys):
    assert main(["run", "--resume", str(tmp_path / "nope")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["run", "--resume", str(tmp_path)]) == 2
    assert "not a fedkn run directory" in capsys.readouterr().err


def test_every_flat_key_is_one_field_of_one_sub_config():
    from fedkn.config import KEYS

    cfg = RunConfig.of(lr=0.3, dp_delta=1e-6, client_dp_clip_lr=0.5, model="resnet8", seed=4)
    assert (cfg.train.lr, cfg.privacy.delta, cfg.client_dp.clip_lr, cfg.model.name, cfg.run.seed) == (0.3, 1e-6, 0.5, "resnet8", 4)
    targets = list(KEYS.values())
    assert len(set(targets)) == len(targets) == len(valid_keys())
    for key, (section, attr) in KEYS.items():
        assert dataclasses.is_dataclass(getattr(cfg, section)) and hasattr(getattr(cfg, section), attr), key
    assert sorted(k.replace("-", "_") for k in cfg.to_flower()) == sorted(KEYS)


def test_sub_configs_check_their_own_values_and_name_the_flat_key():
    from fedkn.config import ClientDPConfig, DataConfig, FederationConfig, PrivacyConfig, TrainConfig

    assert TrainConfig(lr="0.5").lr == 0.5  # typed on construction, like the flat keys
    for build, message in (
        (lambda: TrainConfig(lr=0.0), "config key 'lr' must be positive, got 0.0"),
        (lambda: DataConfig(test_fraction=0.6, val_fraction=0.5), "'test-fraction + val-fraction' must be below 1"),
        (lambda: FederationConfig(strategy="fedsgd"), "config key 'strategy' must be one of fedavg"),
        (lambda: PrivacyConfig(noise_multiplier=-1.0), "config key 'dp-noise-multiplier' must be 0 (off) or positive"),
        (lambda: PrivacyConfig(enabled=True), "exactly one of dp-noise-multiplier and dp-target-epsilon"),
        (lambda: ClientDPConfig(clip_lr=0.0), "config key 'client-dp-clip-lr' must be positive"),
        (lambda: ClientDPConfig(mode="on"), "config key 'client-dp' must be one of off"),
    ):
        with pytest.raises(FedknError, match=message.replace("(", r"\(").replace(")", r"\)").replace("+", r"\+")):
            build()
    # Rules that relate sub-configs are checked where they meet: in RunConfig.
    fed = FederationConfig(min_clients=5)
    with pytest.raises(FedknError, match=r"'min-clients' must be in 1..num-clients \(3\)"):
        RunConfig(data=DataConfig(num_clients=3), federation=fed)
    assert RunConfig(data=DataConfig(num_clients=5), federation=fed).federation.min_clients == 5


def test_config_imports_no_layer_above_it():
    """fedkn.config is the bottom of the tree for strategies and the apps: importing it pulls in
    neither Flower nor the strategies (they import it, not the other way round)."""
    import subprocess
    import sys

    code = ("import sys, fedkn.config; fedkn.config.RunConfig.of(norm='fedbn'); fedkn.config.RunConfig.of(client_dp='server-fixed'); "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('strategies', 'flwr', 'opacus')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT).stdout
    assert out.strip() == "[]"
