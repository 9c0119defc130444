"""glmserve benchmarks: ``python -m bench.run`` (``make bench``) drives a real model server and
HTTP bridge with a load generator and compares against plain transformers baselines."""
