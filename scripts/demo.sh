#!/usr/bin/env bash
# Install lastlayer and run the main job on the embedded defaults: the bundled demo images, local files,
# the local engine, EfficientNet-Lite0. Outputs land in /tmp as retrain.py's defaults say. Ends with the
# report to open and the one line that serves the model.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install.sh
venv="${LASTLAYER_VENV:-.venv}"
result=$("$venv/bin/lastlayer" retrain "$@")
echo "$result"
field() { "$venv/bin/python" -c 'import json, sys; print(json.loads(sys.argv[1])[sys.argv[2]])' "$result" "$1"; }
graph=$(field output_graph)
report=$(field report)
demo_image=$(ls src/lastlayer/demo/images/sneaker/*.png | head -n 1)
echo "--- lastlayer label $demo_image"
"$venv/bin/lastlayer" label --graph="$graph" "$demo_image"
if [ -n "$report" ]; then
    echo "--- the run's report (open it in a browser):"
    echo "    $report"
fi
echo "--- serve the model, then open http://127.0.0.1:8080/ and drop an image on the page (Ctrl-C stops):"
printf '    %s serve --graph=%q\n' "$venv/bin/lastlayer" "$graph"
