"""`cpmctl model info`: the published CPM sizes, counted on the meta device."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

RECIPES = Path(__file__).resolve().parent.parent / "recipes"
PUBLISHED = {  # docs/design.md §5
    "cpm1-small": 109e6,
    "cpm1-medium": 334e6,
    "cpm1-large": 2.6e9,
    "cpm2": 11e9,
    "cpm2-moe": 198e9,
}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_recipes_have_the_published_sizes(name, cli):
    result = cli("model", "info", "--recipe", RECIPES / f"{name}.toml", "--json")
    assert result.code == 0, result.err
    parameters = json.loads(result.out)["parameters"]
    assert abs(parameters - PUBLISHED[name]) / PUBLISHED[name] < 0.02


def test_overrides_and_errors(cli):
    small = RECIPES / "cpm1-small.toml"
    deeper = json.loads(cli("model", "info", "-r", small, "--set", "model.n_layers=24",
                            "--json").out)
    assert deeper["layers"] == 24 and deeper["parameters"] > 190e6
    result = cli("model", "info", "-r", small, "--set", "model.n_layer=7")
    assert result.code == 2
    assert result.err.strip() == ("error: --set: unknown key model.n_layer "
                                  "(did you mean model.n_layers?)")
    table = cli("model", "info", "-r", small)
    assert table.code == 0 and "109M parameters" in table.out


def test_the_cli_starts_without_importing_torch():
    """torch takes seconds to import: only the commands that need it may import it."""
    code = "import sys, cpmctl.cli; print('torch' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.stdout.strip() == "False", done.stderr


def test_bench_train_compares_with_transformers(cli):
    result = cli("bench", "train", "--recipe", "tiny-gpt", "--steps", "1", "--set",
                 "model.vocab_size=256", "--json")
    assert result.code == 0, result.err
    report = json.loads(result.out)
    assert [(r["model"], r["precision"]) for r in report["runs"]] == [
        ("cpmctl GPT", "fp32"), ("transformers GPT2LMHeadModel", "fp32"),
        ("cpmctl GPT", "bf16"), ("transformers GPT2LMHeadModel", "bf16")]
    assert all(r["tokens_per_s"] > 0 and r["gflop_per_s"] > 0 for r in report["runs"])
    assert set(report["speedup"]) == {"fp32", "bf16"}
    fp32 = cli("bench", "train", "--recipe", "tiny-gpt", "--steps", "1", "--set",
               "model.vocab_size=256", "--precisions", "fp32", "--json")
    assert fp32.code == 0, fp32.err
    assert [r["precision"] for r in json.loads(fp32.out)["runs"]] == ["fp32", "fp32"]
    int8 = cli("bench", "train", "--precisions", "int8")
    assert int8.code == 2 and "--precisions: expected some of fp32, bf16" in int8.err
    moe = cli("bench", "train", "--recipe", "tiny-moe")
    assert moe.code == 2 and "needs a dense gpt recipe" in moe.err
