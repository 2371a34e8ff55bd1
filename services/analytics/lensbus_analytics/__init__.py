"""lensbus analytics: a camera's detections over time. Tracks with stable ids (a
ByteTrack-class tracker), zones and lines that count, and the events they raise."""
