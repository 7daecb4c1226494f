"""``fedkn partition`` end to end through fedkn.cli.main."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from fedkn.cli import main


def test_partition_writes_table_json_and_png(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    assert main(["partition", "--num-clients", "6", "--partition", "dir0.3", "--seed", "3", "--out", str(out)]) == 0
    stdout = capsys.readouterr().out
    assert "dirichlet:alpha=0.3,min_samples=2, seed 3" in stdout and "total" in stdout and "non-IID:" in stdout
    assert (out / "partition.png").stat().st_size > 1000
    record = json.loads((out / "partition.json").read_text())
    assert record["scheme"] == "dirichlet" and record["params"] == {"alpha": 0.3, "min_samples": 2}
    assert record["seed"] == 3 and record["num_clients"] == 6
    indices = np.sort(np.concatenate([c["indices"] for c in record["clients"]]))
    assert np.array_equal(indices, np.arange(1438))
    assert [c["count"] for c in record["clients"]] == [sum(c["label_counts"]) for c in record["clients"]]


def test_scheme_flags_and_default_output_dir(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    args = ["partition", "--scheme", "classes-balance", "--classes-per-client", "2", "--balance", "0.5"]
    assert main(args) == 0
    (run_dir,) = (tmp_path / "runs").glob("partition-digits-classes-balance-*")
    assert (run_dir / "partition.json").is_file() and (run_dir / "partition.png").is_file()
    assert str(Path("runs") / run_dir.name) in capsys.readouterr().out


@pytest.mark.parametrize(
    "args",
    [
        ["--scheme", "dirichlet", "--alpha", "-1"],
        ["--partition", "dir0"],
        ["--partition", "2cls", "--alpha", "0.3"],
        ["--num-clients", "5000"],
        ["--dataset", "cifar10", "--data-dir", "/nonexistent"],
    ],
)
def test_bad_input_is_one_stderr_line_and_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str]
) -> None:
    assert main(["partition", "--out", str(tmp_path), *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("fedkn: error: ") and err.count("\n") == 1 and "Traceback" not in err
    assert not (tmp_path / "partition.json").exists()


def test_help_has_examples(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["partition", "--help"])
    assert exit_info.value.code == 0
    assert "fedkn partition --partition dir0.3" in capsys.readouterr().out
