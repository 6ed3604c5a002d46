"""Reading and writing: models (local folders, GGUF, the bundled aliases, meta-device builds,
offloaded weights), pruned folders, user text files, caches, and the one writer every output goes through."""
