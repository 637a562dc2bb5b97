"""The typed config: YAML parsed into frozen dataclasses, validated, overridable with --set."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from geximpute.config import (
    Config,
    GenotypesConfig,
    PromoterConfig,
    TrainConfig,
    apply_overrides,
    dump_config,
    load_config,
)
from geximpute.errors import ConfigError

MINIMAL = """
name: toy
inputs:
  genes: data/genes.gtf
  expression: data/expr.gct
promoter:
  upstream: 200
"""


def test_load_resolves_paths_against_the_config_folder(write):
    path = write("cfg/config.yaml", MINIMAL)
    config = load_config(path)
    assert isinstance(config, Config)
    assert config.inputs.genes == str((path.parent / "data/genes.gtf").resolve())
    assert config.inputs.genome is None and config.inputs.samples is None
    assert config.promoter == PromoterConfig(upstream=200, downstream=500)
    assert config.output_dir == str((path.parent / "geximpute-out").resolve())
    # the model's folder, one rule for the step that writes it and those that read it
    assert config.model_dir == path.parent.resolve() / "geximpute-out" / "model"
    elsewhere = load_config(path, ["impute.model_dir=models/v2"])
    assert elsewhere.model_dir == path.parent.resolve() / "models" / "v2"
    # a committed output is a link to its version: the path is the link, not the version folder it names today
    # (fit-head run again with `impute.model_dir: model` wrote a new store inside the old version, a level deeper
    # each time)
    version = path.parent / ".model.geximpute" / "v-1"
    version.mkdir(parents=True)
    (path.parent / "model").symlink_to(Path(".model.geximpute") / "v-1")
    linked = load_config(path, ["impute.model_dir=model"])
    assert linked.model_dir == path.parent.resolve() / "model"
    # a user's own link (a folder on a bigger disk) is followed, as before
    big = path.parent / "big" / "predictions"
    big.mkdir(parents=True)
    (path.parent / "predictions").symlink_to(big)
    elsewhere = load_config(path, ["impute.out_dir=predictions"])
    assert elsewhere.impute.out_dir == str(big.resolve())


def test_config_is_frozen(write):
    config = load_config(write("config.yaml", MINIMAL))
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.seed = 3  # type: ignore[misc]


def test_set_overrides_parse_values_as_yaml(write):
    config = load_config(
        write("config.yaml", MINIMAL),
        ["promoter.downstream=300", "inputs.scale=counts", "inputs.gene_types=[protein_coding, lncRNA]"],
    )
    assert config.promoter.downstream == 300
    assert config.inputs.scale == "counts"
    assert config.inputs.gene_types == ("protein_coding", "lncRNA")


def test_a_config_folder_is_named_as_a_folder(tmp_path):
    with pytest.raises(ConfigError, match="a folder, not a config file"):
        load_config(tmp_path)


def test_a_mistyped_key_is_named_where_it_was_typed_with_the_closest_one(write):
    """A typo in a --set was blamed on the config file, with no suggestion among 19 keys."""
    with pytest.raises(ConfigError, match=r"--set trian.epochs: unknown config key 'trian' \(did you mean 'train'"):
        load_config(write("config.yaml", MINIMAL), ["trian.epochs=2"])
    with pytest.raises(ConfigError, match=r"unknown config key 'train.epoch' \(did you mean 'epochs'") as err:
        load_config(write("config.yaml", MINIMAL + "train:\n  epoch: 2\n"))
    assert "--set" not in str(err.value)  # the file's own typo


def test_ids_that_look_like_numbers_stay_the_ids_given(write):
    """YAML 1.1 (PyYAML) reads ``0012`` as octal 10 and ``1:30`` as base-60 90: a zero-padded or clock-like donor
    or tissue id given unquoted became another id. Numbers are YAML 1.2's (plain decimals); a single id is a list
    of one, a numeric one too."""
    config = load_config(write("config.yaml", MINIMAL), ["impute.donors=[0012, 1:30, HG00096, 7]",
                                                         "impute.tissues=1:30", "train.lr=1e-3"])
    assert config.impute.donors == ("0012", "1:30", "HG00096", "7") and config.impute.tissues == ("1:30",)
    assert config.train.lr == 0.001
    assert load_config(write("config.yaml", MINIMAL), ["impute.donors=1000017"]).impute.donors == ("1000017",)
    # numbers written YAML 1.1's way still read as numbers where a setting is a number
    grouped = load_config(write("config.yaml", MINIMAL + "genotypes:\n  cis_window: 1_000_000\n"),
                          ["train.epochs=1_000", "seed=017"])
    assert grouped.genotypes.cis_window == 1_000_000 and grouped.train.epochs == 1000 and grouped.seed == 17
    # and a config written out reads back the same (submit's job config, a bundle's): ids YAML 1.2 reads as
    # numbers are quoted
    ids = load_config(write("config.yaml", MINIMAL), ['impute.donors=["1e3", "5E4", "0012"]', 'name="2e5"'])
    again = load_config(write("again.yaml", dump_config(ids)))
    assert again.impute.donors == ("1e3", "5E4", "0012") and again.name == "2e5"


@pytest.mark.parametrize(
    ("override", "key", "value"),
    [
        ("promoter.upstream=-5", "promoter.upstream", "-5"),
        ("inputs.scale=fpkm", "inputs.scale", "'fpkm'"),
        ("promoter.soft_mask=lower", "promoter.soft_mask", "'lower'"),
        ("seed=abc", "seed", "'abc'"),
        ("ray.num_cpus=0", "ray.num_cpus", "0"),
        ("ray.data_object_store_mb=8", "ray.data_object_store_mb", "8"),
        ("head.ray_min_rows=-1", "head.ray_min_rows", "-1"),
        # accepted before, failing deep inside XGBoost after prepare and train had run, or running on wrongly
        ("head.subsample=0", "head.subsample", "0.0"),
        ("head.colsample_bytree=2", "head.colsample_bytree", "2.0"),
        ("head.max_depth=-1", "head.max_depth", "-1"),
        ("head.min_child_weight=-5", "head.min_child_weight", "-5.0"),
        ("head.cpus_per_worker=0", "head.cpus_per_worker", "0.0"),
        ("train.weight_decay=-1", "train.weight_decay", "-1.0"),
        ("train.max_examples_per_epoch=0", "train.max_examples_per_epoch", "0"),
        ("nightly.lease_seconds=.inf", "nightly.lease_seconds", "inf"),
        # infinite numbers passed every `> 0` check (a learning rate of inf trained NaN weights; a GPU wait of inf
        # polled for ever)
        ("train.lr=.inf", "train.lr", "expected a finite number"),
        ("impute.gpu_wait_seconds=.inf", "impute.gpu_wait_seconds", "expected a finite number"),
        # nothing to score: accepted, then a traceback from the plots after prepare and the tuning had run
        ("evaluation.methods=[]", "evaluation.methods", "at least one method"),
        ("head.min_child_weight=.nan", "head.min_child_weight", "expected a finite number"),
        ("baselines.pr_prior=-.inf", "baselines.pr_prior", "expected a finite number"),
        ("output_dir=", "output_dir", "''"),
        # a value YAML cannot build was a traceback (ValueError: day is out of range for month)
        ("nightly.run_date=2026-02-30", "nightly.run_date", "day is out of range"),
        # a VCF without the reference it is built on was read and then ignored (every genetic score missing)
        ("inputs.variants=people.vcf.gz", "inputs.genome", "whenever inputs.variants is set"),
    ],
)
def test_bad_values_name_the_key_and_the_value(write, override, key, value):
    with pytest.raises(ConfigError) as err:
        load_config(write("config.yaml", MINIMAL), [override])
    assert key in str(err.value) and value in str(err.value)
    assert "config.yaml" in str(err.value)


def test_ray_data_budget_caps_this_process_s_executions_and_none_restores_ray_s_default():
    from ray.data import DataContext

    from geximpute.config import RayConfig
    from geximpute.runtime.raytools import data_budget

    options = DataContext.get_current().execution_options
    before = options.resource_limits
    try:
        data_budget(RayConfig(data_object_store_mb=None))
        assert options.resource_limits == before
        data_budget(RayConfig(data_object_store_mb=64))
        assert options.resource_limits.object_store_memory == 64 * 2**20
        assert options.resource_limits.cpu == before.cpu  # only the object store budget changes
        # a later config of the same process without a budget gets Ray Data's own back, not the earlier cap
        data_budget(RayConfig(data_object_store_mb=None))
        assert options.resource_limits == before
    finally:
        options.resource_limits = before


def test_unknown_key_is_rejected_with_the_valid_keys(write):
    with pytest.raises(ConfigError, match=r"unknown config key 'promoter.upstrem'.*upstream"):
        load_config(write("config.yaml", MINIMAL), ["promoter.upstrem=10"])


def test_missing_required_input_is_named(write):
    with pytest.raises(ConfigError, match="inputs.expression"):
        load_config(write("config.yaml", "inputs:\n  genes: g.gtf\n"))


def test_yaml_is_only_parsed_never_evaluated(write):
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(write("config.yaml", "inputs: !!python/object/apply:os.system ['true']\n"))


def test_override_syntax_errors():
    with pytest.raises(ConfigError, match="expected dotted.key=value"):
        apply_overrides({}, ["promoter.upstream"])
    with pytest.raises(ConfigError, match="is a value, not a section"):
        apply_overrides({"seed": 1}, ["seed.x=2"])


def test_dump_round_trips(write, tmp_path: Path):
    config = load_config(write("config.yaml", MINIMAL), ["seed=7"])
    again = load_config(write("again.yaml", dump_config(config)))
    assert again == config


def test_numbers_yaml_1_1_reads_as_text_and_empty_paths_are_no_path(write):
    """``1e-3`` is a number to YAML 1.2 (and the schema's editors) but text to PyYAML: it was refused; an empty path
    was the config's own folder (``nightly.inbox=`` read the config folder as the inbox)."""
    path = write("cfg/config.yaml", MINIMAL)
    config = load_config(path, ["train.lr=1e-3", "head.eta=5E-2", "nightly.inbox=", "impute.out_dir= ",
                                "evaluation.heritability=~/h2.tsv"])
    assert config.train.lr == 0.001 and config.head.eta == 0.05
    assert config.nightly.inbox is None and config.impute.out_dir is None
    assert config.evaluation.heritability == str(Path("~/h2.tsv").expanduser())
    with pytest.raises(ConfigError, match="expected float"):
        load_config(path, ["train.lr=fast"])


def test_an_unreadable_config_is_named(write):
    path = write("config.yaml", "x")
    path.write_bytes(b"name: \xff\xfe toy\n")
    with pytest.raises(ConfigError, match="config.yaml: cannot read the config file as UTF-8"):
        load_config(path)


def test_fold_fraction_follows_the_task_unless_set(write):
    """Null (the default): the training folds of the ``entries`` task hide the evaluation's fraction (a record's
    context as thin as a hidden entry's), those of ``genes`` and ``samples`` a quarter of their units; resolved
    where it is read (``Config.fold_fraction``), so a config whose task is replaced never keeps another task's
    number; a number set is kept. A manifest's plain config resolves the same (``fold_fraction_of``)."""
    import dataclasses

    from geximpute.config import fold_fraction_of

    path = write("config.yaml", MINIMAL)
    entries = load_config(path, ["evaluation.task=entries"])
    assert entries.fold_fraction == 0.1 and entries.to_dict()["train"]["fold_fraction"] is None
    assert load_config(path, ["evaluation.task=entries", "evaluation.fraction=0.2"]).fold_fraction == 0.2
    # never past 1 / folds: the folds stay disjoint
    assert load_config(path, ["evaluation.task=entries", "evaluation.fraction=0.8"]).fold_fraction == 0.5
    for task in ("genes", "samples"):
        config = load_config(path, [f"evaluation.task={task}"])
        assert config.fold_fraction == 0.25 == fold_fraction_of(config.to_dict())
        assert dataclasses.replace(config, evaluation=dataclasses.replace(config.evaluation, task="entries")
                                   ).fold_fraction == 0.1
    assert fold_fraction_of({"train": {"fold_fraction": 0.25}}) == 0.25  # records of an older default
    assert fold_fraction_of({"train": {}, "evaluation": {"task": "entries", "fraction": 0.3}}) == 0.3
    assert load_config(path, ["evaluation.task=entries", "train.fold_fraction=0.3"]).fold_fraction == 0.3
    with pytest.raises(ConfigError,
                       match=r"train.fold_fraction.*null \(by task\) or a number in \(0, 1/train.folds\] = \(0, 0.5\]"):
        load_config(path, ["train.fold_fraction=0.6"])


def test_a_section_with_every_key_commented_out_reads_as_its_defaults(write):
    """``genotypes:`` with its keys commented out is null to YAML: it was refused as not a mapping."""
    config = load_config(write("config.yaml", MINIMAL + "genotypes:\n  # cis_window: 100000\ntrain:\n"))
    assert config.genotypes == GenotypesConfig() and config.train == TrainConfig()
    with pytest.raises(ConfigError, match=r"config key 'genotypes' has value 3; expected a mapping"):
        load_config(write("bad.yaml", MINIMAL + "genotypes: 3\n"))


def test_one_tissue_beside_a_sample_table_is_refused(write):
    """A sample table gives each sample's tissue: ``inputs.tissue`` beside it was dropped without a word."""
    with pytest.raises(ConfigError, match=r"inputs.tissue.*'Liver'.*null when inputs.samples is set"):
        load_config(write("config.yaml", MINIMAL), ["inputs.samples=s.tsv", "inputs.tissue=Liver"])


def test_a_bundle_written_with_settings_refused_since_still_loads(tmp_path, caplog):
    """A model built before ``inputs.tissue`` beside ``inputs.samples`` and infinite numbers were refused: its saved
    config reads with them left out (the model stopped loading after the upgrade)."""
    import logging

    from geximpute.config import config_from_dict
    from geximpute.fit.bundle import _settings_refused_since

    saved = {"inputs": {"genes": "g.gtf", "expression": "e.gct", "samples": "s.tsv", "tissue": "Liver"},
             "impute": {"gpu_wait_seconds": float("inf"), "predictors": 2}, "seed": 3}
    with pytest.raises(ConfigError):
        config_from_dict(saved, tmp_path)
    with caplog.at_level(logging.INFO, logger="geximpute.fit.bundle"):
        _settings_refused_since(saved, tmp_path / "config.yaml")
    config = config_from_dict(saved, tmp_path)
    assert config.inputs.tissue is None and config.impute.predictors == 2
    assert config.impute.gpu_wait_seconds == type(config.impute)().gpu_wait_seconds
    assert "impute.gpu_wait_seconds inf is read as its default" in caplog.text


def test_a_key_given_twice_is_refused_naming_both_lines(write):
    """YAML keeps the last of two equal keys: ``scale: counts`` below ``scale: tpm`` (or a second ``promoter:``
    section, which replaced the first whole) ran without a word."""
    with pytest.raises(ConfigError, match=r"config.yaml: not valid YAML: key .upstream. is given twice \(lines 7"):
        load_config(write("config.yaml", MINIMAL + "  upstream: 300\n"))
    with pytest.raises(ConfigError, match=r"key 'promoter' is given twice \(lines 6 and 8\)"):
        load_config(write("two.yaml", MINIMAL + "promoter:\n  downstream: 10\n"))
    # YAML's merge keys (an anchor's keys shared) are not duplicates: an explicit key overrides a merged one
    from geximpute.config import _yaml

    assert _yaml("a: &w\n  x: 1\n  y: 2\nb:\n  <<: *w\n  y: 3\n") == {"a": {"x": 1, "y": 2}, "b": {"x": 1, "y": 3}}


def test_a_bad_value_given_by_set_is_the_command_line_s(write):
    """``--set promoter.upstream=abc`` was reported as the file's (``config.yaml: config key ... has value 'abc'``:
    the file holds no ``abc``)."""
    with pytest.raises(ConfigError, match=r"config.yaml: --set promoter.upstream: config key 'promoter.upstream' "
                                          r"has value 'abc'"):
        load_config(write("config.yaml", MINIMAL), ["promoter.upstream=abc"])
    with pytest.raises(ConfigError) as err:  # the file's own bad value stays the file's
        load_config(write("bad.yaml", MINIMAL.replace("upstream: 200", "upstream: abc")))
    assert "--set" not in str(err.value) and "'promoter.upstream' has value 'abc'" in str(err.value)
