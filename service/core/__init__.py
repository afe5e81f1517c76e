"""The scoring core: stage-1 behavior search (FAISS) and stage-2 ranking (ONNX Runtime), no I/O."""
