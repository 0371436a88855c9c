"""Model loading (local folder, single file, hub id) and tiny random-initialised test models."""
