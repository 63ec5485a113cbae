#!/bin/sh
# What `benchmarks/gpu_all.sh` needs on the device machine and its image lacks, packed here into one
# archive, .whl/site.tar.xz (.whl is ignored by git): the image holds torch, transformers, pyarrow,
# pandas, aiohttp, grpcio, pyyaml, pillow, safetensors, huggingface_hub, not pydantic, diffusers, Ray
# or MLflow. Run it here, then the device call `sh benchmarks/gpu_all.sh` with carry [".whl"].
#
# The packages are installed here for CPython 3.12 on x86-64 (the device's Python) at the versions of
# constraints.txt, without their dependencies: the list below is what the image lacks of the
# dependency closure of ray[default,train,data], mlflow-skinny (with SQLAlchemy and alembic for the
# sqlite store), diffusers and what the project imports. Ray's wheel alone (79 MB) is more than a call
# carries beside the working tree (64 MiB in all), so what the benchmarks never load is left out (Ray's
# Java jar, its dashboard's web client, RLlib and Serve; py-spy; boto3, which only accelerate looks for),
# Ray's compiled parts lose their symbol tables (strip --strip-unneeded) and the rest is xz-compressed.
#
#   PYVER=3.11 ARCHIVE=/tmp/site311.tar.xz sh benchmarks/gpu_wheels.sh   # the same for this machine's
#   Python, to try it here: unpack it into D and run `PYTHONPATH=D:. python -m benchmarks.gpu_ray_train
#   --device cpu --flavor tiny --steps 6 --rows 128 --cpus 1`
set -e
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo /.whl/ >> .git/info/exclude
PACKAGES="ray mlflow-skinny SQLAlchemy alembic Mako sqlparse databricks-sdk gitpython gitdb smmap cachetools
  google-auth google-api-core googleapis-common-protos proto-plus pyasn1 pyasn1-modules cryptography cffi pycparser
  opentelemetry-api opentelemetry-sdk opentelemetry-proto opentelemetry-semantic-conventions
  opentelemetry-exporter-prometheus opencensus opencensus-context aiohttp-cors colorful smart-open
  fastapi starlette uvicorn python-dotenv importlib_metadata tensorboardX
  jsonschema jsonschema-specifications referencing rpds-py jsonpointer rfc3339-validator
  pydantic pydantic_core annotated-types typing-inspection diffusers
  open_clip_torch ftfy wcwidth truststore httpx2 httpcore2"
PYVER=${PYVER:-3.12}
ARCHIVE=${ARCHIVE:-.whl/site.tar.xz}
pins=""
for name in $PACKAGES; do
    pin=$(grep -i "^$(echo "$name" | sed 's/[-_.]/[-_.]/g')==" constraints.txt) || { echo "gpu_wheels: $name is not pinned in constraints.txt" >&2; exit 1; }
    pins="$pins $pin"
done
stage=$(mktemp -d)
trap 'rm -rf "$stage"' EXIT
# shellcheck disable=SC2086  # one argument a pin
python3 -m pip install --quiet --no-deps --no-compile --only-binary=:all: --python-version "$PYVER" --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    --target "$stage/site" $pins
site="$stage/site"
rm -rf "$site/ray/jars" "$site/ray/dashboard/client/build" "$site/ray/rllib" "$site/ray/serve" "$site/bin"
find "$site/ray" -type f \( -name '*.so' -o -path '*/ray/core/src/*' \) -print | while read -r f; do
    if [ "$(head -c 4 "$f" | od -An -c | tr -d ' ')" = '177ELF' ]; then strip --strip-unneeded "$f"; fi
done
mkdir -p "$(dirname "$ARCHIVE")"
rm -f .whl/*.whl
tar -C "$site" -cf - . | xz -9 -T2 > "$ARCHIVE"
echo "gpu_wheels: $ARCHIVE is $(du -m "$ARCHIVE" | cut -f1) MB; the working tree: $(git ls-files -z | xargs -0 du -cm | tail -1 | cut -f1) MB (64 MiB a call in all)"
