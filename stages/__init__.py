"""The pipeline's stages and commands, one module each: `python -m stages.<name>` (see dvc.yaml)."""

import os
import sys

# Keep TensorFlow's C++ start-up chatter (oneDNN, CPU features) out of the stage logs.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

if sys.argv[:1] == ["-m"]:  # `python -m stages.<name>`: Python imports this package before the module
    from stages.lib import runner

    runner.guard()  # Ctrl-C, SIGTERM and a dying dvc are handled during TensorFlow's seconds-long import too
