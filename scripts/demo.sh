#!/usr/bin/env bash
# Install lastlayer and run the main job on the embedded defaults: the bundled demo images, local files,
# the local engine, EfficientNet-Lite0. Outputs land in /tmp as retrain.py's defaults say.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install.sh
venv="${LASTLAYER_VENV:-.venv}"
"$venv/bin/lastlayer" retrain "$@"
demo_image=$(ls src/lastlayer/demo/images/sneaker/*.png | head -n 1)
echo "--- lastlayer label $demo_image"
"$venv/bin/lastlayer" label --graph=/tmp/output_graph.onnx "$demo_image"
