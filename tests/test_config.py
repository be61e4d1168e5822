"""TrialConfig validation, and the 1:1 mirror between config fields, CLI flags and MLproject parameters."""

from dataclasses import fields
from pathlib import Path

import pytest
import yaml

from wavesweep.cli import build_parser
from wavesweep.config import FIELD_HELP, TrialConfig

ROOT = Path(__file__).resolve().parents[1]


def test_defaults_are_valid_and_logged_whole():
    cfg = TrialConfig()
    d = cfg.to_dict()
    assert set(d) == {f.name for f in fields(TrialConfig)}
    assert TrialConfig.from_mapping({k: str(v) for k, v in d.items()}) == cfg  # strings round-trip (MLflow -P)


@pytest.mark.parametrize(
    "key,value,needle",
    [
        ("wavelet", "bior9.9", "unknown wavelet 'bior9.9'; valid: "),
        ("mode", "wrap", "unknown mode 'wrap'"),
        ("layout", "rows", "unknown layout 'rows'"),
        ("percentile", "101", "percentile"),
        ("percentile", "-1", "percentile"),
        ("percentile", "abc", "percentile='abc' is not a number"),
        ("percentile", True, "percentile=True is not a number"),  # float(True) is 1.0: not taken as 1 %
        ("finetune_lr", False, "finetune_lr=False is not a number"),
        ("level", "0", "level"),
        ("level", "2.5", "level='2.5' is not an integer"),
        ("model", "vgg", "unknown model 'vgg'"),
        ("dataset", "svhn", "unknown dataset 'svhn'"),
        ("scope", "net", "unknown scope 'net'"),
        ("targets", "conv,rnn", "unknown target kind 'rnn'"),
        ("device", "tpu", "unknown device 'tpu'"),
        ("keep_approx", "maybe", "keep_approx='maybe' is not a boolean"),
        ("eval_limit", "-5", "eval_limit=-5 must be >= 0"),
        ("finetune_lr", "1e300", "finetune_lr=1e+300 must be a number in (0, 1000]"),  # checked even with recovery=bn
        ("finetune_lr", "nan", "finetune_lr=nan must be a number in (0, 1000]"),
        ("finetune_steps", "0", "finetune_steps=0 must be an integer >= 1"),
        ("wavelett", "haar", "unknown trial parameter 'wavelett'"),
    ],
)
def test_bad_values_raise_one_line_error_naming_value(key, value, needle):
    with pytest.raises(ValueError) as info:
        TrialConfig.from_mapping({key: value})
    msg = str(info.value)
    assert needle in msg and "\n" not in msg


def test_level_above_max_is_not_a_config_error():
    assert TrialConfig(level=5, layout="kernel", wavelet="bior4.4").level == 5  # clamped later, per layer


def test_float_typed_integers_accepted():
    assert TrialConfig.from_mapping({"level": "3.0", "seed": 2.0}).level == 3


def test_every_field_has_help_cli_flag_and_mlproject_parameter():
    names = [f.name for f in fields(TrialConfig)]
    assert set(FIELD_HELP) == set(names)
    flags = [f"--{n.replace('_', '-')}=1" for n in names]  # every flag parses, into its field
    args = vars(build_parser().parse_args(["trial", *flags]))
    assert all(args[n] == "1" for n in names)
    project = yaml.safe_load((ROOT / "MLproject").read_text())
    main = project["entry_points"]["main"]
    assert [p for p in main["parameters"] if p != "replicates"] == names  # replicates: runs of a config, not a field
    assert main["parameters"]["replicates"]["default"] == 1 and "--replicates {replicates}" in main["command"]
    for f in fields(TrialConfig):
        default = main["parameters"][f.name]["default"]
        assert TrialConfig.from_mapping({f.name: default}) == TrialConfig(), f.name  # same defaults
        assert f"--{f.name.replace('_', '-')} {{{f.name}}}" in main["command"]


def test_help_names_every_registered_model_and_dataset():
    """`wavesweep trial --help` listed neither fashion-mnist nor kmnist: the help text is checked
    against the registries."""
    import re

    from wavesweep.config import FIELD_HELP
    from wavesweep.data import DATASETS
    from wavesweep.models import MODELS

    for field, registry in (("model", MODELS), ("dataset", DATASETS)):
        listed = set(re.findall(r"[\w.-]+", FIELD_HELP[field].split(":", 1)[1]))
        assert set(registry.names()) <= listed, (field, set(registry.names()) - listed)


def test_a_bad_registered_model_name_is_told_the_characters_it_may_use():
    from wavesweep.names import check_model_name

    assert check_model_name("digits-cnn v2") == "digits-cnn v2"
    with pytest.raises(ValueError, match=r"contains '@'") as at:
        check_model_name("rev@x")
    with pytest.raises(ValueError, match=r"'bad/name' is not a valid name: use 1-128 letters, digits, \. _ - \+ = and spaces") as bad:
        check_model_name("bad/name")
    assert "@ and" not in str(bad.value) and "\n" not in str(at.value)


def test_study_entry_point_passes_every_parameter_and_its_defaults_parse():
    """The study entry point had no sampler_seed; its '' default must mean the CLI's own default
    (None: a salted spec seed), and a value given with -P is the integer."""
    import shlex

    from wavesweep.cli_args import UsageError

    project = yaml.safe_load((ROOT / "MLproject").read_text())
    study = project["entry_points"]["study"]
    params = study["parameters"]
    for name in params:
        if name != "spec":
            assert f"--{name.replace('_', '-')} {{{name}}}" in study["command"], name

    def parse(**given):
        values = {n: str(p["default"]) for n, p in params.items()} | given
        command = study["command"].format(**{n: shlex.quote(v) for n, v in values.items()})  # as mlflow run does
        argv = shlex.split(command)
        assert argv[:3] == ["python", "-m", "wavesweep"]
        return build_parser().parse_args(argv[3:])

    assert parse().sampler_seed is None and build_parser().parse_args(["study", "x.yaml"]).sampler_seed is None
    assert parse(sampler_seed="7").sampler_seed == 7
    with pytest.raises(UsageError, match=r"--sampler-seed: expected an integer or '', got 'seven'"):
        parse(sampler_seed="seven")
