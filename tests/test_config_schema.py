"""The JSON Schema of the config: generated from the dataclasses, shipped beside the configs, and it agrees with
the loader on good and bad files."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import pytest
import yaml

from geximpute.apps.cli import main
from geximpute.config import load_config
from geximpute.config_schema import config_schema
from geximpute.errors import ConfigError

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


@pytest.fixture(scope="module")
def validator() -> jsonschema.Draft202012Validator:
    schema = config_schema()
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


def test_shipped_schema_is_the_generated_one(tmp_path):
    out = tmp_path / "schema.json"
    assert main(["config-schema", "--out", str(out)]) == 0
    assert json.loads(out.read_text()) == config_schema()
    shipped = CONFIGS / "geximpute.schema.json"
    assert json.loads(shipped.read_text()) == config_schema(), (
        "configs/geximpute.schema.json is stale: run `geximpute config-schema --out configs/geximpute.schema.json`")


def test_config_schema_out_names_a_missing_folder_or_a_folder(tmp_path, capsys):
    """A bare OS error (``No such file or directory ... (FileNotFoundError)``) before."""
    assert main(["config-schema", "--out", str(tmp_path / "absent" / "schema.json")]) == 2
    err = capsys.readouterr().err
    assert f"its folder {tmp_path / 'absent'} does not exist" in err and "Traceback" not in err
    assert main(["config-schema", "--out", str(tmp_path)]) == 2
    assert "a folder; give the file to write" in capsys.readouterr().err


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_are_valid_and_point_at_the_schema(validator, path):
    assert path.read_text().splitlines()[0] == "# yaml-language-server: $schema=geximpute.schema.json"
    validator.validate(yaml.safe_load(path.read_text()))


def test_synthetic_config_is_valid(validator, synth_small):
    validator.validate(yaml.safe_load((synth_small / "config.yaml").read_text()))


def test_descriptions_and_defaults_come_from_the_dataclasses():
    props = config_schema()["properties"]
    task = props["evaluation"]["properties"]["task"]
    assert task["enum"] == ["entries", "genes", "samples"] and task["default"] == "entries"
    assert "hides a random fraction" in task["description"]
    assert props["train"]["properties"]["epochs"] == {"type": "integer", "description": props["train"]["properties"]
                                                      ["epochs"]["description"], "default": 8}
    assert config_schema()["required"] == ["inputs"]


BAD = [
    ("unknown key", {"evaluation": {"taks": "genes"}}, "evaluation.taks"),
    ("value outside a choice", {"evaluation": {"task": "donors"}}, "evaluation.task"),
    ("wrong type", {"train": {"epochs": "eight"}}, "train.epochs"),
    ("boolean for a number", {"head": {"eta": True}}, "head.eta"),
    ("unknown section", {"trian": {"epochs": 2}}, "trian"),
]


@pytest.mark.parametrize(("why", "change", "key"), BAD, ids=[b[0] for b in BAD])
def test_bad_config_rejected_by_schema_and_loader(validator, tmp_path, why, change, key):
    data = yaml.safe_load((CONFIGS / "gtex-medians.yaml").read_text())
    for section, values in change.items():
        data.setdefault(section, {}).update(values)
    errors = list(validator.iter_errors(data))
    assert errors, f"schema accepted a config with a {why}"
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError, match=f"'{key}'"):
        load_config(bad)


BAD_METHODS = [("no method", []), ("an unknown method", ["distance", "nearest_gene"])]


@pytest.mark.parametrize(("why", "methods"), BAD_METHODS, ids=[b[0] for b in BAD_METHODS])
def test_the_schema_checks_evaluation_methods_as_the_loader_does(validator, tmp_path, why, methods):
    """The schema accepted any list of names (empty too) that the loader refuses: an editor passed a config that
    failed to load."""
    data = yaml.safe_load((CONFIGS / "gtex-medians.yaml").read_text())
    data.setdefault("evaluation", {})["methods"] = methods
    assert list(validator.iter_errors(data)), f"schema accepted {why}"
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError, match="evaluation.methods"):
        load_config(bad)


def test_a_section_with_every_key_commented_out_is_valid_to_the_schema(validator, tmp_path):
    """``train:`` with its keys commented out is null to YAML, which the loader reads as the section's defaults;
    the schema refused it, and an editor flagged a valid config."""
    data = yaml.safe_load((CONFIGS / "gtex-medians.yaml").read_text())
    data["genotypes"] = None
    assert not list(validator.iter_errors(data))
    path = tmp_path / "ok.yaml"
    path.write_text(yaml.safe_dump(data))
    assert load_config(path).genotypes == type(load_config(path).genotypes)()


def test_inputs_are_never_null_to_the_schema(validator):
    """Sections may be null (their defaults), but not `inputs`, whose files the loader needs."""
    data = yaml.safe_load((CONFIGS / "gtex-medians.yaml").read_text())
    data["inputs"] = None
    assert list(validator.iter_errors(data))
