#!/bin/sh
# compose.yaml's one-shot `init` (in the inference image, as the NATS user `operator`): upload
# the demo YOLOv3-tiny package built into the image through the deployer, and make it the
# desired model of $LENSBUS_GROUP unless the group has a desired model already (a model you
# deployed later is never replaced). Safe to run again: an identical upload changes nothing.
# The lensbus command connects as compose says: $LENSBUS_NATS_URL (tls://), the operator's
# seed file $LENSBUS_NATS_NKEY, $LENSBUS_NATS_USER (operator) and the CA $LENSBUS_NATS_TLS_CA.
set -eu
: "${LENSBUS_NATS_URL:?}" "${LENSBUS_NATS_NKEY:?}" "${LENSBUS_GROUP:=default}"
PACKAGE=${LENSBUS_DEMO_PACKAGE:-/opt/lensbus/models/yolov3-tiny-onnx}

# Wait for NATS and the deployer (the service may still be starting).
tries=0
until lensbus status --group "$LENSBUS_GROUP" --json > /tmp/status.json 2> /tmp/status.err; do
  tries=$((tries + 1))
  if [ "$tries" -ge 60 ]; then
    cat /tmp/status.err >&2
    exit 1
  fi
  sleep 2
done

has_model=$(python3 -c '
import json, sys
groups = json.load(open("/tmp/status.json"))
print("yes" if any(g.get("deployment") for g in groups if g.get("group") == sys.argv[1]) else "no")
' "$LENSBUS_GROUP")
if [ "$has_model" = yes ]; then
  echo "group $LENSBUS_GROUP has a desired model already; nothing to do"
  exit 0
fi
ref=$(python3 -c '
import json, sys
m = json.load(open(sys.argv[1] + "/model.json"))
print(m["name"] + ":" + m["version"])
' "$PACKAGE")
lensbus models upload --quiet "$PACKAGE"
lensbus deploy "$ref" --group "$LENSBUS_GROUP"
