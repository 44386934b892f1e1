"""Storage: the Arrow schema, the run-directory layout, the writer, the reader and the
exact merge of ranks."""
