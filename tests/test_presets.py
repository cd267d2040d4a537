"""Published presets: abstract parameter counts equal transformers' on the meta device."""

import pytest
import torch
from transformers import JanusConfig as HFJanusConfig
from transformers import JanusForConditionalGeneration

from unijax import checkpoints
from unijax.models.config import JanusConfig
from unijax.models.presets import FAMILY_PRESETS, preset


@pytest.mark.parametrize("name,approx", [("janus_pro_1b", 2.09e9), ("janus_pro_7b", 7.42e9)])
def test_parameter_count_matches_transformers(name, approx):
    cfg = preset(name)
    ours = sum(x.size for x in checkpoints.flat_params(checkpoints.abstract_model(cfg)).values())
    with torch.device("meta"):
        hf = JanusForConditionalGeneration(HFJanusConfig(**cfg.to_hf()))
    theirs = sum(p.numel() for p in hf.parameters())
    assert ours == theirs
    assert abs(ours - approx) / approx < 0.02


@pytest.mark.parametrize("family,name", [(f, n) for f, names in FAMILY_PRESETS.items() for n in names])
def test_every_preset_builds_and_validates(family, name):
    """Real presets included: their ids lie in the vocabulary, specials outside Emu3's visual range."""
    cfg = preset(name, family)
    assert cfg.validate() is cfg or cfg.validate() == cfg
    checkpoints.abstract_model(cfg)


def test_hf_config_round_trip():
    cfg = preset("janus_pro_7b")
    back = JanusConfig.from_hf(cfg.to_hf() | {"generation_kwargs": {"boi_token_id": cfg.boi_token_id,
                                                                    "eoi_token_id": cfg.eoi_token_id}})
    assert back == cfg


def test_unknown_keys_and_bad_values_name_the_key():
    with pytest.raises(KeyError, match="model.text.hiden_size"):
        preset("tiny", text={"hiden_size": 3})
    with pytest.raises(KeyError, match="model.preset='huge'"):
        preset("huge")
    with pytest.raises(ValueError, match="num_kv_heads"):
        preset("tiny", text={"num_kv_heads": 3})
    assert preset("tiny", text={"num_layers": 1}).text.hidden_size == preset("tiny").text.hidden_size
