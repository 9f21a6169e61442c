"""Config: defaults <- YAML <- dotted overrides; bad keys and impossible values are refused by name."""

from __future__ import annotations

from pathlib import Path

import pytest

from djc.config import ConfigError, load_config, parse_overrides, to_yaml

JOBS = Path(__file__).resolve().parents[1] / "jobs"


def test_defaults_are_valid_and_round_trip_through_yaml(tmp_path):
    cfg = load_config()
    p = tmp_path / "c.yaml"
    p.write_text(to_yaml(cfg))
    assert load_config(p) == cfg


def test_yaml_then_overrides(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("method:\n  secu:\n    tau: 0.3\noptim:\n  epochs: 5\n")
    cfg = load_config(p, ["optim.epochs=7", "method.secu.gamma=auto", "data.eval={test: /x}"])
    assert cfg.method.secu.tau == 0.3 and cfg.optim.epochs == 7
    assert cfg.method.secu.gamma == "auto" and cfg.data.eval == {"test": "/x"}


def test_every_job_config_loads():
    for path in sorted(JOBS.glob("*.yaml")):
        load_config(path)


@pytest.mark.parametrize("override, message", [
    (["method.secu.gama=0.5"], "unknown config key 'method.secu.gama' (did you mean 'method.secu.gamma'?)"),
    (["optimizer.lr=1"], "unknown config key 'optimizer'"),
    (["method.secu.t_x=-0.1"], "method.secu.t_x"),
    (["method.secu.gamma=1.5"], "method.secu.gamma"),
    (["method.secu.size_prior=profile"], "it needs method.secu.constraint=entropy (got size)"),
    (["method.secu.predict=merge", "method.secu.num_heads=2", "method.secu.merge_head=2"],
     "method.secu.merge_head=2 needs method.secu.num_heads > 2 (got 2)"),
    (["method.num_clusters=200"], "larger than the global batch data.batch_size=128"),
    (["data.batch_size=100", "trainer.num_workers=3"], "divisible by trainer.num_workers=3"),
    (["model.backbone=vgg"], "model.backbone"),
    (["data.batch_size"], "key.sub=value"),
    (["method.name=aecm", "method.aecm.adam_eps_hat=true"], "they need optim.name=adam (got sgd)"),
    (["augment.crop_scale_min=0.8", "augment.crop_scale_max=0.5"], "augment.crop_scale_min (0.8) is above"),
    (["augment.invert_p=1.5"], "augment.invert_p"),
])
def test_bad_values_are_refused_with_the_key_named(override, message):
    with pytest.raises(ConfigError) as err:
        load_config(None, override)
    assert message in str(err.value)


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(bad)


def test_override_values_are_yaml_scalars():
    assert parse_overrides(["a.b=1", "a.c=true", "d=x y", "e=[1, 2]"]) == {
        "a": {"b": 1, "c": True}, "d": "x y", "e": [1, 2]}


def test_an_override_replaces_a_mapping_instead_of_merging_into_it(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("data:\n  eval: {test: /a, val: /b}\n")
    assert load_config(p, ["data.eval={}"]).data.eval == {}
    assert load_config(p, ["data.eval={x: /c}"]).data.eval == {"x": "/c"}
    assert load_config(p, ["data.eval.val=/d"]).data.eval == {"test": "/a", "val": "/d"}
