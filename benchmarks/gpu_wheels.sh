#!/bin/sh
# The Python packages that `benchmarks/gpu_all.sh` needs and the device machine's image lacks (it
# holds torch, transformers, pyarrow, pyyaml, pillow, safetensors, huggingface_hub; not pydantic or
# diffusers), as wheels in .whl/ (ignored by git), pinned by constraints.txt. Run it here, then the
# device call: `sh benchmarks/gpu_all.sh` with carry [".whl"] (gpu_all.sh installs them there).
#
# benchmarks.gpu_ray_train also needs Ray and MLflow there: Ray's wheel alone (79 MB) is over what one
# call carries (64 MiB with the working tree), so it would have to travel in two calls to a warm machine.
set -e
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo /.whl/ >> .git/info/exclude
pin() { grep -i "^$1==" constraints.txt; }
python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
    "$(pin pydantic)" "$(pin pydantic_core)" "$(pin annotated-types)" "$(pin typing-inspection)" \
    "$(pin diffusers)" "$(pin importlib_metadata)"
ls -la .whl
