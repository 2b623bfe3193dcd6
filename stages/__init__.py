"""The pipeline's stages, one module each: download, normalize, train, evaluate, report."""

import os

# Keep TensorFlow's C++ start-up chatter (oneDNN, CPU features) out of the stage logs.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
