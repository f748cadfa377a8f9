"""SimSiam (Chen & He, arXiv 2011.10566) in TensorFlow 2 and Keras 3.

Importing the package switches on TensorFlow's oneDNN kernels on x86 CPUs, unless
TF_ENABLE_ONEDNN_OPTS is already set (set it to 0 to keep TensorFlow's own choice).
TensorFlow turns them on by itself only on CPUs with AVX512_VNNI, AVX512_BF16 or AMX;
elsewhere (an AMD EPYC with AVX2, say) its convolutions run in Eigen kernels built
for AVX, and the training step measured 1.5x slower (docs/performance.md, "Against
PyTorch"). TensorFlow reads the variable once, when it is first imported, so this
works only when simsiam_tf is imported before tensorflow, as every entry point of
the project does.
"""

import os as _os
import platform as _platform

if _platform.machine().lower() in ("x86_64", "amd64"):
    _os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")
