"""Every norm appears wherever norms are listed: README, `fedkn run/compare --help`, the report, presets."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from fedkn.cli import main
from fedkn.cli.compare import DEFAULT_NORMS
from fedkn.compare.grid import parse_norms
from fedkn.compare.report import norm_legend
from fedkn.config import RULE_NORMS, RunConfig
from fedkn.nn.norms import NORMS

ROOT = Path(__file__).resolve().parents[1]
ALL_NAMES = [*NORMS, *RULE_NORMS]


def _help(capsys: pytest.CaptureFixture[str], command: str) -> str:
    with pytest.raises(SystemExit):
        main([command, "--help"])
    return capsys.readouterr().out


def test_readme_table_and_norm_list_name_every_norm():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    rows = set(re.findall(r"^\| `([a-z]+)` \|", readme, flags=re.MULTILINE))
    assert set(ALL_NAMES) <= rows, f"README registry table lacks {sorted(set(ALL_NAMES) - rows)}"
    listed = re.search(r"# any norm: (.*)$", readme, flags=re.MULTILINE)
    assert listed and set(ALL_NAMES) == {n.strip() for n in listed.group(1).split(",")}


def test_cli_help_and_compare_grid_accept_every_norm(capsys):
    for command in ("run", "compare"):
        text = _help(capsys, command)
        missing = [n for n in ALL_NAMES if not re.search(rf"\b{n}\b", text)]
        assert not missing, f"`fedkn {command} --help` does not name {missing}"
    assert parse_norms(",".join(ALL_NAMES)) == ALL_NAMES
    assert {"nf", "fixbn"} <= set(DEFAULT_NORMS)


def test_report_legend_says_what_each_norm_is():
    legend = norm_legend(["kn", "nf", "fedbn", "fixbn"])
    assert "`nf` = normalization-free" in legend and "`fixbn` = bn trained with the fixbn rule" in legend
    assert "?" not in norm_legend(ALL_NAMES)


@pytest.mark.parametrize("norm,preset", [("nf", "fedwon-digits.toml"), ("fixbn", "fixbn-digits.toml")])
def test_each_new_norm_has_a_preset(norm, preset):
    cfg = RunConfig.from_sources(ROOT / "configs" / preset)
    expected = (RULE_NORMS[norm][0], norm) if norm in RULE_NORMS else (norm, "fedavg")
    assert (cfg.model.norm, cfg.federation.strategy) == expected
