"""Config validation: each error stops with one message naming the key, before any job runs."""
import copy

import pytest
import yaml

from stagediff import config as sdc
from tests.conftest import REPO, run_smk, tiny_config


def _err(cfg) -> str:
    with pytest.raises(sdc.ConfigError) as e:
        sdc.validate(cfg)
    return str(e.value)


def test_shipped_configs_validate():
    sdc.load(REPO / "config" / "config.yaml")
    sdc.load(REPO / ".test" / "config.yaml")


def test_unknown_key_is_named():
    cfg = tiny_config()
    cfg["cache"]["batchsize"] = 4
    assert "unknown config key cache.batchsize" in _err(cfg)


def test_wrong_type_is_named():
    cfg = tiny_config()
    cfg["cache"]["batch_size"] = "eight"
    msg = _err(cfg)
    assert "cache.batch_size" in msg and "integer" in msg


def test_layer_out_of_range_is_named():
    cfg = tiny_config()
    cfg["layers"] = [0, 7]
    assert "layers[1] = 7 is out of range for toy.base_lm.n_layers = 3" in _err(cfg)


def test_layer_groups_must_partition_layers():
    cfg = tiny_config()
    cfg["cache"]["layer_groups"] = [[0]]
    assert "cache.layer_groups" in _err(cfg)


def test_override_for_unknown_layer():
    cfg = tiny_config()
    cfg["toy"]["base_sae"]["overrides"] = {2: {"top_k": 2}}
    assert "override for layer 2" in _err(cfg)


def test_paper_world_missing_path_is_named(tmp_path):
    cfg = yaml.safe_load((REPO / "config" / "llava_more.yaml").read_text())
    cfg["model"]["original"]["checkpoint"] = str(tmp_path / "nowhere")
    assert "model.original.checkpoint: path does not exist" in _err(cfg)
    del cfg["model"]["original"]  # no conversion: the HF model must be there
    cfg["model"]["vlm"] = str(tmp_path / "nowhere")
    assert "model.vlm: path does not exist" in _err(cfg)


def test_integer_override_keys_are_normalised():
    cfg = tiny_config()
    cfg["toy"]["base_sae"]["overrides"] = {1: {"top_k": 2}}
    assert sdc.validate(copy.deepcopy(cfg))["toy"]["base_sae"]["overrides"] == {"1": {"top_k": 2}}


def test_snakemake_stops_at_parse_time_with_the_message(workdir):
    cfg = yaml.safe_load((workdir / ".test/config.yaml").read_text())
    cfg["cache"]["dtype"] = "int8"
    (workdir / "bad.yaml").write_text(yaml.safe_dump(cfg))
    r = run_smk("-n", "--configfile", "bad.yaml", cwd=workdir, check=False)
    assert r.returncode != 0
    assert "cache.dtype" in r.stdout + r.stderr
    assert not (workdir / "results").exists()


def test_sae_finetune_errors_name_the_key():
    cfg = tiny_config()
    cfg["sae_finetune"]["regimes"] = ["full", "video"]
    assert "sae_finetune.regimes.1" in _err(cfg)
    cfg = tiny_config()
    cfg["sae_finetune"]["lr_layer_scale"] = {7: 0.5}
    assert "sae_finetune.lr_layer_scale.7" in _err(cfg)
    cfg = tiny_config()
    del cfg["sae_finetune"]["top_k"]
    assert "sae_finetune" in _err(cfg) and "top_k" in _err(cfg)
