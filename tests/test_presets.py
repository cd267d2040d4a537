"""Published presets: abstract parameter counts equal transformers' on the meta device."""

import pytest
import torch
from transformers import JanusConfig as HFJanusConfig
from transformers import JanusForConditionalGeneration

from unijax import checkpoints
from unijax.models import family as families
from unijax.models.config import JanusConfig
from unijax.models.family import preset


@pytest.mark.parametrize("name,approx", [("janus_pro_1b", 2.09e9), ("janus_pro_7b", 7.42e9)])
def test_parameter_count_matches_transformers(name, approx):
    cfg = preset(name)
    ours = sum(x.size for x in checkpoints.flat_params(checkpoints.abstract_model(cfg)).values())
    with torch.device("meta"):
        hf = JanusForConditionalGeneration(HFJanusConfig(**cfg.to_hf()))
    theirs = sum(p.numel() for p in hf.parameters())
    assert ours == theirs
    assert abs(ours - approx) / approx < 0.02


@pytest.mark.parametrize("family,name", [(f, n) for f in families.names() for n in families.get(f).presets])
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


@pytest.mark.parametrize("family", ["janus", "emu3"])
def test_initializer_range_sets_every_decoder_weight_and_round_trips(family):
    """`model.text.initializer_range` is the std of every decoder weight at init (embeddings,
    attention, MLP, lm_head; transformers' field of that name) and survives the HF config."""
    import numpy as np
    from flax import nnx

    from unijax.models import family as families
    from unijax.models.emu3_config import Emu3Config

    cfg = preset("tiny", family, text={"initializer_range": 0.1})
    model = families.build(cfg, nnx.Rngs(0))
    layer = model.language_model.layers
    weights = {"embed": model.language_model.embed_tokens.embedding[...], "lm_head": model.lm_head.kernel[...]}
    if isinstance(layer, nnx.List):
        layer = layer[0]
    weights |= {"q_proj": layer.self_attn.q_proj.kernel[...], "down_proj": layer.mlp.down_proj.kernel[...]}
    for name, w in weights.items():  # >= 16k samples each: the std's standard error is < 0.6 %, the bound 4 %
        assert abs(float(np.std(np.asarray(w))) - 0.1) < 0.004, name
    default = families.build(preset("tiny", family), nnx.Rngs(0))
    assert abs(float(np.std(np.asarray(default.lm_head.kernel[...]))) - 0.02) < 0.001
    cls = JanusConfig if family == "janus" else Emu3Config
    hf = cfg.to_hf()
    assert hf["text_config"]["initializer_range"] == 0.1
    if family == "janus":
        hf |= {"generation_kwargs": {"boi_token_id": cfg.boi_token_id, "eoi_token_id": cfg.eoi_token_id}}
    assert cls.from_hf(hf).text.initializer_range == 0.1


def test_initializer_range_is_not_architecture_for_init_from():
    """A checkpoint trained from one init scale loads into a run configured with another: only the
    parameters' shapes are architecture."""
    from unijax.models.config import runtime_overrides

    saved, cfg = preset("tiny", text={"initializer_range": 0.088}), preset("tiny")
    assert saved != cfg
    assert saved.replace(**runtime_overrides(saved, cfg)) == cfg
    wider = preset("tiny", text={"num_layers": 2, "initializer_range": 0.088})
    assert wider.replace(**runtime_overrides(wider, cfg)) != cfg  # a real difference still shows
