"""Turn a generation folder into a data set others can load (image folder, Parquet, WebDataset) with its card."""
