"""Data layer: readers (Montgomery, Shenzhen, folder+manifest, DICOM) -> XrayRecord -> preprocess,
captions and patient-level splits."""
