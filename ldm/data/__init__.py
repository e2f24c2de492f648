"""Training data: image folders with captions, webdataset tar shards, transforms and the data module."""
