"""`load_records`: the one way every stage turns a `DataConfig` into checked, captioned records;
and `XrayDataset`, the map-style dataset the training loop feeds to a DataLoader."""

from __future__ import annotations

from typing import Any

from synthcxr.data.captions import caption_for
from synthcxr.data.checks import check_scan
from synthcxr.data.config import DataConfig
from synthcxr.data.preprocess import load_image, to_model_tensor
from synthcxr.data.readers import scan_paths
from synthcxr.data.records import XrayRecord
from synthcxr.errors import DataError, ProblemsError
from synthcxr.logging_utils import get_logger

log = get_logger(__name__)


def load_records(cfg: DataConfig, full_check: bool = False) -> list[XrayRecord]:
    """Read, check and caption every image of `cfg.path`.

    With `on_error: fail` any problem raises `ProblemsError` listing all of them (never only the
    first); with `skip` they are logged and the affected images left out. `full_check` decodes every
    image (as `data inspect` does) instead of only checking PNG checksums.
    """
    scan = scan_paths(cfg.paths, cfg.format, cfg.manifest, resolution=cfg.resolution, frontal_only=cfg.frontal_only)
    records, problems = check_scan(scan, full=full_check)
    where = ", ".join(str(p) for p in cfg.paths)
    if problems:
        if cfg.on_error == "fail":
            raise ProblemsError(problems, what=where)
        for problem in problems:
            log.warning("skipped: %s", problem.render())
        log.warning("%d problem(s) in %s; the files concerned are left out (on_error: skip)", len(problems), where)
    if not records:
        raise DataError("no usable images", file=where,
                        fix="check the path and format (run `synthcxr data inspect PATH` to see what is wrong)")
    for record in records:
        record.caption = caption_for(record, cfg.captions)
    log.info("loaded %d image(s) from %s", len(records), where)
    return records


class XrayDataset:
    """Records -> {"pixel_values": 3xHxW float in [-1, 1], "caption", "key"} for a torch DataLoader.

    Torch's DataLoader only needs `__len__`/`__getitem__`, so this stays importable without torch.
    Flips happen only when `cfg.hflip` is set (X-rays have laterality); they draw from torch's RNG,
    which `torch.manual_seed` makes reproducible and DataLoader workers seed differently.
    """

    def __init__(self, records: list[XrayRecord], cfg: DataConfig, train: bool = True):
        self.records = records
        self.cfg = cfg
        self.flip = cfg.hflip and train

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict[str, Any]:
        import torch

        record = self.records[index]
        image = load_image(record, self.cfg.resolution, self.cfg.resize)
        if self.flip and bool(torch.rand(()) < 0.5):
            from PIL import ImageOps

            image = ImageOps.mirror(image)
        pixel_values = to_model_tensor(image)
        return {"pixel_values": pixel_values, "caption": record.caption or caption_for(record, self.cfg.captions),
                "key": record.key}
