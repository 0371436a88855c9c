"""Captions from clinical attributes, and DreamBooth instance/class prompts.

Captions are the only channel through which clinical attributes reach the generator, so a missing
attribute must vanish from the text rather than leak in as "None" or a dangling "year old". The
template language is `str.format` placeholders plus `[...]` optional groups: a group is dropped
when none of the placeholders inside it is known, e.g.
"a {class_noun}[ of a[ {age_phrase}][ {sex}]][, {condition}]" gives
"a chest x-ray of a 45 year old male, tuberculosis", or "a chest x-ray, normal" without age and sex.
"""

from __future__ import annotations

import math
import re
import string
from typing import TYPE_CHECKING, Any

from synthcxr.errors import ConfigError

if TYPE_CHECKING:
    from synthcxr.data.config import CaptionConfig
    from synthcxr.data.records import XrayRecord

FIELDS = ("class_noun", "age", "age_phrase", "sex", "label", "finding", "condition", "source", "patient_id")

_Node = str | list  # a text run, or a group (list of nodes)


def _parse(template: str) -> list[_Node]:
    """Split the template into text runs and nested `[...]` groups."""
    stack: list[list[_Node]] = [[]]
    buf = ""
    for ch in template:
        if ch == "[":
            if buf:
                stack[-1].append(buf)
            buf = ""
            group: list[_Node] = []
            stack[-1].append(group)
            stack.append(group)
        elif ch == "]":
            if len(stack) == 1:
                raise ConfigError(f"caption template {template!r} has a ']' without '['",
                                  fix="balance the [ ] brackets of optional groups")
            if buf:
                stack[-1].append(buf)
            buf = ""
            stack.pop()
        else:
            buf += ch
    if len(stack) != 1:
        raise ConfigError(f"caption template {template!r} has a '[' without ']'",
                          fix="balance the [ ] brackets of optional groups")
    if buf:
        stack[-1].append(buf)
    return stack[0]


def _fields_in(text: str) -> list[str]:
    return [name for _, name, _, _ in string.Formatter().parse(text) if name is not None]


def check_template(template: str) -> None:
    """Fail early (at config load) on unbalanced groups or unknown placeholders."""
    nodes = _parse(template)

    def walk(items: list[_Node]) -> None:
        for node in items:
            if isinstance(node, list):
                walk(node)
                continue
            try:
                names = _fields_in(node)
            except ValueError as exc:
                raise ConfigError(f"caption template {template!r}: {exc}",
                                  fix="write placeholders as {name}") from None
            for name in names:
                if name not in FIELDS:
                    raise ConfigError(f"caption template {template!r} uses unknown placeholder {{{name}}}",
                                      fix=f"use only: {', '.join('{' + f + '}' for f in FIELDS)}")

    walk(nodes)


def _render(nodes: list[_Node], values: dict[str, str | None]) -> tuple[str, int, int]:
    """Returns (text, placeholders seen, placeholders known) for a list of nodes."""
    out, seen, known = [], 0, 0
    for node in nodes:
        if isinstance(node, list):
            text, s, k = _render(node, values)
            seen += s
            if s == 0 or k > 0:  # keep literal-only groups and groups with something known
                out.append(text)
                known += k
            continue
        names = _fields_in(node)
        seen += len(names)
        known += sum(1 for n in names if values.get(n))
        out.append(node.format(**{n: values.get(n) or "" for n in names}))
    return "".join(out), seen, known


def _tidy(text: str) -> str:
    text = re.sub(r"\s+", " ", text)
    text = re.sub(r"\s+([,.;:])", r"\1", text)
    text = re.sub(r"([,;:])(?:\s*[,;:])+", r"\1", text)
    return text.strip(" ,;:")


def age_phrase(age: float | None) -> str | None:
    """45.0 -> "45 year old"; 0.5 -> "6 month old"; 0.02 -> "7 day old"."""
    if age is None or (isinstance(age, float) and math.isnan(age)):
        return None
    if age >= 1:
        return f"{int(age)} year old"
    if age * 12 >= 1:
        return f"{int(round(age * 12))} month old"
    return f"{max(1, int(round(age * 365.25)))} day old"


def class_prompt(cfg: CaptionConfig) -> str:
    """The generic class prompt used for prior-preservation images ("a chest x-ray")."""
    return f"a {cfg.class_noun}"


def instance_prompt(cfg: CaptionConfig) -> str:
    """The DreamBooth instance prompt with the rare token ("a sks chest x-ray")."""
    return f"a {cfg.instance_token} {cfg.class_noun}"


def attribute_values(record: XrayRecord | None, cfg: CaptionConfig, **attrs: Any) -> dict[str, str | None]:
    """Placeholder values from a record (or from keyword attributes when generating from a CSV)."""
    get = (lambda k: attrs.get(k, getattr(record, k, None))) if record is not None else attrs.get
    age = get("age")
    try:
        age = float(age) if age not in (None, "") else None
    except (TypeError, ValueError):
        age = None
    label, finding = get("label"), get("finding")
    noun = f"{cfg.instance_token} {cfg.class_noun}" if cfg.use_instance_prompt else cfg.class_noun
    return {
        "class_noun": noun,
        "age": str(int(age)) if age is not None and not math.isnan(age) else None,
        "age_phrase": age_phrase(age),
        "sex": get("sex") or None,
        "label": label or None,
        "finding": finding or None,
        # multi-label sets (NIH, CheXpert, MIMIC) say only "abnormal" in the label: their finding is the condition
        "condition": (finding if label == "abnormal" and finding else label or finding) or None,
        "source": get("source") or None,
        "patient_id": get("patient_id") or None,
    }


def render_caption(cfg: CaptionConfig, values: dict[str, str | None]) -> str:
    text, _, _ = _render(_parse(cfg.template), values)
    return _tidy(text)


def caption_for(record: XrayRecord, cfg: CaptionConfig) -> str:
    """The training caption of one record: its manifest caption if allowed, else the template."""
    if cfg.use_manifest_captions and record.caption:
        return record.caption
    return render_caption(cfg, attribute_values(record, cfg))


def caption_from_attributes(cfg: CaptionConfig, **attrs: Any) -> str:
    """A caption for generation from a row of attributes (sex, age, label, finding)."""
    return render_caption(cfg, attribute_values(None, cfg, **attrs))
