"""glmserve's gRPC contract (stubs generated from proto/ by `make proto`; do not edit), what
both processes share in the stdlib alone (logging: `glmserve.logs`; settings declared once:
`glmserve.settings`, their docs tables: `glmserve.settings_doc`), and the process harness of
the tests and benchmarks (`glmserve.testing`)."""
