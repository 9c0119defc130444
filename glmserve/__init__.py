"""glmserve's gRPC contract: stubs generated from proto/ by `make proto` (do not edit)."""
