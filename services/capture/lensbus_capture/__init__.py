"""lensbus capture service: reads a camera, video file, folder or test pattern and
publishes JPEG frames on ``<prefix>.frames.<camera>`` (the device stream)."""
