"""XLoraConfig validation, serialisation round trips, and PEFT registration."""

import copy
import json
import pickle

import pytest
from peft import PeftConfig
from peft.mapping import (
    PEFT_TYPE_TO_CONFIG_MAPPING,
    PEFT_TYPE_TO_PREFIX_MAPPING,
    PEFT_TYPE_TO_TUNER_MAPPING,
)
from peft.utils.peft_types import PeftType

import peft_xlora
from peft_xlora import PEFT_XLORA, XLoraConfig, XLoraModel

ADAPTERS = {"math": "/x/math", "code": "/x/code"}


def test_defaults_follow_peft_builtin_names():
    config = XLoraConfig(adapters=ADAPTERS)
    assert config.peft_type == "PEFT_XLORA" and config.peft_type.value == "PEFT_XLORA"
    assert config.peft_type.name == "PEFT_XLORA"
    assert config.hidden_size is None  # inferred from the model, never a silent default
    for name in (
        "enable_softmax",
        "enable_softmax_topk",
        "softmax_temperature",
        "layerwise_scalings",
        "top_k_lora",
        "xlora_depth",
        "xlora_size",
        "xlora_dropout_p",
        "use_trainable_adapters",
        "scaling_pass_value",
        "global_scaling_weight",
    ):
        assert hasattr(config, name)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"adapters": {}}, "empty"),
        ({"adapters": None}, "needs `adapters`"),
        ({"adapters": ["a", "b"]}, "must be a dict"),
        ({"adapters": {"": "p"}}, "non-empty strings"),
        ({"adapters": {"a": 3}}, "source must be a path"),
        ({"adapters": ADAPTERS, "top_k_lora": 0}, "top_k_lora"),
        ({"adapters": ADAPTERS, "top_k_lora": 3}, "between 1 and the number of experts"),
        ({"adapters": ADAPTERS, "softmax_temperature": 0.0}, "softmax_temperature"),
        ({"adapters": ADAPTERS, "softmax_temperature": -1.0}, "softmax_temperature"),
        ({"adapters": ADAPTERS, "enable_softmax_topk": True}, "needs `top_k_lora`"),
        ({"adapters": ADAPTERS, "xlora_depth": 0}, "xlora_depth"),
        ({"adapters": ADAPTERS, "xlora_dropout_p": 1.0}, "xlora_dropout_p"),
        ({"adapters": ADAPTERS, "hidden_size": -4}, "hidden_size"),
        ({"adapters": ADAPTERS, "scaling_pass_value": float("nan")}, "scaling_pass_value"),
        ({"adapters": ADAPTERS, "scalings_mode": "sequence"}, "scalings_mode"),
        ({"adapters": ADAPTERS, "classifier_init": "zeros"}, "classifier_init"),
    ],
)
def test_invalid_values_raise_with_guidance(kwargs, message):
    with pytest.raises(ValueError, match=message):
        XLoraConfig(**kwargs)


def test_save_load_round_trip(tmp_path):
    config = XLoraConfig(adapters=ADAPTERS, xlora_depth=3, top_k_lora=1, hidden_size=64, layerwise_scalings=True)
    config.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["peft_type"] == "PEFT_XLORA"
    loaded = PeftConfig.from_pretrained(tmp_path)  # dispatches on peft_type through PEFT's mapping
    assert isinstance(loaded, XLoraConfig)
    assert loaded.to_dict() == config.to_dict()


def test_copy_and_pickle_round_trip():
    config = XLoraConfig(adapters=ADAPTERS, top_k_lora=2, enable_softmax_topk=True)
    for clone in (copy.copy(config), copy.deepcopy(config), pickle.loads(pickle.dumps(config))):
        assert clone.to_dict() == config.to_dict()
        assert clone.peft_type == PEFT_XLORA and clone.peft_type.value == "PEFT_XLORA"


def test_unknown_keys_in_saved_config_are_dropped_with_a_warning(tmp_path):
    config = XLoraConfig(adapters=ADAPTERS)
    config.save_pretrained(tmp_path)
    data = json.loads((tmp_path / "adapter_config.json").read_text())
    data["option_from_the_future"] = 1
    (tmp_path / "adapter_config.json").write_text(json.dumps(data))
    with pytest.warns(UserWarning, match="option_from_the_future"):
        loaded = PeftConfig.from_pretrained(tmp_path)  # a bare config: XLoraConfig.from_pretrained wants weights
    assert list(loaded.adapters) == list(ADAPTERS)


def test_registration_is_idempotent_and_leaves_builtin_alone():
    peft_xlora.register(XLoraConfig, XLoraModel)
    peft_xlora.register(XLoraConfig, XLoraModel)
    assert PEFT_TYPE_TO_CONFIG_MAPPING["PEFT_XLORA"] is XLoraConfig
    assert PEFT_TYPE_TO_TUNER_MAPPING["PEFT_XLORA"] is XLoraModel
    assert PEFT_TYPE_TO_PREFIX_MAPPING["PEFT_XLORA"] == "xlora_"
    from peft.tuners.xlora import XLoraModel as BuiltinXLoraModel

    assert PEFT_TYPE_TO_TUNER_MAPPING[PeftType.XLORA] is BuiltinXLoraModel
    assert sum(1 for key in PEFT_TYPE_TO_TUNER_MAPPING if key == "PEFT_XLORA") == 1
