"""Readings parsing: the hand-typed variety of the real Shenzhen and Montgomery files."""

from __future__ import annotations

import pytest

from synthcxr.data.readings import (
    ReadingsParseError,
    label_from_suffix,
    normalize_finding,
    normalize_label,
    parse_age,
    parse_montgomery,
    parse_sex,
    parse_shenzhen,
)


@pytest.mark.parametrize(
    ("text", "sex", "age", "finding"),
    [
        ("male 35yrs\nnormal\n", "male", 35.0, "normal"),
        ("Female  28yr\r\n\r\nSTB,ATB in the right upper field\r\n", "female", 28.0, "STB,ATB in the right upper field"),
        ("\ufeffMALE 41 years\n\n\nNormal.\n", "male", 41.0, "normal"),
        ("  female33Y \nnormal\n\n", "female", 33.0, "normal"),
        ("Male 2months\nnormal", "male", 2 / 12, "normal"),
        ("female 10 days\nnormal", "female", 10 / 365.25, "normal"),
        ("male 1yrs\tPTB in the left lower field\n", "male", 1.0, "PTB in the left lower field"),
        ("\n\nfemale, 30 yrs\nSTB\n  in the right upper field ", "female", 30.0, "STB in the right upper field"),
        ("male 35yrs", "male", 35.0, None),
    ],
)
def test_shenzhen_readings_variants(text, sex, age, finding):
    reading = parse_shenzhen(text)
    assert reading.sex == sex
    assert reading.age == pytest.approx(age, abs=1e-3)
    assert reading.finding == finding


@pytest.mark.parametrize(
    ("text", "sex", "age", "finding"),
    [
        ("Patient's Sex: M\nPatient's Age: 044Y\nnormal\n", "male", 44.0, "normal"),
        ("Patient's Sex: F\r\nPatient's Age: 058Y\r\n\r\nright upper lobe cavity\r\n", "female", 58.0, "right upper lobe cavity"),
        ("patient's sex:  f \npatient's age: 031y\n\nNORMAL\n", "female", 31.0, "normal"),
        ("\ufeffPatient\u2019s Sex: Male\n\nPatient's Age: 009M\n\nbilateral infiltrates\nand effusion\n", "male", 0.75,
         "bilateral infiltrates and effusion"),
        ("Patient's Age: 070Y\nPatient's Sex: M\n", "male", 70.0, None),
        ("Patient's Sex: O\nPatient's Age: 070Y\nnormal", None, 70.0, "normal"),
    ],
)
def test_montgomery_readings_variants(text, sex, age, finding):
    reading = parse_montgomery(text)
    assert (reading.sex, reading.finding) == (sex, finding)
    assert reading.age == pytest.approx(age, abs=1e-3)


@pytest.mark.parametrize("text", ["", "\n \r\n", "no demographics here\nnormal", "female\nnormal"])
def test_shenzhen_unparseable_says_what_was_expected(text):
    with pytest.raises(ReadingsParseError, match="male 35yrs"):
        parse_shenzhen(text)


@pytest.mark.parametrize("text", ["", "Patient's Sex: M\nnormal", "Patient's Sex: Q\nPatient's Age: 044Y", "normal"])
def test_montgomery_unparseable(text):
    with pytest.raises(ReadingsParseError):
        parse_montgomery(text)


def test_attribute_normalisation():
    assert [parse_sex(v) for v in ("M", " female ", "F.", "O", "", None)] == ["male", "female", "female", None, None, None]
    assert parse_age("044Y") == 44.0 and parse_age(45) == 45.0 and parse_age("") is None
    assert parse_age("6 months") == pytest.approx(0.5)
    with pytest.raises(ReadingsParseError, match="not like"):
        parse_age("forty")
    assert normalize_finding("  Normal. ") == "normal"
    assert normalize_finding("STB,  ATB") == "STB, ATB"
    assert normalize_finding("   ") is None
    assert [normalize_label(v) for v in ("0", "1", "TB", "Normal", "pneumonia", "")] == [
        "normal", "tuberculosis", "tuberculosis", "normal", "pneumonia", None]
    assert label_from_suffix("CHNCXR_0001_0") == "normal"
    assert label_from_suffix("MCUCXR_0104_1") == "tuberculosis"
    assert label_from_suffix("scan") is None
