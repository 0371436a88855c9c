"""Readers for the large public chest X-ray sets: NIH ChestX-ray14, CheXpert and MIMIC-CXR-JPG.

These sets are 100k-380k images described by CSV files, so a reader streams the CSV row by row
(never loading images, nor the whole table into pandas), keeps frontal views only (PA/AP; lateral
views are another image distribution), and turns each row's labels into `finding` text that the
caption template writes out. Patient ids come from the CSV (NIH, MIMIC) or the path (CheXpert), so
`data split` keeps all images of a patient on one side and re-identification has its pairs.

Images listed in a CSV but absent on disk (a partial download) are one summarised problem per CSV
rather than 100k lines; `on_error: skip` then trains on what is there.

Label conventions: `label` is the coarse class used for stratified splits: "normal" ("No Finding")
or "abnormal"; `finding` lists the positive labels in lower case ("cardiomegaly, effusion"), which
`{condition}` uses for abnormal images. CheXpert/MIMIC uncertain labels (-1) are not positives
(the "U-ignore" policy); they are kept in `extra["uncertain"]`.
"""

from __future__ import annotations

import csv
import gzip
import io
import re
from collections.abc import Iterator
from pathlib import Path

from synthcxr.data.readers import Reader, ScanResult
from synthcxr.data.readings import ReadingsParseError, parse_age, parse_sex
from synthcxr.data.records import NORMAL, XrayRecord
from synthcxr.errors import Problem
from synthcxr.logging_utils import get_logger, progress_bar

log = get_logger(__name__)

ABNORMAL = "abnormal"
FRONTAL_VIEWS = {"PA", "AP"}
CHEXPERT_LABELS = ("No Finding", "Enlarged Cardiomediastinum", "Cardiomegaly", "Lung Opacity", "Lung Lesion", "Edema",
                   "Consolidation", "Pneumonia", "Atelectasis", "Pneumothorax", "Pleural Effusion", "Pleural Other",
                   "Fracture", "Support Devices")
NIH_COLUMNS = ("Image Index", "Finding Labels", "Patient ID", "Patient Age", "Patient Gender", "View Position")
MISSING_EXAMPLES = 3
PROGRESS_BYTES = 2_000_000  # CSVs above this size show a progress bar while read


def stream_csv(path: Path, description: str) -> Iterator[tuple[int, dict[str, str]]]:
    """(line number, row) of a CSV (plain or .gz), one at a time; a progress bar over bytes for big files.

    Header names are kept as written (stripped); only one row is in memory at a time.
    """
    size = path.stat().st_size
    with path.open("rb") as raw:
        binary = gzip.GzipFile(fileobj=raw) if path.name.lower().endswith(".gz") else raw
        text = io.TextIOWrapper(binary, encoding="utf-8-sig", newline="")
        reader = csv.DictReader(text)
        reader.fieldnames = [(name or "").strip() for name in (reader.fieldnames or [])]
        if size < PROGRESS_BYTES:
            for row in reader:
                yield reader.line_num, row
            return
        with progress_bar(size, description) as (progress, task):
            for i, row in enumerate(reader):
                yield reader.line_num, row
                if i % 2000 == 0:  # bytes of the file consumed so far (compressed bytes for .gz)
                    progress.update(task, completed=min(raw.tell(), size))
            progress.update(task, completed=size)


def _first_line(path: Path) -> str:
    with path.open("rb") as raw:
        binary = gzip.GzipFile(fileobj=raw) if path.name.lower().endswith(".gz") else raw
        return binary.readline().decode("utf-8-sig", errors="replace")


def _missing_problem(csv_path: Path, missing: list[str], n_missing: int, root: Path) -> Problem:
    examples = ", ".join(missing[:MISSING_EXAMPLES])
    return Problem(csv_path, f"{n_missing} image(s) listed here are not on disk (e.g. {examples})",
                   f"download/unpack the missing images under {root}, or set on_error: skip "
                   "(--on-error skip) to use the images that are there")


def _finding_text(positives: list[str]) -> str | None:
    return ", ".join(p.lower() for p in positives) or None


class _TableReader(Reader):
    """Shared detection: a root holds one of the set's CSV files."""

    csv_patterns: tuple[str, ...] = ()
    takes_views = True

    def _csvs(self, root: Path) -> list[Path]:
        found: list[Path] = []
        for pattern in self.csv_patterns:
            found += sorted(p for p in root.glob(pattern) if p.is_file())
        return list(dict.fromkeys(found))

    def detect(self, path: Path) -> list[Path]:
        if path.is_file() and path.parent.is_dir() and path in self._csvs(path.parent):
            return [path.parent]
        if not path.is_dir():
            return []
        if self._csvs(path):
            return [path]
        return [c for c in sorted(path.iterdir()) if c.is_dir() and not c.name.startswith(".") and self._csvs(c)]

    def _no_csv(self, root: Path, what: str) -> ScanResult:
        result = ScanResult()
        result.problems.append(Problem(root, f"no {what} found", f"point the path at the folder holding {what}"))
        return result


class NIHReader(_TableReader):
    """NIH ChestX-ray14: `Data_Entry_2017*.csv` + PNGs in `images*/` (e.g. images_001/images/00000001_000.png)."""

    name = "nih"
    csv_patterns = ("Data_Entry_2017*.csv", "Data_Entry_2017*.csv.gz")

    def scan(self, root: Path, manifest: Path | None = None, resolution: int | None = None,
             keep_pixels: bool = True, frontal_only: bool = True) -> ScanResult:
        csvs = self._csvs(root)
        if not csvs:
            return self._no_csv(root, "Data_Entry_2017*.csv")
        if len(csvs) > 1:
            log.info("%s: several entry tables (%s); using %s", root, ", ".join(p.name for p in csvs), csvs[-1].name)
        table = csvs[-1]  # the newest version sorts last (Data_Entry_2017_v2020.csv after Data_Entry_2017.csv)
        # one directory listing instead of 112k stat calls: file name -> path
        index = {p.name: p for folder in sorted(root.glob("images*")) if folder.is_dir() for p in folder.rglob("*.png")}
        result = ScanResult()
        missing: list[str] = []
        n_missing = lateral = 0
        for line, row in stream_csv(table, f"reading {table.name}"):
            if line == 2 and (absent := [c for c in NIH_COLUMNS if c not in row]):
                result.problems.append(Problem(table, f"missing column(s) {', '.join(absent)}",
                                               "use the unmodified Data_Entry_2017 CSV of ChestX-ray14"))
                return result
            view = (row.get("View Position") or "").strip().upper()
            if frontal_only and view not in FRONTAL_VIEWS:
                lateral += 1
                continue
            name = (row.get("Image Index") or "").strip()
            path = index.get(name)
            if path is None:
                n_missing += 1
                if len(missing) < MISSING_EXAMPLES:
                    missing.append(name)
                continue
            try:
                age = parse_age(row.get("Patient Age"))
            except ReadingsParseError as exc:
                result.problems.append(Problem(table, f"line {line}: {exc}", "write the age in years"))
                continue
            labels = [x.strip() for x in (row.get("Finding Labels") or "").split("|") if x.strip()]
            normal = labels == ["No Finding"]
            result.records.append(XrayRecord(
                image_path=path, patient_id=str(row.get("Patient ID") or "").strip() or name.split("_")[0],
                source=self.name, sex=parse_sex(row.get("Patient Gender")), age=age,
                finding=NORMAL if normal else _finding_text([x for x in labels if x != "No Finding"]),
                label=NORMAL if normal else ABNORMAL,
                extra={"relpath": path.relative_to(root).as_posix(), "view": view, "labels": labels,
                       "follow_up": (row.get("Follow-up #") or "").strip()}))
        if n_missing:
            result.problems.append(_missing_problem(table, missing, n_missing, root))
        if lateral:
            log.info("%s: left out %d non-frontal image(s) (frontal_only)", table.name, lateral)
        return result


def _labels_from_row(row: dict[str, str]) -> tuple[list[str], list[str]]:
    """(positive, uncertain) CheXpert-labeler columns of a row: 1 is positive, -1 uncertain, 0/blank not."""
    positive, uncertain = [], []
    for label in CHEXPERT_LABELS:
        value = (row.get(label) or "").strip()
        if not value:
            continue
        try:
            number = float(value)
        except ValueError:
            continue
        if number == 1:
            positive.append(label)
        elif number == -1:
            uncertain.append(label)
    return positive, uncertain


def _finding_and_label(positive: list[str]) -> tuple[str | None, str | None]:
    if positive == ["No Finding"] or positive == []:
        return (NORMAL, NORMAL) if positive else (None, None)
    return _finding_text([p for p in positive if p != "No Finding"]), ABNORMAL


class CheXpertReader(_TableReader):
    """CheXpert: `train.csv` / `valid.csv` (Path, Sex, Age, Frontal/Lateral, AP/PA, 14 labels); the
    Path column starts with the set's folder name (CheXpert-v1.0-small/train/patient00001/study1/...)."""

    name = "chexpert"
    csv_patterns = ("train.csv", "valid.csv", "test.csv")

    def detect(self, path: Path) -> list[Path]:
        return [r for r in super().detect(path) if self._is_chexpert(r)]

    def _is_chexpert(self, root: Path) -> bool:
        for table in self._csvs(root):
            header = _first_line(table)
            if "Frontal/Lateral" in header and "Path" in header:
                return True
        return False

    def _resolve(self, root: Path, rel: str) -> Path:
        parts = Path(rel).parts
        for cand in (root.parent / rel, root / Path(*parts[1:]) if len(parts) > 1 else root / rel, root / rel):
            if cand.is_file():
                return cand
        return root / Path(*parts[1:]) if len(parts) > 1 else root / rel

    def scan(self, root: Path, manifest: Path | None = None, resolution: int | None = None,
             keep_pixels: bool = True, frontal_only: bool = True) -> ScanResult:
        tables = [t for t in self._csvs(root) if t.name != "test.csv" or self._is_chexpert(root)]
        if not tables:
            return self._no_csv(root, "train.csv / valid.csv")
        result = ScanResult()
        for table in tables:
            missing: list[str] = []
            n_missing = lateral = 0
            for line, row in stream_csv(table, f"reading {table.name}"):
                if line == 2 and "Path" not in row:
                    result.problems.append(Problem(table, "no Path column", "use the unmodified CheXpert CSV"))
                    break
                rel = (row.get("Path") or "").strip()
                view = (row.get("AP/PA") or "").strip().upper()
                if frontal_only and (row.get("Frontal/Lateral") or "").strip().lower() != "frontal":
                    lateral += 1
                    continue
                path = self._resolve(root, rel)
                if not path.is_file():
                    n_missing += 1
                    if len(missing) < MISSING_EXAMPLES:
                        missing.append(rel)
                    continue
                match = re.search(r"(patient\d+)", rel)
                try:
                    age = parse_age(row.get("Age"))
                except ReadingsParseError as exc:
                    result.problems.append(Problem(table, f"line {line}: {exc}", "write the age in years"))
                    continue
                positive, uncertain = _labels_from_row(row)
                finding, label = _finding_and_label(positive)
                result.records.append(XrayRecord(
                    image_path=path, patient_id=match.group(1) if match else path.parent.parent.name,
                    source=self.name, sex=parse_sex(row.get("Sex")), age=age, finding=finding, label=label,
                    extra={"relpath": path.relative_to(root).as_posix(), "view": view, "labels": positive,
                           "uncertain": uncertain, "table": table.name}))
            if n_missing:
                result.problems.append(_missing_problem(table, missing, n_missing, root))
            if lateral:
                log.info("%s: left out %d lateral image(s) (frontal_only)", table.name, lateral)
        return result


class MIMICReader(_TableReader):
    """MIMIC-CXR-JPG: `mimic-cxr-2.0.0-metadata.csv(.gz)` (dicom_id, subject_id, study_id, ViewPosition),
    `mimic-cxr-2.0.0-chexpert.csv(.gz)` (labels per study), JPEGs in files/pXX/pSUBJECT/sSTUDY/DICOM_ID.jpg.

    Optional: `patients.csv(.gz)` from MIMIC-IV (subject_id, gender, anchor_age) for sex and age, and
    report texts (files/pXX/pSUBJECT/sSTUDY.txt from MIMIC-CXR) whose IMPRESSION (else FINDINGS)
    section becomes the image's caption (as a manifest caption: `captions.use_manifest_captions:
    false` writes template captions instead) and is kept in `extra["report"]`.
    """

    name = "mimic"
    csv_patterns = ("mimic-cxr-2.0.0-metadata.csv", "mimic-cxr-2.0.0-metadata.csv.gz")

    def _table(self, root: Path, stem: str) -> Path | None:
        for name in (f"{stem}.csv", f"{stem}.csv.gz"):
            if (root / name).is_file():
                return root / name
        return None

    def scan(self, root: Path, manifest: Path | None = None, resolution: int | None = None,
             keep_pixels: bool = True, frontal_only: bool = True) -> ScanResult:
        meta = self._table(root, "mimic-cxr-2.0.0-metadata")
        if meta is None:
            return self._no_csv(root, "mimic-cxr-2.0.0-metadata.csv")
        result = ScanResult()
        labels: dict[str, tuple[list[str], list[str]]] = {}  # study_id -> labels: one small tuple per study
        chex = self._table(root, "mimic-cxr-2.0.0-chexpert")
        if chex is None:
            result.problems.append(Problem(root / "mimic-cxr-2.0.0-chexpert.csv", "label table not found",
                                           "copy mimic-cxr-2.0.0-chexpert.csv(.gz) from MIMIC-CXR-JPG next to the metadata"))
        else:
            for _, row in stream_csv(chex, f"reading {chex.name}"):
                labels[(row.get("study_id") or "").strip()] = _labels_from_row(row)
        people: dict[str, tuple[str | None, float | None]] = {}
        patients = self._table(root, "patients")
        if patients is not None:
            for _, row in stream_csv(patients, f"reading {patients.name}"):
                try:
                    age = parse_age(row.get("anchor_age"))
                except ReadingsParseError:
                    age = None
                people[(row.get("subject_id") or "").strip()] = (parse_sex(row.get("gender")), age)
        files = root / "files"
        missing: list[str] = []
        n_missing = lateral = 0
        for _, row in stream_csv(meta, f"reading {meta.name}"):
            view = (row.get("ViewPosition") or "").strip().upper()
            if frontal_only and view not in FRONTAL_VIEWS:
                lateral += 1
                continue
            subject, study, dicom = (str(row.get(k) or "").strip() for k in ("subject_id", "study_id", "dicom_id"))
            rel = f"p{subject[:2]}/p{subject}/s{study}/{dicom}.jpg"
            path = files / rel
            if not path.is_file():
                n_missing += 1
                if len(missing) < MISSING_EXAMPLES:
                    missing.append(f"files/{rel}")
                continue
            positive, uncertain = labels.get(study, ([], []))
            finding, label = _finding_and_label(positive)
            sex, age = people.get(subject, (None, None))
            extra = {"relpath": path.relative_to(root).as_posix(), "view": view, "labels": positive,
                     "uncertain": uncertain, "study_id": study}
            report = _report_section(files / f"p{subject[:2]}/p{subject}/s{study}.txt")
            record = XrayRecord(image_path=path, patient_id=subject, source=self.name, sex=sex, age=age,
                                finding=finding, label=label, extra=extra)
            if report:
                extra["report"] = report
                record.caption = report
            result.records.append(record)
        if n_missing:
            result.problems.append(_missing_problem(meta, missing, n_missing, root))
        if lateral:
            log.info("%s: left out %d non-frontal image(s) (frontal_only)", meta.name, lateral)
        return result


_SECTION = re.compile(r"^\s*(IMPRESSION|FINDINGS)\s*:\s*", re.M)


def _report_section(path: Path) -> str | None:
    """The IMPRESSION section of a MIMIC-CXR report (else FINDINGS), whitespace collapsed; None without one."""
    if not path.is_file():
        return None
    text = path.read_text(encoding="utf-8", errors="replace")
    sections: dict[str, str] = {}
    matches = list(_SECTION.finditer(text))
    for i, m in enumerate(matches):
        end = matches[i + 1].start() if i + 1 < len(matches) else len(text)
        body = re.split(r"\n\s*[A-Z][A-Z ]+:", text[m.end():end])[0]
        sections[m.group(1)] = " ".join(body.split())
    return sections.get("IMPRESSION") or sections.get("FINDINGS") or None


PUBLIC_READERS: dict[str, Reader] = {"nih": NIHReader(), "chexpert": CheXpertReader(), "mimic": MIMICReader()}
