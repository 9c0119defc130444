"""glmserve's gRPC contract (stubs generated from proto/ by `make proto`; do not edit), the
stdlib-only modules both processes share (`glmserve.logs`, `glmserve.settings`), the docs
tables rendered from the settings (`glmserve.settings_doc`), and the process harness of the
tests and benchmarks (`glmserve.testing`)."""
