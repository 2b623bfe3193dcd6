"""The pipeline's stages and commands, one module each: `python -m stages.<name>` (see dvc.yaml)."""

import os
import sys

# TensorFlow's oneDNN kernels off, whatever the environment says: they print a notice in every
# process that cannot be silenced otherwise, and with them the same params gave other model bytes
# depending on TF_ENABLE_ONEDNN_OPTS (training speed is the same: the loop is XLA-compiled).
os.environ["TF_ENABLE_ONEDNN_OPTS"] = "0"
# TensorFlow's C++ INFO and WARNING lines (CPU features, XLA's notes) out of the logs; its errors stay.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

if sys.argv[:1] == ["-m"]:  # `python -m stages.<name>`: Python imports this package before the module
    from stages.lib import runner

    runner.guard()  # Ctrl-C, SIGTERM and a dying dvc are handled during TensorFlow's seconds-long import too
