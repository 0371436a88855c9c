"""Captions from attributes, missing attributes dropped cleanly, DreamBooth prompts."""

from __future__ import annotations

import pytest

from synthcxr.config import load_config
from synthcxr.data.captions import caption_for, caption_from_attributes, class_prompt, instance_prompt
from synthcxr.data.config import CaptionConfig, DataConfig
from synthcxr.data.records import XrayRecord
from synthcxr.errors import ConfigError


@pytest.mark.parametrize(
    ("attrs", "caption"),
    [
        ({"age": 45, "sex": "male", "label": "tuberculosis"}, "a chest x-ray of a 45 year old male, tuberculosis"),
        ({"age": 45.9, "sex": "female", "label": "normal"}, "a chest x-ray of a 45 year old female, normal"),
        ({"sex": "female", "label": "normal"}, "a chest x-ray of a female, normal"),
        ({"age": 30}, "a chest x-ray of a 30 year old"),
        ({"age": 0.5, "sex": "male"}, "a chest x-ray of a 6 month old male"),
        ({"label": "normal"}, "a chest x-ray, normal"),
        ({"finding": "PTB in the left lower field"}, "a chest x-ray, PTB in the left lower field"),
        ({}, "a chest x-ray"),
        ({"age": None, "sex": None, "label": None, "finding": ""}, "a chest x-ray"),
    ],
)
def test_default_template(attrs, caption):
    assert caption_from_attributes(CaptionConfig(), **attrs) == caption


def test_record_caption_and_custom_template():
    record = XrayRecord(image_path=None, patient_id="p1", source="shenzhen", sex="male", age=35.0,
                        finding="STB", label="tuberculosis")
    assert caption_for(record, CaptionConfig()) == "a chest x-ray of a 35 year old male, tuberculosis"
    cfg = CaptionConfig(template="{class_noun}, {sex}, age {age}, finding: {finding}[ ({source})]")
    assert caption_for(record, cfg) == "chest x-ray, male, age 35, finding: STB (shenzhen)"
    record.sex = None
    assert caption_for(record, cfg) == "chest x-ray, age 35, finding: STB (shenzhen)"  # no "None", no ", ,"


def test_dreambooth_prompts():
    cfg = CaptionConfig()
    assert instance_prompt(cfg) == "a sks chest x-ray"
    assert class_prompt(cfg) == "a chest x-ray"
    cfg = CaptionConfig(instance_token="ohwx", use_instance_prompt=True)
    assert instance_prompt(cfg) == "a ohwx chest x-ray"
    assert caption_from_attributes(cfg, age=45, sex="male") == "a ohwx chest x-ray of a 45 year old male"
    bare = CaptionConfig(use_instance_prompt=True, template="a {class_noun}")
    assert caption_from_attributes(bare, age=45, sex="male", label="normal") == instance_prompt(bare)


@pytest.mark.parametrize(("template", "words"), [("a {colour} x-ray", "unknown placeholder {colour}"),
                                                 ("a [{age} x-ray", "'[' without ']'"),
                                                 ("a {age}] x-ray", "']' without '['")])
def test_bad_templates_fail_at_config_load(template, words):
    with pytest.raises(ConfigError, match=words.replace("[", r"\[").replace("{", r"\{").replace("}", r"\}")):
        CaptionConfig(template=template)


def test_data_config_from_yaml_with_did_you_mean(tmp_path):
    path = tmp_path / "data.yaml"
    path.write_text("path: /data/shenzhen\nresolution: 256\ncaptions:\n  instance_tokn: zwx\n")
    with pytest.raises(ConfigError, match="did you mean 'captions.instance_token'"):
        load_config(DataConfig, path)
    path.write_text("path: [/data/a, /data/b]\nresolution: 256\nsplit: {val: 0.2, seed: 3}\n")
    cfg = load_config(DataConfig, path, ["on_error=skip"])
    assert [str(p) for p in cfg.paths] == ["/data/a", "/data/b"]
    assert (cfg.resolution, cfg.split.val, cfg.split.seed, cfg.on_error, cfg.hflip) == (256, 0.2, 3, "skip", False)
    with pytest.raises(ConfigError, match="multiple of 8"):
        load_config(DataConfig, None, ["resolution=100"])
    with pytest.raises(ConfigError, match="leaves no training data"):
        load_config(DataConfig, None, ["split.val=0.5", "split.test=0.5"])
    with pytest.raises(ConfigError, match="format"):
        load_config(DataConfig, None, ["format=nifti"])
