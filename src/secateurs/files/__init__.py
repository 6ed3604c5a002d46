"""Files: the one writer and the output rules every output follows, reading user text and jsonl files,
and the cache folder. Below everything that reads or writes models; no torch at import."""
