"""The bottom layer: run-directory names, part stores, metrics, progress, atomic I/O and
provenance. Everything here is torch-free and imports nothing else from nlrw."""
