"""Generated stubs for glmserve.v1 (`make proto`)."""
