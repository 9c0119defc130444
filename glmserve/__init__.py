"""glmserve's gRPC contract (stubs generated from proto/ by `make proto`; do not edit) and
the stdlib-only logging setup both processes share (`glmserve.logs`)."""
