"""lensbus projects service: runs each deployed project in a supervised process of its own."""
