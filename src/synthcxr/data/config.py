"""Typed data config: where the images are, how to read them, caption and split settings.

One `DataConfig` is shared by `synthcxr data ...`, training and evaluation so that every stage reads
the same images the same way; it is saved beside each run.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator

from synthcxr.config import StrictModel

DataFormat = Literal["auto", "montgomery", "shenzhen", "folder", "dicom", "nih", "chexpert", "mimic"]


class CaptionConfig(StrictModel):
    """How captions are written from clinical attributes."""

    template: str = "a {class_noun}[ of a[ {age_phrase}][ {sex}]][, {condition}]"
    """Caption template. Placeholders: {class_noun}, {age} (whole years), {age_phrase} ("45 year old",
    "6 month old"), {sex}, {label}, {finding}, {condition} (the label, or the finding when no label is
    known or the label is "abnormal", as in NIH/CheXpert/MIMIC: "cardiomegaly, effusion"), {source}, {patient_id}. A `[...]` group is dropped when none of the placeholders inside it
    are known, so missing attributes never show up as "None"."""

    instance_token: str = "sks"
    """Rare token that DreamBooth binds to this data set ("a sks chest x-ray")."""

    class_noun: str = "chest x-ray"
    """The class the token belongs to; also the subject of the class (prior-preservation) prompt."""

    use_instance_prompt: bool = False
    """Put the rare token in front of the class noun in every caption (DreamBooth). For the bare
    instance prompt set `template: "a {class_noun}"`."""

    use_manifest_captions: bool = True
    """Keep captions given in a manifest (folder/DICOM data) instead of writing them from the template."""

    @field_validator("instance_token", "class_noun")
    @classmethod
    def _not_blank(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("must not be empty")
        return value.strip()

    @field_validator("template")
    @classmethod
    def _valid_template(cls, value: str) -> str:
        from synthcxr.data.captions import check_template

        check_template(value)
        return value


class SplitConfig(StrictModel):
    """Patient-level, label-stratified train/val/test split."""

    val: float = Field(0.1, ge=0.0, lt=1.0)
    """Fraction of patients (per label) held out for validation."""

    test: float = Field(0.1, ge=0.0, lt=1.0)
    """Fraction of patients (per label) held out for testing (never seen in training or model choice)."""

    seed: int = 0
    """Seed of the shuffle: the same records and seed always give the same split."""

    file: Path | None = None
    """A saved split shared by several stages (a grid's `split.json`, `synthcxr data split --out`): used
    as it is when it exists, else made with the settings above and saved there. Training, evaluation
    and the study then see the same test patients."""

    @model_validator(mode="after")
    def _leaves_training_data(self) -> SplitConfig:
        if self.val + self.test >= 1.0:
            raise ValueError(f"val + test = {self.val + self.test:g} leaves no training data; keep it below 1")
        return self


class DataConfig(StrictModel):
    """Where the chest X-rays are and how they become model inputs."""

    path: Path | list[Path] = Path("data")
    """Data set folder(s). A dataset root (e.g. `ChinaSet_AllFiles`) or its parent; several paths are
    combined (e.g. Montgomery + Shenzhen)."""

    format: DataFormat = "auto"
    """Layout: montgomery, shenzhen, folder (images + optional CSV/JSONL manifest), dicom, nih (ChestX-ray14),
    chexpert, mimic (MIMIC-CXR-JPG), or auto-detect."""

    frontal_only: bool = True
    """nih/chexpert/mimic: keep PA/AP views only (lateral views are another image distribution)."""

    manifest: Path | None = None
    """CSV or JSONL with columns file, caption, label, patient_id, sex, age, finding (folder/DICOM data).
    When unset, `manifest.csv`/`manifest.jsonl`/`metadata.csv`/`metadata.jsonl` in the folder is used."""

    resolution: int = Field(512, ge=8, le=4096)
    """Side of the square model input in pixels (multiple of 8 for the VAE)."""

    resize: Literal["crop", "pad"] = "crop"
    """Fit to a square by centre-cropping the longer side, or by padding the shorter side with black."""

    hflip: bool = False
    """Random horizontal flips as augmentation. Off by default: chest X-rays have laterality (heart on the left)."""

    on_error: Literal["fail", "skip"] = "fail"
    """Bad files: `fail` stops and lists every problem at once; `skip` logs them and leaves them out."""

    captions: CaptionConfig = Field(default_factory=CaptionConfig)
    """Caption template and DreamBooth prompts."""

    split: SplitConfig = Field(default_factory=SplitConfig)
    """Train/val/test split settings."""

    @field_validator("resolution")
    @classmethod
    def _multiple_of_8(cls, value: int) -> int:
        if value % 8:
            raise ValueError(f"must be a multiple of 8 (the VAE downsamples by 8); try {value - value % 8 or 8}")
        return value

    @property
    def paths(self) -> list[Path]:
        """`path` as a list, whichever form was given."""
        return list(self.path) if isinstance(self.path, list) else [self.path]
