"""glmserve model server: owns the model and the accelerator, serves glmserve.v1.ChatService."""
